"""The command line: groups, version, dataset listing/checking, the cache commands and user errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer
from PIL import Image
from typer.testing import CliRunner

from tdr import __version__
from tdr.cli import app
from helpers import run

runner = CliRunner()



def test_help_lists_every_group_and_version():
    text = run("--help").output
    for group in ("generate-guidance", "cache", "datasets", "demo"):
        assert group in text
    assert run("--version").output.strip() == f"tdr {__version__}"
    assert "ingest" in run("cache", "--help").output


def test_datasets_listing_and_check(tmp_path):
    listing = run("datasets").output
    for name in ("gopro", "sots-indoor", "rain200h", "ddn", "did", "sidd", "folder", "demo"):
        assert name in listing
    root = tmp_path / "custom"
    for split in ("train",):
        for side in ("lq", "gt"):
            (root / split / side).mkdir(parents=True)
    img = np.zeros((16, 16, 3), np.uint8)
    for stem in ("a", "b"):
        Image.fromarray(img).save(root / "train" / "lq" / f"{stem}.png")
    Image.fromarray(img).save(root / "train" / "gt" / "a.png")
    result = run("datasets", "check", "folder", "--root", str(root), code=1)
    assert "b" in result.output and "problem" in result.output


def test_unknown_dataset_is_one_line(tmp_path):
    result = run("cache", "ingest", "--dataset", "gopr0", "--root", str(tmp_path), "--store", str(tmp_path / "s.zarr"), code=1)
    assert "gopro" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "s.zarr").exists()


def test_wrong_layout_names_folder_and_leaves_store(tmp_path):
    store = str(tmp_path / "s.zarr")
    run("cache", "ingest", "--dataset", "demo", "--split", "test", "--store", store)
    before = sorted(p.relative_to(store) for p in Path(store).rglob("*"))
    (tmp_path / "empty").mkdir()
    result = run("cache", "ingest", "--dataset", "gopro", "--root", str(tmp_path / "empty"), "--store", store, code=1)
    assert "empty" in result.output and "Traceback" not in result.output
    assert sorted(p.relative_to(store) for p in Path(store).rglob("*")) == before


def test_missing_store_and_other_schema(tmp_path):
    result = run("cache", "info", str(tmp_path / "nope.zarr"), code=1)
    assert "No tdr store" in result.output
    import zarr

    zarr.open_group(str(tmp_path / "old.zarr"), mode="w").attrs["tdr_schema"] = 7
    assert "schema 7" in run("cache", "verify", str(tmp_path / "old.zarr"), code=1).output


def test_demo_ingest_info_verify_corrupt_export(tmp_path):
    store = str(tmp_path / "demo.zarr")
    run("cache", "ingest", "--dataset", "demo", "--store", store)
    facts = json.loads(run("cache", "info", store, "--json").output)
    assert facts["splits"]["train"]["images"] == 48 and facts["splits"]["test"]["images"] == 12
    assert "ok:" in run("cache", "verify", store).output
    # import guidance for the test split, then export it again
    guide_dir = tmp_path / "guide"
    from tdr.cache import open_store

    ids = open_store(store)["test"].ids
    rng = np.random.default_rng(0)
    for image_id in ids:
        path = guide_dir / f"{image_id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(path)
    assert "imported 12" in run("cache", "import-guidance", store, "--split", "test", "--from", str(guide_dir)).output
    run("cache", "export", store, "--to", str(tmp_path / "out"), "--split", "test")
    for image_id in ids:
        a = np.asarray(Image.open(guide_dir / f"{image_id}.png"))
        b = np.asarray(Image.open(tmp_path / "out" / "test" / f"{image_id}.png"))
        np.testing.assert_array_equal(a, b)
    # flip a byte inside one chunk: verify names that image and fails
    gid = open_store(store).guidance().id
    chunk = Path(store, "guidance", gid, "test", "c", "5", "0", "0", "0")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    result = run("cache", "verify", store, code=1)
    assert ids[5] in result.output and "corrupt" in result.output
    lq_chunk = Path(store, "train", "lq", "c", "7", "0", "0", "0")
    data = bytearray(lq_chunk.read_bytes())
    data[100] ^= 0x80
    lq_chunk.write_bytes(bytes(data))
    result = run("cache", "verify", store, code=1)
    assert open_store(store)["train"].ids[7] in result.output


def test_import_refuses_unreadable_file_without_writing(tmp_path):
    store = str(tmp_path / "demo.zarr")
    run("cache", "ingest", "--dataset", "demo", "--split", "test", "--store", store)
    from tdr.cache import open_store

    ids = open_store(store)["test"].ids
    folder = tmp_path / "g"
    (folder / Path(ids[0]).parent).mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / f"{ids[0]}.png")
    (folder / f"{ids[1]}.png").write_bytes(b"not a png")
    result = run("cache", "import-guidance", store, "--split", "test", "--from", str(folder), code=1)
    assert ids[1] in result.output
    assert open_store(store).guidance_ids() == []
    result = run("cache", "import-guidance", store, "--split", "test", "--from", str(folder), "--layout", "diagonal",
                 code=1)  # the library checks the layout and names its parameter; the CLI adds the option
    assert result.stderr.strip() == "error: layout must be one of center, full, not 'diagonal'. (option --layout)"
    assert open_store(store).guidance_ids() == []


def test_an_error_names_the_commands_option_for_its_parameter_only_where_there_is_one():
    from tdr.cli import command_options, error_line
    from tdr.errors import StoreError

    def command(json_path: Path = typer.Option(None, "--json"), batch_size: int = typer.Option(1, "--batch-size")):
        """A command with two options."""

    options = command_options(command)
    assert options["json"] == options["json_path"] == "--json" and options["batch_size"] == "--batch-size"
    assert error_line(StoreError("Too many.", param="batch_size"), options) == "Too many. (option --batch-size)"
    assert error_line(StoreError("Pass --json.", param="json"), options) == "Pass --json."  # named already
    assert error_line(StoreError("Needs root.", param="root"), options) == "Needs root."  # no such option here
    assert error_line(StoreError("Plain."), options) == "Plain."


def test_datasets_listing_fits_80_columns_and_one_shows_its_layout():
    from tdr.cache.datasets import list_datasets

    lines = runner.invoke(app, ["datasets"], env={"COLUMNS": "80"}).output.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert len(lines) == len(list_datasets()) + 2  # a header, one line per dataset, a hint
    shown = run("datasets", "gopro").output
    assert "expected layout" in shown and "GOPRO_Large" in shown
    assert "Unknown dataset 'nosuch'" in run("datasets", "nosuch", code=1).stderr


def test_cpu_policy_uses_idle_cores_and_keeps_user_settings(monkeypatch):
    import os

    from tdr import cli

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert cli.cpu_threads(busy=0) == cores and cli.cpu_threads(busy=cores) == 1
    assert cli.cpu_threads(busy=1) == max(1, cores - 1)
    monkeypatch.setattr(cli, "busy_cores", lambda: cores)  # every core busy with other work
    cli.apply_cpu_policy(["generate-guidance", "--dataset", "demo"])  # its bits depend on the thread count
    assert "OMP_NUM_THREADS" not in os.environ and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    cli.apply_cpu_policy(["train", "--out", "x"])
    assert os.environ["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    cli.apply_cpu_policy(["train"])
    assert os.environ["OMP_NUM_THREADS"] == "3" and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
