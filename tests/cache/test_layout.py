"""The guidance layout (tdr.cache.layout): one rectangle of the frame, taken alike by both halves."""

from __future__ import annotations

import numpy as np
import pytest

from tdr.cache.layout import LAYOUTS, layout_box, layout_region
from tdr.errors import ConfigError


def test_layout_box_is_the_centre_square_or_the_frame():
    assert layout_box("center", 5, 8) == (0, 1, 5, 5)
    assert layout_box("center", 9, 4) == (2, 0, 4, 4)  # odd margins: the offset is rounded down
    assert layout_box("full", 5, 8) == (0, 0, 5, 8)
    with pytest.raises(ConfigError, match="layout must be one of center, full") as refused:
        layout_box("diagonal", 5, 8)
    assert refused.value.param == "layout" and isinstance(refused.value, ValueError)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_both_halves_take_the_region_the_layout_names(layout):
    from tdr.guided.aggregation import guidance_box
    from tdr.guided.data import layout_square
    from tdr.pipeline.clip import square, to_tensor

    img = np.random.default_rng(0).integers(0, 256, (7, 12, 3), dtype=np.uint8)
    region = layout_region(img, layout)
    top, left, h, w = layout_box(layout, 7, 12)
    np.testing.assert_array_equal(region, img[top:top + h, left:left + w])
    seen = square(to_tensor(img, "cpu"), layout)[0].mul(255).round().byte().permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(seen, region)  # what CLIP sees when guidance is made
    assert guidance_box(layout, (7, 12)).tolist() == [[float(top), float(left), float(h), float(w)]]
    laid_out = layout_square(img, 16, layout)  # the degraded image laid out as guidance
    assert laid_out.shape == (16, 16, 3) and laid_out.dtype == np.uint8
    if layout == "center":
        assert not np.array_equal(laid_out, layout_square(img, 16, "full"))
