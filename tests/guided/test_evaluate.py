"""Fast CPU tests of full-image evaluation (tdr.guided.evaluate)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tdr.cache import open_store
from tdr.errors import TdrError
from tdr.cache.ingest import ingest
from tdr.cache.store import create_store
from tdr.cache.transfer import import_guidance
from tdr.guided.backbones import build_backbone
from tdr.guided.config import ConfigError, EvalConfig, TrainConfig
from tdr.guided.evaluate import evaluate, load_run, restore, to_tensor
from tdr.guided.metrics import psnr, ssim
from tdr.guided.train import train

torch.set_num_threads(2)


def make_y_store(root: Path, url: str) -> str:
    """A `folder` store whose metric convention is Y-channel PSNR/SSIM with a 2-px border crop."""
    rng = np.random.default_rng(1)
    for split, n in (("train", 2), ("test", 2)):
        for k in range(n):
            h, w = 40, 48 + 8 * k
            yy, xx = np.mgrid[:h, :w]
            gt = np.stack([(xx * 5) % 256, (yy * 4 + k * 30) % 256, ((xx - yy) * 3) % 256], -1).astype(np.uint8)
            lq = np.clip(gt + rng.normal(0, 12, gt.shape), 0, 255).astype(np.uint8)
            for kind, img in (("lq", lq), ("gt", gt), ("guidance", gt)):
                (root / split / kind).mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(root / split / kind / f"im{k}.png")
    create_store(url, dataset="folder", metric={"y_channel": True, "crop_border": 2, "ssim": "basicsr"})
    ingest("folder", str(root), url)
    store = open_store(url, "a")
    for split in ("train", "test"):
        import_guidance(store, split, root / split / "guidance")
    return url


def _perturbed(guided: bool) -> torch.nn.Module:
    """A tiny NAFNet whose zero-initialised residual scales are set, so every block (and the global
    channel attention) shapes the output; its last conv is scaled down so that, like a trained restorer,
    it outputs the input plus a modest residual."""
    torch.manual_seed(0)
    model = build_backbone("nafnet-test", guided=guided)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("beta", "gamma", "alpha")):
                p.normal_(0, 0.05)
        model.ending.weight.mul_(0.1)
    return model.eval()


@pytest.mark.parametrize("guided", [False, True])
def test_tiled_equals_whole(guided):
    model = _perturbed(guided)
    torch.manual_seed(1)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 96), torch.linspace(0, 1, 120), indexing="ij")
    lq = torch.stack([yy, xx, (yy + xx) / 2])[None] * 0.8 + 0.1 + 0.02 * torch.rand(1, 3, 96, 120)
    g = torch.rand(1, 3, 64, 64) if guided else None
    whole = restore(model, lq, g)
    tiled = restore(model, lq, g, tile=64, overlap=32)
    assert tiled.shape == whole.shape == lq.shape
    diff = (tiled - whole).abs()
    assert float(diff.mean()) < 2e-3 and psnr(tiled[0], whole[0]) > 40
    assert not torch.equal(whole, lq.clamp(0, 1))  # the perturbed net does something


def test_eval_uses_store_convention(tmp_path):
    url = make_y_store(tmp_path / "data", str(tmp_path / "y.zarr"))
    assert open_store(url).metric["y_channel"] is True
    train(TrainConfig(backbone="nafnet-test", store=url, out=str(tmp_path / "run"), iters=1, patch=32,
                      batch_size=1, val_every=0))
    ckpt = tmp_path / "run" / "last.pt"
    result = evaluate(EvalConfig(checkpoint=str(ckpt), store=url, grids=1, out=str(tmp_path / "g")))
    assert result.n == 2
    assert {k: result.metric[k] for k in ("y_channel", "crop_border", "ssim")} == {
        "y_channel": True, "crop_border": 2, "ssim": "basicsr"}
    # recompute image 0 by hand with the Y-channel convention
    model, _ = load_run(ckpt)
    sp, gs = open_store(url)["test"], open_store(url).guidance()
    pred = restore(model, to_tensor(sp.read_lq(0)), to_tensor(gs.read("test", 0)))[0]
    gt = torch.from_numpy(sp.read_gt(0).transpose(2, 0, 1).copy())
    row = result.rows[0]
    assert row["psnr"] == pytest.approx(psnr(pred, gt, y_channel=True, crop_border=2), abs=1e-9)
    assert row["ssim"] == pytest.approx(ssim(pred, gt, y_channel=True, crop_border=2), abs=1e-9)
    assert row["psnr"] != pytest.approx(psnr(pred, gt), abs=1e-3)  # RGB would differ
    assert len(result.grids) == 1 and Path(result.grids[0]).is_file()
    tiled = evaluate(EvalConfig(checkpoint=str(ckpt), store=url, tile=32, overlap=16, limit=1))
    assert tiled.n == 1 and abs(tiled.rows[0]["psnr"] - row["psnr"]) < 1.0


def test_eval_official_plain_weights(tmp_path):
    # official NAFNet/Restormer files are {"params": state_dict}; scored as the plain backbone
    url = make_y_store(tmp_path / "data", str(tmp_path / "y.zarr"))
    model = _perturbed(guided=False)
    path = tmp_path / "NAFNet-official.pth"
    torch.save({"params": model.state_dict()}, path)
    result = evaluate(EvalConfig(checkpoint=str(path), store=url, backbone="nafnet-test", limit=1))
    sp = open_store(url)["test"]
    pred = restore(model, to_tensor(sp.read_lq(0)), None)[0]
    gt = torch.from_numpy(sp.read_gt(0).transpose(2, 0, 1).copy())
    assert result.guidance == "none" and result.n == 1
    assert result.rows[0]["psnr"] == pytest.approx(psnr(pred, gt, y_channel=True, crop_border=2), abs=1e-9)
    with pytest.raises(TdrError, match="name their backbone") as refused:
        evaluate(EvalConfig(checkpoint=str(path), store=url))
    assert refused.value.param == "backbone"
    with pytest.raises(TdrError, match="does not fit"):
        evaluate(EvalConfig(checkpoint=str(path), store=url, backbone="restormer-test"))
    with pytest.raises(TdrError, match="choose one of"):
        evaluate(EvalConfig(checkpoint=str(path), store=url, backbone="nafnet-tst"))


def test_eval_config_checks():
    with pytest.raises(ConfigError, match="overlap"):
        EvalConfig(tile=32, overlap=32)
