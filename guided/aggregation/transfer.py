"""Transfers: G's features at one encoder level moved onto the input's grid by the match.

Every transfer has one signature, ``transfer(feat, flow, score, up) -> (B,C,h·2^up,w·2^up)``:
feat (B,C,Hg,Wg) G's features at the level (in the frame matching ran in); flow (B,2,h,w) float, each
match-level cell's displacement into that frame, in match-level cells; score (B,1,h,w) the match's
similarity, which weights the result; ``up`` = log2 of the level's scale relative to the match level
(> 0 finer, < 0 coarser). Sources outside G read zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .geometry import grid


def transfer_bilinear(feat, flow, score, up: int) -> torch.Tensor:
    """Sub-cell transfer (ours): G's features sampled bilinearly at p + flow, the flow carried to the
    level bilinearly (finer) or by pooling (coarser). Whole-cell moves leave up to half a cell of
    misalignment at full resolution, which costs about 0.2 dB even with perfect matches (BENCHMARKS.md)."""
    B, C, Hg, Wg = feat.shape
    h, w = flow.shape[-2:]
    if up >= 0:
        s = 2 ** up
        H, W = h * s, w * s
        if s > 1:
            flow = F.interpolate(flow, size=(H, W), mode="bilinear", align_corners=False) * s
            score = F.interpolate(score, size=(H, W), mode="bilinear", align_corners=False)
    else:
        f = 2 ** -up
        flow = F.avg_pool2d(flow, f, ceil_mode=True) / f
        score = F.avg_pool2d(score, f, ceil_mode=True)
        H, W = flow.shape[-2:]
    ys = torch.arange(H, device=flow.device, dtype=flow.dtype)[:, None] + flow[:, 0]
    xs = torch.arange(W, device=flow.device, dtype=flow.dtype)[None, :] + flow[:, 1]
    g = torch.stack([(xs + 0.5) / Wg * 2 - 1, (ys + 0.5) / Hg * 2 - 1], -1)
    # float32 positions: a bf16 grid would be off by about a pixel across a few hundred pixels
    out = F.grid_sample(feat.float(), g.float(), mode="bilinear", padding_mode="zeros", align_corners=False)
    return out * score


def transfer_patch(feat, flow, score, up: int) -> torch.Tensor:
    """Patch transfer of MASA-SR (Lu et al., CVPR 2021), as the paper uses it: at a finer level
    (s = 2^up) every match cell's 3s×3s patch (stride s) is moved by s·round(flow) and the overlaps are
    averaged (fold); coarser levels take the rounded displacement of the cell's centre."""
    B, C, Hg, Wg = feat.shape
    disp = flow.round().long()
    h, w = disp.shape[-2:]
    flat = torch.cat([feat.flatten(2), feat.new_zeros(B, C, 1)], 2)  # last column: zero for outside

    def gather(src_y, src_x):  # (B,H,W) long → (B,C,H,W)
        inside = (src_y >= 0) & (src_y < Hg) & (src_x >= 0) & (src_x < Wg)
        idx = torch.where(inside, src_y * Wg + src_x, Hg * Wg)
        H, W = idx.shape[-2:]
        return flat.gather(2, idx.view(B, 1, H * W).expand(B, C, H * W)).view(B, C, H, W)

    if up <= 0:
        f = 2 ** -up
        H, W = -(-h // f), -(-w // f)
        y, x = grid(H, W, disp.device)[0]
        d = disp[:, :, (y * f + f // 2).clamp(max=h - 1), (x * f + f // 2).clamp(max=w - 1)]
        d = torch.div(d + f // 2, f, rounding_mode="floor")
        out = gather(y + d[:, 0], x + d[:, 1])
        return out * (F.avg_pool2d(score, f, ceil_mode=True) if f > 1 else score)
    s = 2 ** up
    H, W = h * s, w * s
    y, x = grid(H, W, disp.device)[0]
    cy, cx = y // s, x // s
    acc, count = 0, 0
    for oy in (-1, 0, 1):
        for ox in (-1, 0, 1):
            ny, nx = cy + oy, cx + ox
            ok = ((ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)).to(feat.dtype)  # neighbour exists in X
            d = disp[:, :, ny.clamp(0, h - 1), nx.clamp(0, w - 1)]  # (B,2,H,W)
            src_y, src_x = y + s * d[:, 0], x + s * d[:, 1]
            big = torch.full_like(src_y, -1)
            keep = ok.bool()[None]
            acc = acc + gather(torch.where(keep, src_y, big), torch.where(keep, src_x, big))
            count = count + ok
    weight = F.interpolate(score, size=(H, W), mode="bilinear", align_corners=False) / count
    return acc * weight


@dataclass(frozen=True)
class Transfer:
    fn: Callable[..., torch.Tensor]
    subcell: bool  # whether the flow it receives carries sub-cell offsets (features.subcell)


TRANSFERS: dict[str, Transfer] = {
    "bilinear": Transfer(transfer_bilinear, subcell=True),
    "patch": Transfer(transfer_patch, subcell=False),
}
