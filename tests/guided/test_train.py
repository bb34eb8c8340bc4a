"""Fast CPU tests of the trainer (tdr.guided.train) and the train/eval commands, on a tiny store."""

from __future__ import annotations

import importlib
import json
import math
import socket
import subprocess
import sys
from dataclasses import dataclass as _dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tdr.cache import open_store
from tdr.errors import TdrError
from tdr.cache.ingest import ingest
from tdr.cache.transfer import import_guidance
from tdr.guided.backbones import build_backbone, load_backbone_checkpoint
from tdr.guided.checkpoint import SCHEMA
from tdr.runs.checkpoint import load as load_file
from tdr.guided.config import ConfigError, TrainConfig
from tdr.runs.config import from_dict, load_toml, section
from tdr.guided.evaluate import load_run
from tdr.guided.train import train

torch.set_num_threads(2)
dataclass_frozen = _dataclass(frozen=True)


@pytest.fixture(scope="module")
def store(tmp_path_factory, make_tiny_store) -> str:
    base = tmp_path_factory.mktemp("store")
    return make_tiny_store(base / "data", str(base / "s.zarr"))


def cfg(store: str, out: Path, **kw) -> TrainConfig:
    base = dict(backbone="nafnet-test", store=store, out=str(out), iters=3, patch=32, batch_size=1,
                val_every=0, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_train_writes_run_and_learns(store, tmp_path):
    result = train(cfg(store, tmp_path / "run", iters=3, val_every=3))
    assert (tmp_path / "run" / "config.json").is_file()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["backbone"] == "nafnet-test" and saved["guidance"] == "cache" and saved["group"]
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert {"schema", "config", "step", "model", "optimizer", "scheduler", "rng", "ema"} <= set(ckpt)
    assert ckpt["schema"] == SCHEMA and ckpt["step"] == 3
    assert all(math.isfinite(v) for v in result.losses) and len(result.losses) == 3
    assert result.val and result.val[-1]["step"] == 3 and math.isfinite(result.val[-1]["psnr"])
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["event"] for e in log] == ["start", "step", "val", "checkpoint"]  # steps: every 10th and the last
    assert log[1]["step"] == 3 and log[1]["loss"] == result.losses[-1] and log[2]["psnr"] == result.val[-1]["psnr"]
    torch.manual_seed(0)
    fresh = build_backbone("nafnet-test", guided=True).state_dict()
    changed = [k for k, v in ckpt["model"].items() if v.is_floating_point() and not torch.equal(v, fresh[k])]
    assert any(not k.startswith("agg.") for k in changed) and any(k.startswith("agg.") for k in changed)


class Interrupt(Exception):
    pass


def test_resume_is_exact(store, tmp_path):
    whole = train(cfg(store, tmp_path / "a", iters=6, ema=0.9))

    def stop_at_4(event):
        if event["event"] == "step" and event["step"] == 4:
            raise Interrupt  # like Ctrl-C during step 4: last.pt holds step 3

    with pytest.raises(Interrupt):
        train(cfg(store, tmp_path / "b", iters=6, ema=0.9, save_every=3), progress=stop_at_4)
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["step"] == 3
    with pytest.raises(TdrError, match="resume"):
        train(cfg(store, tmp_path / "b", iters=6, ema=0.9))
    with pytest.raises(TdrError, match="lr"):
        train(cfg(store, tmp_path / "b", iters=6, ema=0.9, lr=0.1, resume=True))
    rest = train(cfg(store, tmp_path / "b", iters=6, ema=0.9, resume=True))
    assert rest.start_step == 3 and rest.step == 6
    assert rest.losses == whole.losses[3:]
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


@pytest.mark.parametrize("mode", ["none", "degraded", "cache"])
def test_guidance_modes(store, tmp_path, mode):
    result = train(cfg(store, tmp_path / mode, guidance=mode, iters=2, val_every=2))
    assert len(result.losses) == 2 and result.val
    model = torch.load(tmp_path / mode / "last.pt", weights_only=True)["model"]
    assert any(k.startswith("agg.") for k in model) == (mode != "none")


