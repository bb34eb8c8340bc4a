"""Guidance provenance decides the search: generated / aligned / unknown recorded per group, shown by
``cache info``; ``--search auto`` picks global unless the guidance is aligned; prior on anything else fails."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from PIL import Image

from tdr.cache import open_store
from tdr.cache.ingest import ingest
from tdr.guided.config import ConfigError, TrainConfig, resolve_search
from tdr.guided.train import train
from helpers import run




@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A `folder` dataset of 3 train / 1 test images of 48×64 and a folder of guidance files per split."""
    root = tmp_path_factory.mktemp("prov")
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 1)):
        for k in range(n):
            gt = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            for kind, img in (("lq", gt // 2), ("gt", gt), ("guidance", gt)):
                (root / split / kind).mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(root / split / kind / f"im{k}.png")
    return root


def store_with(root, tmp_path, *flags) -> str:
    url = str(tmp_path / "s.zarr")
    ingest("folder", str(root), url)
    for split in ("train", "test"):
        run("cache", "import-guidance", url, "--split", split, "--from", str(root / split / "guidance"), *flags)
    return url


def test_import_records_provenance_and_layout(data, tmp_path):
    plain = store_with(data, tmp_path / "a")
    aligned = store_with(data, tmp_path / "b", "--aligned", "--layout", "full")
    assert open_store(plain).guidance().provenance == "unknown" and open_store(plain).guidance().layout == "center"
    gs = open_store(aligned).guidance()
    assert gs.provenance == "aligned" and gs.layout == "full"
    facts = json.loads(run("cache", "info", aligned, "--json").output)
    (group,) = facts["guidance"].values()
    assert group["provenance"] == "aligned" and group["layout"] == "full"
    text = run("cache", "info", plain).output
    assert "provenance unknown" in text and "layout center" in text
    # a second import declared differently is its own group beside the first
    run("cache", "import-guidance", plain, "--split", "train", "--from", str(data / "train" / "guidance"),
        "--aligned", "--force")
    assert sorted(open_store(plain).guidance(g).provenance for g in open_store(plain).guidance_ids()) == ["aligned", "unknown"]


def test_stores_without_the_field_read_as_unknown(data, tmp_path):
    url = store_with(data, tmp_path, "--aligned")
    gid = open_store(url).guidance_ids()[0]
    del zarr.open_group(url, mode="a")["guidance"][gid].attrs["provenance"]
    assert open_store(url).guidance().provenance == "unknown"


def test_generate_records_generated(tmp_path):
    url = str(tmp_path / "g.zarr")
    run("generate-guidance", "--preset", "tiny", "--steps", "1", "--size", "64", "--device", "cpu",
        "--dataset", "demo", "--split", "test", "--limit", "1", "--store", url)
    assert open_store(url).guidance().provenance == "generated"


@pytest.mark.parametrize("provenance, expected", [("generated", "global"), ("unknown", "global"),
                                                  ("aligned", "prior"), (None, "global")])
def test_auto_picks_global_unless_aligned(provenance, expected):
    assert resolve_search("auto", provenance) == expected
    assert resolve_search("masa", provenance) == "masa"


@pytest.mark.parametrize("provenance", ["generated", "unknown"])
def test_prior_on_guidance_that_is_not_aligned_is_refused(provenance):
    with pytest.raises(ConfigError, match=f"'{provenance}'.*aligned=True"):
        resolve_search("prior", provenance, "abc123")
    assert resolve_search("prior", "aligned") == "prior"


def test_train_records_the_search_it_used(data, tmp_path):
    unknown, aligned = store_with(data, tmp_path / "u"), store_with(data, tmp_path / "a", "--aligned")
    base = dict(backbone="nafnet-test", iters=1, patch=32, batch_size=1, val_every=0)
    for url, expected in ((unknown, "global"), (aligned, "prior")):
        out = tmp_path / f"run-{expected}"
        train(TrainConfig(store=url, out=str(out), **base))
        assert json.loads((out / "config.json").read_text())["aggregation"]["search"] == expected


def test_cli_prior_on_unknown_guidance_one_line(data, tmp_path):
    url = store_with(data, tmp_path)
    result = run("train", "--backbone", "nafnet-test", "--store", url, "--out", str(tmp_path / "r"),
                 "--iters", "1", "--patch", "32", "--batch-size", "1", "--search", "prior", code=1)
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert "search 'prior'" in result.output and "'unknown'" in result.output
    assert "Traceback" not in result.output and len(lines) <= 3
    assert not (tmp_path / "r" / "last.pt").exists()


def test_schema_1_runs_load_with_the_search_they_used(tmp_path):
    """Runs saved before the searches were reworked (schema 1) called the paper's search "global" and, the
    oldest, recorded no match/transfer: they load as "masa" with encoder features and patches."""
    from tdr.guided.backbones import build_backbone
    from tdr.runs.checkpoint import save
    from tdr.guided.evaluate import load_run

    model = build_backbone("nafnet-test", guided=True)
    config = dict(backbone="nafnet-test", guidance="cache", fuse="enc+dec", search="global")
    save(tmp_path / "old.pt", {"schema": 1, "config": config, "step": 1, "model": model.state_dict()})
    loaded, cfg = load_run(tmp_path / "old.pt")
    assert cfg["aggregation"]["search"] == "masa" and loaded.agg.config.search == "masa"
    assert loaded.agg.config.match_features == "encoder" and loaded.agg.config.transfer == "patch"
    config |= {"match": "image", "transfer": "bilinear"}  # what every schema-2 run records
    save(tmp_path / "new.pt", {"schema": 2, "config": config, "step": 1, "model": model.state_dict()})
    assert load_run(tmp_path / "new.pt")[0].agg.config.search == "global"


def test_eval_refuses_a_prior_run_on_guidance_that_is_not_aligned(data, tmp_path):
    """A run trained with the prior search on aligned guidance, scored on a group of unknown geometry."""
    url = store_with(data, tmp_path, "--aligned")
    out = tmp_path / "run"
    train(TrainConfig(store=url, out=str(out), backbone="nafnet-test", iters=1, patch=32, batch_size=1, val_every=0))
    for split in ("train", "test"):
        run("cache", "import-guidance", url, "--split", split, "--from", str(data / split / "guidance"), "--force")
    unknown = open_store(url).guidance().id
    result = run("eval", "--checkpoint", str(out / "last.pt"), "--store", url, "--group", unknown, code=1)
    assert "search 'prior'" in result.output and "Traceback" not in result.output
