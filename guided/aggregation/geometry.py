"""Where the guidance lies relative to the input: layout boxes, coordinate maps, frames."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...cache.layout import LAYOUTS, layout_box  # noqa: F401  (LAYOUTS: the layouts guidance_box takes)


@dataclass
class Matches:
    """The last matching, detached, for measuring it (match level of the padded input frame)."""

    x_yx: torch.Tensor  # (B,2,h,w) float: centre of each match-level cell, input pixel coords (y, x)
    g_yx: torch.Tensor  # (B,2,h,w) float: its matched location, guidance pixel coords (y, x)
    score: torch.Tensor  # (B,1,h,w) float: cosine similarity of the match (0 where invalid)
    valid: torch.Tensor  # (B,1,h,w) bool: the cell lies inside the input (and, prior search, inside the box)
    stride: int  # input pixels per match-level cell


@dataclass
class Context:
    """The degraded frame around each input of a batch (training crops): the global search's coarse
    stage scores candidates on it, so a crop is placed in G as the whole frame around it would be, not
    from the few cells a crop holds. The search's output still covers the input only."""

    image: torch.Tensor  # (B,3,Hc,Wc) in [0,1], the frame window holding the input
    yx: torch.Tensor  # (B,2) the input's top-left corner inside it (pixels, y x)


def guidance_box(layout: str, frame_hw: tuple[int, int], *, crop_yx: tuple[float, float] = (0, 0),
                 batch: int = 1, device=None) -> torch.Tensor:
    """Box (B,4) = (top, left, height, width) in input pixels that the guidance of a frame is about.

    ``frame_hw`` is the full degraded frame the guidance was made from; ``crop_yx`` the top-left corner
    of the input inside that frame when the input is a crop of it (training patches). For generated
    guidance the box gives the scale of the content (and, for the prior search only, its place).
    """
    top, left, h, w = layout_box(layout, *frame_hw)  # the rectangle the generation half made it from
    box = torch.tensor([top - crop_yx[0], left - crop_yx[1], h, w], dtype=torch.float32, device=device)
    return box.expand(batch, 4).clone()


def input_to_guidance(yx: torch.Tensor, box: torch.Tensor, guidance_hw: tuple[int, int]) -> torch.Tensor:
    """Map input pixel coords (B,2,...) to guidance pixel coords through ``box`` (B,4) (pixel centres)."""
    shape = (yx.shape[0], 2) + (1,) * (yx.dim() - 2)
    origin, size = box[:, :2].reshape(shape), box[:, 2:].reshape(shape)
    g_size = torch.tensor(guidance_hw, dtype=yx.dtype, device=yx.device).reshape((1, 2) + shape[2:])
    return (yx + 0.5 - origin) / size * g_size - 0.5


def inside_box(box: torch.Tensor, hw: tuple[int, int], stride: int) -> torch.Tensor:
    """(B,1,h,w) bool: the centre of each cell of a level (``stride`` input pixels) lies in ``box``."""
    c = grid(*hw, box.device) * stride + (stride - 1) / 2 + 0.5
    y0, x0, bh, bw = (box[:, i, None, None, None] for i in range(4))
    return (c[:, :1] >= y0) & (c[:, :1] <= y0 + bh) & (c[:, 1:] >= x0) & (c[:, 1:] <= x0 + bw)


def frame_pixels(h: int, w: int, margin: int, device) -> torch.Tensor:
    """(1,2,h+2m,w+2m) float: input pixel coords (y, x) of a frame that starts ``margin`` px before (0, 0)."""
    return grid(h + 2 * margin, w + 2 * margin, device).float() - margin


def sample_coords(coords: torch.Tensor, yx: torch.Tensor) -> torch.Tensor:
    """Read a coordinate field (B,2,H,W) at frame pixel positions ``yx`` (B,2,h,w) (bilinear, edges
    extended): exact wherever the field is affine, as every placement's is piecewise."""
    H, W = coords.shape[-2:]
    gx = (yx[:, 1] + 0.5) / W * 2 - 1
    gy = (yx[:, 0] + 0.5) / H * 2 - 1
    return F.grid_sample(coords.float(), torch.stack([gx, gy], -1).float(), mode="bilinear",
                         padding_mode="border", align_corners=False)


def pad_to(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Pad (B,C,H,W) at the bottom/right to ``hw``: reflect where possible, else replicate."""
    ph, pw = hw[0] - x.shape[-2], hw[1] - x.shape[-1]
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < x.shape[-2] and pw < x.shape[-1] else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def crop(x: torch.Tensor, m: int) -> torch.Tensor:
    """(…,H,W) without ``m`` rows/columns on each side."""
    return x[..., m:x.shape[-2] - m, m:x.shape[-1] - m] if m else x


def grid(h: int, w: int, device) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([ys, xs])[None]  # (1,2,h,w) long