def test_init_from_unguided_run(store, tmp_path):
    train(cfg(store, tmp_path / "base", guidance="none", iters=1))
    base_ckpt = load_file(tmp_path / "base" / "last.pt")
    baseline = build_backbone("nafnet-test", guided=False)
    baseline.load_state_dict(base_ckpt["model"])
    guided = build_backbone("nafnet-test", guided=True)
    load_backbone_checkpoint(guided, base_ckpt)  # strict for the backbone
    x, g = torch.rand(1, 3, 40, 48), torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(guided.eval()(x, g), baseline.eval()(x), atol=1e-6)  # α = 0
    # the trainer's --init path: the first loss equals the baseline's loss on the same batch
    run = train(cfg(store, tmp_path / "guided", init=str(tmp_path / "base" / "last.pt"), iters=1))
    cont = train(cfg(store, tmp_path / "plain", guidance="none", iters=1,
                     init=str(tmp_path / "base" / "last.pt")))
    assert run.losses[0] == pytest.approx(cont.losses[0], abs=1e-6)
    with pytest.raises(TdrError, match="does not fit"):
        train(cfg(store, tmp_path / "bad", backbone="restormer-test", init=str(tmp_path / "base" / "last.pt")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_single_process_ddp_matches_plain(store, tmp_path, monkeypatch):
    plain = train(cfg(store, tmp_path / "plain", guidance="none", iters=2))
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(k, v)
    ddp = train(cfg(store, tmp_path / "ddp", guidance="none", iters=2))
    assert ddp.losses == pytest.approx(plain.losses, abs=1e-6)
    assert not torch.distributed.is_initialized()


def test_two_process_ddp_equals_one_process_with_the_global_batch(store, tmp_path):
    # torchrun, 2 CPU processes (gloo), batch 1 each = one process with batch 2: same samples (rank r
    # takes sample 2t + r at step t), averaged gradients, so the same weights after the same steps
    single = train(cfg(store, tmp_path / "single", iters=2, batch_size=2))
    code = f"""
import torch
torch.set_num_threads(1)
from tdr.guided.config import TrainConfig
from tdr.guided.train import train
train(TrainConfig(backbone="nafnet-test", store={store!r}, out={str(tmp_path / 'ddp')!r}, iters=2, patch=32,
                  batch_size=1, val_every=0, seed=0))
"""
    script = tmp_path / "ddp.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    a = torch.load(single.checkpoint, weights_only=True)
    b = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 2
    for k, v in a["model"].items():
        if v.is_floating_point():
            # Adam turns float-rounding differences of near-zero gradients into up to ~1e-4 here; a
            # missing all-reduce would differ by whole steps (lr 1e-3)
            assert torch.allclose(v, b["model"][k], atol=1e-4), k
    torch.manual_seed(0)
    init = build_backbone("nafnet-test", guided=True).state_dict()
    assert any(not torch.equal(v, init[k]) for k, v in a["model"].items() if v.is_floating_point())


def test_trainer_never_imports_diffusers(store, tmp_path):
    code = f"""
import sys, torch
torch.set_num_threads(1)
from tdr.guided.config import TrainConfig
from tdr.guided.train import train
from tdr.guided.evaluate import evaluate
from tdr.guided.config import EvalConfig
train(TrainConfig(backbone="nafnet-test", store={store!r}, out={str(tmp_path / 'r')!r}, iters=1, patch=32,
                  batch_size=1, val_every=1))
evaluate(EvalConfig(checkpoint={str(tmp_path / 'r' / 'last.pt')!r}, store={store!r}, limit=1))
bad = sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers') or m.startswith('tdr.pipeline'))
print('BAD', bad)
sys.exit(1 if bad else 0)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=80)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_config_file_and_unknown_keys(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\nbackbone = "nafnet-test"\niters = 7\nbetas = [0.9, 0.99]\n')
    config = from_dict(TrainConfig, section(load_toml(path), "train"))
    assert config.iters == 7 and config.betas == (0.9, 0.99)
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(TrainConfig, {"iter": 3})
    with pytest.raises(ConfigError, match="integer"):
        from_dict(TrainConfig, {"iters": "3"})
    assert replace(config, lr=2e-3).lrs == (2e-3, 1e-3)


# -- the commands ------------------------------------------------------------------------------------
def test_cli_train_then_eval(store, tmp_path):
    from tdr.cli import app

    runner = CliRunner()
    run = tmp_path / "run"
    toml = tmp_path / "c.toml"
    toml.write_text("patch = 32\nbatch_size = 1\n")
    res = runner.invoke(app, ["train", "--backbone", "nafnet-test", "--store", store, "--out", str(run),
                              "--iters", "1", "--val-every", "1", "--config", str(toml), "--match", "encoder",
                              "--transfer", "patch", "--alpha-lr", "0.01"])
    assert res.exit_code == 0, res.output
    assert "run " in res.stdout and (run / "last.pt").is_file()
    saved = json.loads((run / "config.json").read_text())
    assert saved["patch"] == 32 and saved["aggregation"]["match_features"] == "encoder"
    assert saved["aggregation"]["transfer"] == "patch"
    assert saved["alpha_lr"] == 0.01
    model, _ = load_run(run / "last.pt")  # eval rebuilds the aggregation the run trained
    assert model.agg.config.match_features == "encoder" and model.agg.config.transfer == "patch"
    res = runner.invoke(app, ["eval", "--checkpoint", str(run / "last.pt"), "--store", store,
                              "--json", str(tmp_path / "m.json"), "--grids", "2", "--out", str(tmp_path / "g")])
    assert res.exit_code == 0, res.output
    assert "PSNR" in res.stdout
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["n"] == 2 and math.isfinite(metrics["psnr"]) and 0 < metrics["ssim"] <= 1
    assert len(metrics["rows"]) == 2
    pngs = sorted((tmp_path / "g").glob("*.png"))
    assert len(pngs) == 2
    grid = np.asarray(Image.open(pngs[0]))
    from tdr.guided.evaluate import GRID_LABEL_HEIGHT  # a strip naming the panels above them

    assert grid.shape[:2] == (GRID_LABEL_HEIGHT + 40, 3 * 56 + 40 + 3 * 4)  # degraded | guidance | restored | clean
    assert (grid[:GRID_LABEL_HEIGHT] < 128).any()  # the names are drawn


@pytest.mark.parametrize("args,needle", [
    (["--backbone", "nafnet-tst"], "choose one of"),
    (["--store", "/nonexistent/x.zarr"], "No tdr store"),
    (["--patch", "500"], "smaller than patch 500; use a smaller patch. (option --patch)"),
    (["--guidance", "clean"], "guidance must be one of"),
    (["--match", "pixels"], "match_features must be one of image, encoder"),
    (["--transfer", "nearest"], "transfer must be one of bilinear, patch"),
])
def test_cli_bad_inputs(store, tmp_path, args, needle):
    from tdr.cli import app

    base = {"--backbone": "nafnet-test", "--store": store, "--out": str(tmp_path / "r"), "--iters": "1",
            "--patch": "32"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    res = CliRunner().invoke(app, ["train", *[x for kv in base.items() for x in kv]])
    assert res.exit_code != 0
    assert needle in res.stderr and "Traceback" not in res.output
    assert len(res.stderr.strip().splitlines()) == 1


# -- issue 14: damaged stores, checks before the first step, path options, messages -------------------
def _copy(store: str, tmp_path: Path) -> str:
    import shutil

    return shutil.copytree(store, tmp_path / "copy.zarr")


def _one_line_error(res, *needles: str) -> str:
    assert res.exit_code == 1, res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]  # beside a progress bar
    assert len(errors) == 1 and "Traceback" not in res.output, res.output
    text = errors[0]
    for needle in needles:
        assert needle in text, text
    return text


def test_eval_refuses_a_deleted_image_chunk(store, tmp_path):
    from tdr.cli import app

    url = str(_copy(store, tmp_path))
    train(cfg(url, tmp_path / "run", iters=1))
    Path(url, "test", "lq", "c", "1", "0", "0", "0").unlink()
    res = CliRunner().invoke(app, ["eval", "--checkpoint", str(tmp_path / "run" / "last.pt"), "--store", url])
    _one_line_error(res, "'im1'", "split 'test'", "tdr cache ingest --repair")


@pytest.mark.parametrize("workers", [0, 1])
def test_training_stops_on_a_damaged_chunk_and_keeps_its_steps(store, tmp_path, workers):
    from tdr.cache import DataIntegrityError
    from tdr.guided.data import TripleDataset

    url = str(_copy(store, tmp_path))
    row = TripleDataset(url, "train", patch=32, seed=0).image_for(2)  # read by step 3 (batch 1)
    chunk = Path(url, "guidance", open_store(url).guidance().id, "train", "c", str(row), "0", "0", "0")
    _flip_bytes(chunk)
    with pytest.raises(DataIntegrityError) as exc:
        train(cfg(url, tmp_path / "run", iters=8, workers=workers))
    text = str(exc.value)
    assert "\n" not in text and f"'{open_store(url)['train'].ids[row]}'" in text and "resume" in text
    assert "tdr generate-guidance" in text or "import-guidance" in text
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 2


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))


def test_validation_sizes_checked_before_the_first_step(tmp_path):
    from tdr.cache import create_store
    from tdr.cache.ingest import ingest_split

    @dataclass_frozen
    class Ref:
        array: np.ndarray

        def load(self):
            return self.array

    @dataclass_frozen
    class P:
        id: str
        lq: Ref
        gt: Ref
        gt_key: str

    rng = np.random.default_rng(0)
    url = str(tmp_path / "old.zarr")  # made before ingest refused small images
    st = create_store(url, dataset="folder", metric={"y_channel": False, "crop_border": 0})
    for split, side in (("train", 40), ("test", 8)):
        imgs = [rng.integers(0, 256, (side, 40, 3), dtype=np.uint8) for _ in range(2)]
        ingest_split(st, split, [P(f"{split}{k}", Ref(im), Ref(im), f"g{k}") for k, im in enumerate(imgs)])
    events = []
    with pytest.raises(TdrError, match="'test0'.*at least 11"):
        train(cfg(url, tmp_path / "run", guidance="none", iters=2, val_every=2), progress=events.append)
    assert not [e for e in events if e["event"] == "step"]


def test_path_options_are_checked_before_any_work(store, tmp_path, monkeypatch):
    from tdr.cli import app
    evaluate_mod = importlib.import_module("tdr.guided.evaluate")  # the module; tdr.guided.evaluate is the function

    runner = CliRunner()
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    res = runner.invoke(app, ["train", "--backbone", "nafnet-test", "--store", store, "--out", str(a_file),
                              "--iters", "1", "--patch", "32"])
    _one_line_error(res, "out ", "is a file")
    run = tmp_path / "run"
    train(cfg(store, run, iters=1))
    ckpt = str(run / "last.pt")
    res = runner.invoke(app, ["eval", "--checkpoint", ckpt, "--store", store, "--grids", "1", "--out", str(a_file)])
    _one_line_error(res, "--out", "is a file")
    monkeypatch.setattr(evaluate_mod, "load_run", lambda *a, **k: pytest.fail("evaluated before checking --json"))
    res = runner.invoke(app, ["eval", "--checkpoint", ckpt, "--store", store, "--json", str(tmp_path)])
    _one_line_error(res, "--json", "is a folder")
    res = runner.invoke(app, ["cache", "export", store, "--to", str(a_file)])
    _one_line_error(res, "is a file")


def test_unreadable_checkpoint_message_gives_no_unsafe_advice(store, tmp_path):
    from tdr.cli import app

    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    res = CliRunner().invoke(app, ["eval", "--checkpoint", str(junk), "--store", store])
    text = _one_line_error(res, "junk.pt", "not a torch checkpoint")
    assert "weights_only" not in text and "likely succeed" not in text


def test_ctrl_c_in_training_names_resume(store, tmp_path, monkeypatch):
    train_mod = importlib.import_module("tdr.guided.train")  # the module; tdr.guided.train is the function
    from tdr.cli import app

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "train", interrupted)
    res = CliRunner().invoke(app, ["train", "--backbone", "nafnet-test", "--store", store,
                                   "--out", str(tmp_path / "r"), "--iters", "1"])
    assert res.exit_code == 130
    assert "--resume" in res.stderr and "run the same command again to continue" not in res.stderr


def test_swap_gives_a_share_of_crops_another_images_guidance(store):
    from tdr.guided.data import TripleDataset

    own = TripleDataset(store, "train", patch=32, seed=0)
    half = TripleDataset(store, "train", patch=32, seed=0, swap=0.5)
    every = TripleDataset(store, "train", patch=32, seed=0, swap=1.0)
    swapped = 0
    for k in range(40):
        a, b, c = own[k], half[k], every[k]
        for item in (b, c):  # crops, flips and boxes do not depend on swap
            assert torch.equal(item["lq"], a["lq"]) and torch.equal(item["box"], a["box"])
        assert not torch.equal(c["guidance"], a["guidance"])
        swapped += not torch.equal(b["guidance"], a["guidance"])
    assert 10 <= swapped <= 30
    with pytest.raises(ValueError, match="swap"):
        TripleDataset(store, "train", patch=32, swap=1.5)


def test_items_carry_the_frame_around_their_crop(store):
    """context: every item also holds the degraded frame window around its crop, turned with it; the crop
    is that window at ``context_yx``; the crops do not depend on it; the window is no larger than the
    split's smallest image side (40 px here); none for unguided runs or a window no larger than the crop."""
    from tdr.guided.data import TripleDataset

    plain = TripleDataset(store, "train", patch=32, seed=0)
    wide = TripleDataset(store, "train", patch=32, seed=0, context=128)
    assert wide.context == 40 and plain.context == 0
    placed = set()
    for k in range(24):
        a, b = plain[k], wide[k]
        assert "context" not in a and torch.equal(a["lq"], b["lq"]) and torch.equal(a["box"], b["box"])
        y, x = (int(v) for v in b["context_yx"])
        assert b["context"].shape == (3, 40, 40) and 0 <= y <= 8 and 0 <= x <= 8
        assert torch.equal(b["context"][:, y:y + 32, x:x + 32], b["lq"])
        placed.add((y, x))
    assert len(placed) > 3  # crops lie at several places in their windows (edges, flips, rotations)
    assert TripleDataset(store, "train", patch=32, guidance="none", context=128).context == 0
    assert TripleDataset(store, "train", patch=40, context=40).context == 0
    with pytest.raises(ConfigError, match="context"):
        TripleDataset(store, "train", patch=32, context=-1)


def test_training_hands_the_frame_around_each_crop_to_the_global_search(store, tmp_path, monkeypatch):
    """The trainer passes each crop's window (as the dataset cut it) to a global-search model, and none
    with context 0 or to the prior search."""
    from tdr.guided.aggregation import DynamicAggregation

    seen = []
    original = DynamicAggregation.prepare

    def spy(self, x, guidance, input_hw, box=None, context=None):
        seen.append(None if context is None else (tuple(context.image.shape), context.yx.tolist()))
        return original(self, x, guidance, input_hw, box, context)

    monkeypatch.setattr(DynamicAggregation, "prepare", spy)
    train(cfg(store, tmp_path / "a", iters=2, batch_size=2))
    assert len(seen) == 2 and all(s is not None and s[0] == (2, 3, 40, 40) for s in seen)
    seen.clear()
    train(cfg(store, tmp_path / "b", iters=1, context=0))
    assert seen == [None]
    seen.clear()
    train(cfg(store, tmp_path / "c", iters=1, guidance="degraded"))  # aligned: the prior search
    assert seen == [None]
