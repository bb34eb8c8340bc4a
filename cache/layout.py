"""What a guidance image shows of its degraded frame: the contract between the two halves.

The generation half makes each guidance image from one rectangle of the frame, and the restoration half
must know which: ``"center"``, the centre square of side min(H, W) (the paper's scripts crop it so),
or ``"full"``, the whole frame squashed to a square. A store records the layout in each guidance group's
fingerprint; both halves take the rectangle from :func:`layout_box`.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError

LAYOUTS = ("center", "full")
DEFAULT_LAYOUT = "center"


def check_layout(layout: str) -> str:
    """``layout`` itself when it is one of ``LAYOUTS``; otherwise a ConfigError naming the choices."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}.", param="layout")
    return layout


def layout_box(layout: str, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) in pixels of the part of a ``height`` × ``width`` frame its guidance shows.

    "center": the square of side min(H, W) whose offsets are rounded down, as the crop takes it;
    "full": the whole frame.
    """
    if check_layout(layout) == "full":
        return 0, 0, int(height), int(width)
    side = min(int(height), int(width))
    return (int(height) - side) // 2, (int(width) - side) // 2, side, side


def layout_region(image: np.ndarray, layout: str) -> np.ndarray:
    """The part of an (H, W, C) image its guidance shows (a view, not a copy)."""
    top, left, h, w = layout_box(layout, *image.shape[:2])
    return image[top:top + h, left:left + w]
