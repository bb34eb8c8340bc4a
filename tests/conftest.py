"""Fixtures shared by the test folders (``cache/``, ``pipeline/``, ``guided/`` and the top-level tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tdr.cache import open_store
from tdr.cache.ingest import ingest
from tdr.cache.transfer import import_guidance


def _make_store(root: Path, url: str, *, n_train: int = 4, n_test: int = 2) -> str:
    """A `folder` dataset of smooth synthetic images (degraded = darker + noise) of 40–64 × 56 px in
    ``root``, ingested into a store at ``url`` with the clean images imported as its guidance."""
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


@pytest.fixture(scope="session")
def make_tiny_store():
    """``make_tiny_store(root, url, *, n_train=4, n_test=2) -> url``: a tiny store with guidance."""
    return _make_store
