"""What is compared when matching: fixed image features, 3×3-patch cosines, sub-cell peaks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .geometry import grid


def image_features(img: torch.Tensor, level: int) -> torch.Tensor:
    """Fixed matching features at one level: local-contrast-normalised colour gradients of the image
    averaged down to the level's scale, (B,6,⌈H/2^l⌉,⌈W/2^l⌉). They ignore brightness, contrast and colour
    shifts (haze, colour casts, a generated image's palette) and average out noise and rain streaks."""
    f = F.avg_pool2d(img, 2 ** level, ceil_mode=True) if level else img
    gy = F.pad(f[..., 1:, :] - f[..., :-1, :], (0, 0, 0, 1))
    gx = F.pad(f[..., :, 1:] - f[..., :, :-1], (0, 1))
    grad = torch.cat([gy, gx], 1)
    scale = F.avg_pool2d(grad.pow(2).mean(1, keepdim=True), 9, 1, 4, count_include_pad=False).sqrt()
    return grad / (scale + 1e-3)


def patch_norm(f: torch.Tensor, dilation: int = 1) -> torch.Tensor:
    """L2 norm of every (dilated, zero-padded) 3×3 patch of (B,C,H,W) → (B,1,H,W)."""
    sq = f.pow(2).sum(1, keepdim=True)
    ones = sq.new_ones(1, 1, 3, 3)
    return F.conv2d(sq, ones, padding=dilation, dilation=dilation).clamp_min(1e-12).sqrt()


def box_sum(t: torch.Tensor, k: int) -> torch.Tensor:
    """Sum over every k×k neighbourhood (k odd, zeros outside) of the last two dims of any (…,h,w):
    shifted adds for small k, running sums for large (a 1-channel conv2d is far slower on CPU)."""
    r = k // 2
    for dim in (-2, -1):
        n = t.shape[dim]
        if n == 0 or r == 0:
            continue
        if k <= 7:
            out = t.clone()
            for s in range(1, r + 1):
                if s >= n:
                    break
                out.narrow(dim, 0, n - s).add_(t.narrow(dim, s, n - s))
                out.narrow(dim, s, n - s).add_(t.narrow(dim, 0, n - s))
            t = out
        else:
            c = F.pad(t.movedim(dim, -1), (r + 1, r)).cumsum(-1)
            t = (c[..., k:k + n] - c[..., :n]).movedim(-1, dim)
    return t


def box3(t: torch.Tensor) -> torch.Tensor:
    """Sum over every 3×3 neighbourhood (zeros outside) of the last two dims of any (…,h,w)."""
    return box_sum(t, 3)


def patch_cosine(fx: torch.Tensor, fg: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Cosine similarity (B,1,h,w) of X's 3×3 patch at each position and G's at ``q`` (B,2,h,w); X's
    patches end at X's edges, and G's norm is taken over the same cells."""
    B, C, h, w = fx.shape
    hg, wg = fg.shape[-2:]
    fxp, fgp = F.pad(fx, (1, 1, 1, 1)), F.pad(fg, (1, 1, 1, 1)).flatten(2)
    sqp = F.pad(fg.pow(2).sum(1, keepdim=True), (1, 1, 1, 1)).flatten(2)
    in_x = F.pad(fx.new_ones(1, 1, h, w), (1, 1, 1, 1))
    dot, ng2 = 0, 0
    for u in range(3):
        for v in range(3):
            idx = ((q[:, 0] + u) * (wg + 2) + q[:, 1] + v).view(B, 1, h * w)
            g = fgp.gather(2, idx.expand(B, C, h * w)).view(B, C, h, w)
            dot = dot + (fxp[:, :, u:u + h, v:v + w] * g).sum(1, keepdim=True)
            ng2 = ng2 + sqp.gather(2, idx).view(B, 1, h, w) * in_x[:, :, u:u + h, v:v + w]
    return dot / (patch_norm(fx) * ng2.clamp_min(1e-12).sqrt())


def subcell(fx: torch.Tensor, fg: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Displacement field (B,2,h,w) float in cells: ``q − p`` plus a sub-cell offset per axis from a
    parabola through the 3×3-patch cosines at q − 1, q, q + 1 (clamped to ±½; none where a neighbour
    falls outside G or the peak is not a maximum), averaged over the 3×3 neighbourhood of cells weighted
    by the peak's sharpness — only over neighbours whose whole-cell match agrees with the cell's own
    (within one cell): across a boundary between regions matched elsewhere nothing is averaged."""
    hg, wg = fg.shape[-2:]
    B, _, h, w = q.shape
    c0 = patch_cosine(fx, fg, q)
    disp = q - grid(h, w, q.device)
    flow = disp.to(c0.dtype)

    def around(t, fill):  # (B,1,h,w) → its 3×3 neighbourhood (B,9,h,w), ``fill`` outside
        return F.pad(t, (1, 1, 1, 1), value=fill).unfold(2, 3, 1).unfold(3, 3, 1).reshape(B, h, w, 9).permute(0, 3, 1, 2)

    # neighbours whose whole-cell displacement agrees with the cell's (a missing neighbour never does)
    agree = ((around(flow[:, :1], 1e9) - flow[:, :1]).abs() <= 1) & ((around(flow[:, 1:], 1e9) - flow[:, 1:]).abs() <= 1)
    out = []
    for axis, size in ((0, hg), (1, wg)):
        step = torch.zeros_like(q)
        step[:, axis] = 1
        ok = (q[:, axis:axis + 1] > 0) & (q[:, axis:axis + 1] < size - 1)
        lo = patch_cosine(fx, fg, torch.where(ok, q - step, q))
        hi = patch_cosine(fx, fg, torch.where(ok, q + step, q))
        curv = lo - 2 * c0 + hi
        sure = ok & (curv < 0)
        off = torch.where(sure, 0.5 * (lo - hi) / curv.clamp(max=-1e-6), torch.zeros_like(c0)).clamp(-0.5, 0.5)
        weight = torch.where(sure, -curv, torch.zeros_like(curv))
        wn = around(weight, 0.0) * agree
        num = (around(flow[:, axis:axis + 1] + off, 0.0) * wn).sum(1, keepdim=True)
        den = wn.sum(1, keepdim=True)
        out.append(torch.where(den > 1e-6, num / den.clamp_min(1e-6), flow[:, axis:axis + 1]))
    return torch.cat(out, 1)


def cycle_gap(fx: torch.Tensor, fg: torch.Tensor, q: torch.Tensor, valid: torch.Tensor,
              rows: int = 1024, windows: tuple[int | None, ...] = (None,)) -> tuple[torch.Tensor, ...]:
    """(B,1,h,w) ≥ 0 per entry of ``windows``: how much better than X's own patch at each position p some
    other X patch matches the G patch that p matched (``q``) — the 3×3-patch cosine of its best match
    among X's ``valid`` (B or 1,1,h,w) positions minus that at p. 0: the match is mutual (G's patch points
    back to p), the classic check that a correspondence is real (Lowe's and NCNet's nearest neighbours,
    made soft so that repeated and flat content, where another X patch ties with p, is not refused).
    A window ``r`` compares only the X positions within ±r cells of p, so the chance that an unrelated
    match looks mutual does not depend on X's size; None compares all of X. All windows come from one
    pass over the same similarities. ``rows``: X positions compared at once (memory: rows·h·w floats)."""
    B, C, h, w = fx.shape
    def unit(f):  # (B,C,h,w) → (B,9C,h·w): unit-length 3×3-patch descriptors (zeros outside)
        d = F.unfold(F.pad(f, (1, 1, 1, 1)), 3)
        return d / d.norm(dim=1, keepdim=True).clamp_min(1e-6)

    dx, dg = unit(fx), unit(fg)
    idx = (q[:, 0] * fg.shape[-1] + q[:, 1]).view(B, 1, h * w)
    gq = dg.gather(2, idx.expand(B, dg.shape[1], h * w))  # G's patch at each X position's match
    ok = valid.expand(B, 1, h, w).reshape(B, 1, h * w)
    own = (gq * dx).sum(1)
    best = [[] for _ in windows]
    for s in range(0, h * w, rows):
        sim = torch.einsum("bcp,bcn->bpn", gq[:, :, s:s + rows], dx).masked_fill(~ok, -2.0)
        for i, r in enumerate(windows):
            if r is None:
                best[i].append(sim.amax(2))
            else:  # only the X positions within r cells of p, read from the same similarities
                best[i].append(sim.gather(2, _window_index(s, sim.shape[1], h, w, r, fx.device)
                                          .expand(B, -1, -1)).amax(2))
    return tuple((torch.cat(b, 1) - own).clamp_min(0.0).view(B, 1, h, w) for b in best)


def _window_index(start: int, n: int, h: int, w: int, r: int, device) -> torch.Tensor:
    """(1,n,(2r+1)²): flat indices of the cells within ±r of positions start … start+n−1 of an h×w grid,
    cells beyond the edge replaced by the nearest inside (a repeat never changes a maximum)."""
    p = torch.arange(start, start + n, device=device)
    d = torch.arange(-r, r + 1, device=device)
    ys = (p[:, None] // w + d).clamp(0, h - 1)  # (n, 2r+1)
    xs = (p[:, None] % w + d).clamp(0, w - 1)
    return (ys[:, :, None] * w + xs[:, None, :]).view(1, n, -1)
