"""Stand-ins with known truth: placed views (content views put back by their truth, the ceiling of matching)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tdr.cache import open_store
from tdr.guided.synthetic import ViewRanges, content_view, make_guidance, placed_view


def _photo(h=96, w=128):
    """A natural photograph (scikit-image's bundled 'astronaut'), (h,w,3) uint8."""
    from skimage import data
    return np.array(Image.fromarray(data.astronaut()).resize((w, h), Image.Resampling.BICUBIC))


@pytest.mark.parametrize("mirror", [0.0, 1.0])
def test_a_placed_view_shows_the_clean_image_where_the_view_shows_it(mirror):
    """Without colour jitter, a content view put back by its truth is the clean image again (up to the
    two bilinear resamplings) wherever the view shows the frame, and exactly the degraded input elsewhere."""
    clean = _photo()
    lq = np.clip(clean * 0.6 + 30, 0, 255).astype(np.uint8)
    ranges = ViewRanges(shift=(0.3, 0.3), scale=(1.2, 1.2), mirror=mirror, gain=(1.0, 1.0), bias=0.0)
    view, A = content_view(clean, np.random.default_rng(4), ranges, size=256)
    placed = placed_view(view, A, lq)
    assert placed.shape == clean.shape and placed.dtype == np.uint8
    shown = np.any(placed != lq, -1)
    assert 0.3 < shown.mean() < 0.95  # moved by 30 %: part of the frame lies outside the view
    inner = shown.copy()  # away from the edge of what the view shows, where bilinear mixes in its border
    for axis in (0, 1):
        inner &= np.roll(shown, 2, axis) & np.roll(shown, -2, axis)
    err = np.abs(placed.astype(int) - clean.astype(int))[inner]
    assert err.mean() < 4.0, err.mean()
    assert np.array_equal(placed[~shown], lq[~shown])
    # a view that is not put back by its own truth is not the clean image
    wrong = placed_view(view, A + np.array([[0, 0, 20.0], [0, 0, -20.0]]), lq)
    assert np.abs(wrong.astype(int) - clean.astype(int))[inner & np.any(wrong != lq, -1)].mean() > 3 * err.mean()


def test_make_guidance_places_the_same_views_and_imports_them_aligned_over_the_whole_frame(tmp_path, make_tiny_store):
    """The placed group shows the content views of the same seed (same truth), put back over the whole
    frame: provenance aligned, layout full, so the trainer's auto search reads it where it lies."""
    url = make_tiny_store(tmp_path / "data", str(tmp_path / "s.zarr"), n_train=2, n_test=2)
    views = make_guidance(url, tmp_path / "views", "views", seed=5, force=True)
    placed = make_guidance(url, tmp_path / "placed", "placed", seed=5, force=True)
    assert json.dumps(views, sort_keys=True) == json.dumps(placed, sort_keys=True)
    store = open_store(url)
    gid = next(g for g in store.guidance_ids() if store.guidance(g).fingerprint.get("label") == "stand-in:placed")
    group = store.guidance(gid)
    assert (group.provenance, group.layout) == ("aligned", "full")
    sp = store["test"]
    for i, image_id in enumerate(sp.ids):
        written = np.asarray(Image.open(tmp_path / "placed" / "test" / f"{image_id}.png"))
        assert written.shape == sp.read_lq(i).shape  # the input's own frame
        view = np.asarray(Image.open(tmp_path / "views" / "test" / f"{image_id}.png"))
        assert np.array_equal(written, placed_view(view, np.asarray(views["test"][image_id]["A"]), sp.read_lq(i)))
        assert group.read("test", i).shape[:2] == (group.size, group.size)
