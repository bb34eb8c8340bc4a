"""Fixture trees in each real layout → `tdr cache ingest` → `info` counts match, `verify` passes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image
from typer.testing import CliRunner

from tdr.cache import open_store
from tdr.cli import app

runner = CliRunner()


def img(path: Path, h: int = 20, w: int = 24, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(str(path.name))) % 2**32 + seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def gopro_original(root: Path) -> dict:
    for split, scenes in (("train", ["GOPR0372_07_00", "GOPR0374_11_00"]), ("test", ["GOPR0384_11_00"])):
        for scene in scenes:
            for name in ("000001", "000002"):
                for folder in ("blur", "blur_gamma", "sharp"):
                    img(root / split / scene / folder / f"{name}.png", 36, 64)
    return {"train": (4, 4), "test": (2, 2)}


def gopro_repacked(root: Path) -> dict:
    for split, n in (("train", 3), ("test", 2)):
        for k in range(n):
            for side in ("input", "target"):
                img(root / split / side / f"GOPR0384_11_00-{k:06d}.png", 36, 64)
    return {"train": (3, 3), "test": (2, 2)}


def sots_indoor(root: Path) -> dict:
    for i in (1400, 1401):
        img(root / "gt" / f"{i}.png", 24, 28)           # larger GT: centre-cropped to the hazy size
        for j in (1, 2, 3):
            img(root / "hazy" / f"{i}_{j}.png", 20, 22)
    return {"test": (6, 2)}


def ddn(root: Path) -> dict:
    for i in (899, 900, 901):
        img(root / "ground_truth" / f"{i}.jpg")
        for j in (1, 2, 14):
            img(root / "rainy_image" / f"{i}_{j}.jpg")
    return {"train": (6, 2), "test": (3, 1)}


def did(root: Path) -> dict:
    for k in range(3):
        img(root / "training" / f"{k}.jpg", 16, 40)
    for k in range(2):
        img(root / "test" / f"{k}.jpg", 16, 40)
    return {"train": (3, 3), "test": (2, 2)}


def rain200h(root: Path) -> dict:
    for split, ns in (("train", (1, 2, 3)), ("test", (1, 2))):
        for n in ns:
            img(root / split / "rain" / "X2" / f"norain-{n}x2.png")
            img(root / split / "norain" / f"norain-{n}.png")
    return {"train": (3, 3), "test": (2, 2)}


def sidd(root: Path) -> dict:
    data = root / "SIDD_Medium_Srgb" / "Data"
    for scene in ("0001_001_S6_00100_00060_3200_L", "0002_001_S6_00100_00020_3200_N"):
        img(data / scene / f"{scene[:4]}_NOISY_SRGB_010.PNG")
        img(data / scene / f"{scene[:4]}_GT_SRGB_010.PNG")
    rng = np.random.default_rng(0)
    for key, name in (("ValidationNoisyBlocksSrgb", "ValidationNoisyBlocksSrgb.mat"),
                      ("ValidationGtBlocksSrgb", "ValidationGtBlocksSrgb.mat")):
        scipy.io.savemat(root / name, {key: rng.integers(0, 256, (2, 2, 16, 16, 3), dtype=np.uint8)})
    return {"train": (2, 2), "test": (4, 4)}


CASES = {
    "gopro": gopro_original,
    "gopro-repacked": gopro_repacked,
    "sots-indoor": sots_indoor,
    "ddn": ddn,
    "did": did,
    "rain200h": rain200h,
    "sidd": sidd,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fixture_tree_ingests_with_matching_counts(tmp_path, case):
    root = tmp_path / "data"
    expected = CASES[case](root)
    dataset = case.removesuffix("-repacked")
    store = str(tmp_path / "s.zarr")
    result = runner.invoke(app, ["cache", "ingest", "--dataset", dataset, "--root", str(root), "--store", store])
    assert result.exit_code == 0, result.output
    facts = json.loads(runner.invoke(app, ["cache", "info", store, "--json"]).output)
    got = {s: (v["images"], v["clean_images"]) for s, v in facts["splits"].items()}
    assert got == expected
    verify = runner.invoke(app, ["cache", "verify", store])
    assert verify.exit_code == 0 and "ok:" in verify.output
    st = open_store(store)
    for split in expected:
        sp = st[split]
        for i in range(len(sp)):
            assert sp.read_lq(i).shape[:2] == sp.read_gt(i).shape[:2] == sp.lq_size(i)


def test_ingesting_twice_keeps_the_store_and_different_images_are_refused(tmp_path):
    root = tmp_path / "data"
    rain200h(root)
    store = str(tmp_path / "s.zarr")
    args = ["cache", "ingest", "--dataset", "rain200h", "--root", str(root), "--store", store]
    assert runner.invoke(app, args).exit_code == 0
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "present" in again.output
    img(root / "test" / "rain" / "X2" / "norain-9x2.png")
    img(root / "test" / "norain" / "norain-9.png")
    refused = runner.invoke(app, args)
    assert refused.exit_code == 1 and "other images" in refused.output
    assert len(open_store(store)["test"]) == 2


def test_size_mismatch_names_the_pair(tmp_path):
    root = tmp_path / "data"
    rain200h(root)
    img(root / "test" / "norain" / "norain-2.png", 30, 30)
    result = runner.invoke(app, ["cache", "ingest", "--dataset", "rain200h", "--root", str(root),
                                 "--store", str(tmp_path / "s.zarr")])
    assert result.exit_code == 1 and "norain-2" in result.output and "Size mismatch" in result.output
