"""Fast CPU tests of the trainer (tdr.guided.train) and the train/eval commands, on a tiny store."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tdr.cache import open_store
from tdr.cache.errors import TdrError
from tdr.cache.ingest import ingest
from tdr.cache.transfer import import_guidance
from tdr.guided.backbones import build_backbone, load_backbone_checkpoint
from tdr.guided.checkpoint import load_file
from tdr.guided.config import ConfigError, TrainConfig, from_mapping, load_toml, section
from tdr.guided.evaluate import load_run
from tdr.guided.train import train

torch.set_num_threads(2)


def make_store(root: Path, url: str, *, n_train: int = 4, n_test: int = 2) -> str:
    """A `folder` dataset of smooth synthetic images (degraded = darker + noise), clean images as guidance."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for k in range(n):
            h, w = 40 + 8 * k, 56
            yy, xx = np.mgrid[:h, :w]
            gt = np.stack([(xx * 4 + k * 10) % 256, (yy * 5) % 256, ((xx + yy) * 3) % 256], -1).astype(np.uint8)
            lq = np.clip(gt * 0.7 + 20 + rng.normal(0, 5, gt.shape), 0, 255).astype(np.uint8)
            for kind, img in (("lq", lq), ("gt", gt), ("guidance", gt)):
                folder = root / split / kind
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(folder / f"im{k}.png")
    ingest("folder", str(root), url)
    store = open_store(url, "a")
    for split in ("train", "test"):
        import_guidance(store, split, root / split / "guidance")
    return url


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    base = tmp_path_factory.mktemp("store")
    return make_store(base / "data", str(base / "s.zarr"))


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
    assert ckpt["schema"] == 2 and ckpt["step"] == 3
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
    with pytest.raises(TdrError, match="--resume"):
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
    config = from_mapping(TrainConfig, section(load_toml(path), "train"))
    assert config.iters == 7 and config.betas == (0.9, 0.99)
    with pytest.raises(ConfigError, match="unknown key"):
        from_mapping(TrainConfig, {"iter": 3})
    with pytest.raises(ConfigError, match="integer"):
        from_mapping(TrainConfig, {"iters": "3"})
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
    assert saved["patch"] == 32 and saved["match"] == "encoder" and saved["transfer"] == "patch"
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
    assert grid.shape[:2] == (40, 3 * 56 + 40 + 3 * 4)  # degraded | guidance (square) | restored | clean


@pytest.mark.parametrize("args,needle", [
    (["--backbone", "nafnet-tst"], "choose one of"),
    (["--store", "/nonexistent/x.zarr"], "No tdr store"),
    (["--patch", "500"], "smaller than --patch"),
    (["--guidance", "clean"], "guidance must be one of"),
    (["--match", "pixels"], "match must be one of image, encoder"),
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
