"""Searches: where each input position finds its guidance.

A search has two stages with one signature each, kept together in ``SEARCHES``:

- ``place(x, guidance, box, cfg, margin, context=None) -> Placed``: brings G into the frame matching runs
  in (for "prior" and "global": the input's frame grown by ``margin`` px on each side; for "masa": G's own
  frame at the input's scale), with the G pixel coordinates of every frame pixel; ``context`` (the
  degraded frame around a training crop) is read by "global" only;
- ``match(mx, mg, cfg, margin) -> q``: matching features of X (B,C,h,w) and of the placed G at the match
  level → each X cell's matched cell in the placed G's frame (B,2,h,w) long (``margin`` in cells).

Generated guidance shares content, not pixel geometry, with its input (Stable Diffusion renders it from words): the default "global"
search looks for every position's content anywhere in G, at several scales and mirrored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .config import AggregationConfig
from .features import box3, box_sum, image_features, patch_norm
from .geometry import Context, frame_pixels, grid, input_to_guidance


@dataclass
class Placed:
    g: torch.Tensor  # (B,3,Hf,Wf) G in the frame matching runs in
    coords: torch.Tensor  # (B,2,Hf,Wf) float: G pixel coords (y, x) shown at each frame pixel


def _resample(guidance: torch.Tensor, coords: torch.Tensor, zoom: float) -> torch.Tensor:
    """G read at ``coords`` (B,2,Hf,Wf) (G pixels; edge pixels repeated outside G), after one antialiased
    shrink to ``zoom`` (frame pixels per G pixel) when that is below 1, so sampling does not alias."""
    Hg, Wg = guidance.shape[-2:]
    if zoom < 1.0:
        size = (max(1, round(Hg * zoom)), max(1, round(Wg * zoom)))
        guidance = F.interpolate(guidance, size=size, mode="bilinear", antialias=True, align_corners=False)
    g = torch.stack([(coords[:, 1] + 0.5) / Wg * 2 - 1, (coords[:, 0] + 0.5) / Hg * 2 - 1], -1)
    return F.grid_sample(guidance, g.to(guidance.dtype), mode="bilinear", padding_mode="border",
                         align_corners=False)


def _zoom(box: torch.Tensor, guidance_hw) -> torch.Tensor:
    """(B,2) input pixels per guidance pixel that the layout box gives."""
    return box[:, 2:] / box.new_tensor(guidance_hw)


# -- placements ---------------------------------------------------------------------------------------
def place_box(x, guidance, box, cfg: AggregationConfig, margin: int, context: Context | None = None) -> Placed:
    """G resampled through the layout box into the input's frame grown by ``margin``: valid only where
    the guidance's geometry follows the input (provenance ``aligned``)."""
    B, _, Hp, Wp = x.shape
    pix = frame_pixels(Hp, Wp, margin, x.device).expand(B, -1, -1, -1)
    coords = input_to_guidance(pix, box, tuple(guidance.shape[-2:]))
    return Placed(_resample(guidance, coords, float(_zoom(box, guidance.shape[-2:]).max())), coords)


def place_rescaled(x, guidance, box, cfg: AggregationConfig, margin: int, context: Context | None = None) -> Placed:
    """G at the input's scale (each sample by its own box), in its own frame: a canvas the size of the
    largest, a multiple of X's padding multiple (``margin`` here: that multiple); edges repeated."""
    B = x.shape[0]
    Hg, Wg = guidance.shape[-2:]
    zoom = _zoom(box, (Hg, Wg))
    H = max(1, round(float(zoom[:, 0].max()) * Hg))
    W = max(1, round(float(zoom[:, 1].max()) * Wg))
    H, W = -(-H // margin) * margin, -(-W // margin) * margin
    pix = grid(H, W, x.device).float().expand(B, -1, -1, -1)
    coords = (pix + 0.5) / zoom.view(B, 2, 1, 1) - 0.5
    return Placed(_resample(guidance, coords, float(zoom.max())), coords)


def place_global(x, guidance, box, cfg: AggregationConfig, margin: int, context: Context | None = None) -> Placed:
    """Coarse stage of the global search: every cell of X (cells of 2^L px, L ≥ 3) searches all of G at
    ``cfg.scales`` × the box's scale, plain and (``cfg.mirror``) mirrored, scoring each candidate by the
    mean 3×3-patch cosine of image features over a ``coarse_vote``² neighbourhood (a block-sized
    template, as MASA-SR's coarse stage intends, dense instead of per block). Each cell keeps its best
    (version, place) as a local similarity map X → G; maps are averaged only among neighbours that agree,
    and G is resampled through them into the input's frame grown by ``margin``, where the local search
    refines every position. Any position can draw from anywhere in G. With ``context`` (the frame
    window around a training crop) the whole window is the template: the crop is placed by as much
    content as a test frame's cell sees around it, not by the few cells it holds alone, and its pixels
    read the window's map."""
    B, _, Hp, Wp = x.shape
    src, shift = (x, None) if context is None else (context.image.to(x.dtype), context.yx)
    Hs, Ws = src.shape[-2:]
    Hg, Wg = guidance.shape[-2:]
    zoom = _zoom(box, (Hg, Wg))
    versions = [(s, m) for s in cfg.scales for m in ((False, True) if cfg.mirror else (False,))]
    biggest = float(zoom.max()) * max(cfg.scales) * max(Hg, Wg)
    L = max(3, math.ceil(math.log2(max(1.0, biggest / cfg.coarse_cells))))
    S = 2 ** L
    with torch.autocast(x.device.type, enabled=False):
        fx = image_features(src.float(), L)  # (B,6,h,w)
        h, w = fx.shape[-2:]
        cells = grid(h, w, x.device).float() * S + (S - 1) / 2
        ok_x = (cells < x.new_tensor([Hs, Ws]).float().view(1, 2, 1, 1)).all(1, keepdim=True)  # (1,1,h,w)
        # every version of every sample's G at the coarse level: the image averaged over each cell (as
        # image_features pools X), then its features; padded to one size, with a mask of what is G
        sizes = [[(max(S, round(Hg * float(zoom[b, 0]) * s)), max(S, round(Wg * float(zoom[b, 1]) * s)))
                  for s, _ in versions] for b in range(B)]
        # shrink G once (a power of two that keeps ≥ 2 pixels per cell of the largest version), then pool
        # each scale's cells from it; a mirrored version is its plain one flipped
        top = max(max(-(-sh // S), -(-sw // S)) for sz in sizes for sh, sw in sz)
        f = 2 ** max(0, int(math.log2(max(1, min(Hg, Wg) // (2 * top)))))
        small = F.avg_pool2d(guidance.float(), f, ceil_mode=True) if f > 1 else guidance.float()
        cell_maps = [{s: F.adaptive_avg_pool2d(small[b:b + 1], (-(-sh // S), -(-sw // S)))
                      for (sh, sw), (s, _) in zip(sizes[b], versions)} for b in range(B)]
        feats = [[image_features(_flip(cell_maps[b][s], m), 0) for s, m in versions] for b in range(B)]
        hv = max(f.shape[-2] for fs in feats for f in fs)
        wv = max(f.shape[-1] for fs in feats for f in fs)
        fg = torch.stack([torch.cat([F.pad(f, (0, wv - f.shape[-1], 0, hv - f.shape[-2])) for f in fs]) for fs in feats])
        ok_g = torch.stack([torch.cat([F.pad(torch.ones_like(f[:, :1]), (0, wv - f.shape[-1], 0, hv - f.shape[-2]))
                                       for f in fs]) for fs in feats]) > 0  # (B,V,1,hv,wv)
        mx, mg = fx, fg
        if cfg.centre:
            mx = mx - (mx * ok_x).sum((2, 3), keepdim=True) / ok_x.sum().clamp_min(1)
            mg = (mg - (mg * ok_g).sum((3, 4), keepdim=True) / ok_g.sum((3, 4), keepdim=True)) * ok_g
        vote = cfg.coarse_vote if context is None else 2 * (max(h, w) // 2) + 1  # context: one template
        _, version, d = coarse_vote(mx, mg, ok_x, ok_g, vote)
        pix = frame_pixels(Hp, Wp, margin, x.device)  # input pixels; in the context's frame: + its shift
        at = [pix if shift is None else pix + shift[b].to(pix).view(1, 2, 1, 1) for b in range(B)]
        coords = torch.cat([_local_maps(version[b], d[b], sizes[b], [m for _, m in versions], S, (Hg, Wg),
                                        ok_x[0, 0], at[b]) for b in range(B)])
    return Placed(_resample(guidance, coords.to(guidance.dtype), float(zoom.max())), coords)


def _flip(t: torch.Tensor, mirrored: bool) -> torch.Tensor:
    return t.flip(-1) if mirrored else t


def coarse_vote(fx, fg, ok_x, ok_g, vote: int, budget: int = 1 << 22):
    """Dense global template search: for every X cell p, every version v of G and every displacement d
    with p + d inside G_v, the mean over p's ``vote``² neighbourhood (X cells only) of the 3×3-patch
    cosine between X at p' and G_v at p' + d (zero where p' + d leaves G_v; X's patch ends at X's edges,
    G's norm is its whole patch's). An X no larger than the template (a training crop) is its own
    template: one score per (v, d), and every cell takes the best (:func:`whole_template`, one FFT
    correlation). Otherwise displacement rows in chunks of about ``budget`` elements, every sample and
    version at once.
    fx (B,C,h,w), fg (B,V,C,hg,wg), ok_x (1,1,h,w) bool, ok_g (B,V,1,hg,wg) bool → best score (B,h,w),
    version (B,h,w) long, displacement (B,2,h,w) long (in cells)."""
    if max(fx.shape[-2:]) <= vote:
        return whole_template(fx, fg, ok_x, ok_g)
    B, V, C, hg, wg = fg.shape
    h, w = fx.shape[-2:]
    Ph, Pw = h - 1, w - 1
    Wp = wg + 2 * Pw
    Dx = wg + w - 1
    # G padded so that every displacement row is a window of h rows: (B,V,rows,C,Wp,h) views; G's inverse
    # patch norms are zero outside G_v, X's outside X's frame, so such terms drop out of every sum
    fgp = F.pad(fg, (Pw, Pw, Ph, Ph)).permute(0, 1, 3, 2, 4).unfold(2, h, 1)
    ing = ok_g[:, :, 0].to(fx.dtype) / patch_norm(fg.flatten(0, 1)).view(B, V, hg, wg)
    ingp = F.pad(ing, (Pw, Pw, Ph, Ph)).unfold(2, h, 1)  # (B,V,rows,Wp,h)
    okp = F.pad(ok_g[:, :, 0], (Pw, Pw, Ph, Ph)).unfold(2, h, 1)
    xr = fx.permute(0, 2, 3, 1)[:, None, None]  # (B,1,1,h,w,C)
    xm = ok_x[0].to(fx.dtype)  # (1,h,w)
    inx = xm / patch_norm(fx)[:, 0]  # (B,h,w)
    denom = box_sum(xm, vote).clamp_min(1e-6)  # X cells in each vote² window (cut at X's frame)
    neg = torch.finfo(fx.dtype).min
    shape = (B, h, w)
    best = fx.new_full(shape, neg)
    arg_dy = torch.zeros(shape, dtype=torch.long, device=fx.device)
    arg_k = torch.zeros_like(arg_dy)
    rows_per_chunk = max(1, budget // max(1, B * V * h * w * max(Dx, C * Wp // h)))
    for r0 in range(0, hg + h - 1, rows_per_chunk):  # displacement rows dy = r − (h − 1), a chunk at once
        r1 = min(r0 + rows_per_chunk, hg + h - 1)
        K = r1 - r0
        # every X row against its G row: (B,V,K,h,w,Wp) products, then the band x' = x + j of each
        prod = torch.matmul(xr, fgp[:, :, r0:r1].permute(0, 1, 2, 5, 3, 4)).contiguous()
        st = prod.stride()
        dot = prod.as_strided((B, V, K, h, w, Dx), (st[0], st[1], st[2], st[3], st[4] + st[5], st[5])) \
            .permute(0, 1, 2, 5, 3, 4)  # (B,V,K,Dx,h,w)

        def cols(t):  # (B,V,K,Wp,h) → (B,V,K,Dx,h,w) view: t[…, x + j, y]
            return t.permute(0, 1, 2, 4, 3).unfold(4, w, 1).permute(0, 1, 2, 4, 3, 5)

        cos_g = box3(dot) * cols(ingp[:, :, r0:r1])  # the cosine times X's patch norm
        votes = box_sum(cos_g * inx[:, None, None, None], vote) / denom
        votes = votes.masked_fill(~cols(okp[:, :, r0:r1]), neg)
        val, idx = votes.permute(0, 2, 1, 3, 4, 5).reshape(B, K * V * Dx, h, w).max(1)
        upd = val > best
        best = torch.where(upd, val, best)
        arg_dy = torch.where(upd, idx // (V * Dx) + r0 - (h - 1), arg_dy)
        arg_k = torch.where(upd, idx % (V * Dx), arg_k)
    return best, arg_k // Dx, torch.stack([arg_dy, arg_k % Dx - (w - 1)], 1)


def _fft_size(n: int) -> int:
    """The smallest m ≥ n whose prime factors are 2, 3 and 5 (fast FFT lengths)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def whole_template(fx, fg, ok_x, ok_g):
    """:func:`coarse_vote` when X is one template: for every version v and displacement d the mean over X's
    cells p of the 3×3-patch cosine between X at p and G_v at p + d — a cross-correlation of X's
    norm-weighted 3×3 patches (9C channels) with G_v's, computed by FFT (the per-row products cost several
    times more on CPU). Same arguments and results as :func:`coarse_vote`, every cell taking the best."""
    B, V, C, hg, wg = fg.shape
    h, w = fx.shape[-2:]
    xm = ok_x[0, 0].to(fx.dtype)
    patches = lambda f: F.unfold(f, 3, padding=1).view(f.shape[0], 9 * C, *f.shape[-2:])  # noqa: E731
    tx = patches(fx) * (xm / patch_norm(fx)[:, 0])[:, None]  # (B,9C,h,w)
    inv_g = ok_g[:, :, 0].to(fx.dtype) / patch_norm(fg.flatten(0, 1)).view(B, V, hg, wg)
    tg = patches(fg.flatten(0, 1)).view(B, V, 9 * C, hg, wg) * inv_g[:, :, None]
    rows, Dx = hg + h - 1, wg + w - 1  # displacements d = (i − (h − 1), j − (w − 1))
    size = (_fft_size(rows + h - 1), _fft_size(Dx + w - 1))  # no wrap-around within the valid range
    spec = torch.einsum("bvcij,bcij->bvij", torch.fft.rfft2(F.pad(tg, (w - 1, 0, h - 1, 0)), s=size),
                        torch.fft.rfft2(tx, s=size).conj())
    votes = torch.fft.irfft2(spec, s=size)[..., :rows, :Dx] / xm.sum().clamp_min(1e-6)  # (B,V,rows,Dx)
    val, idx = votes.permute(0, 2, 1, 3).reshape(B, rows * V * Dx).max(1)
    dy, k = idx // (V * Dx) - (h - 1), idx % (V * Dx)
    best, version, dx = (t.view(B, 1, 1).expand(B, h, w) for t in (val, k // Dx, k % Dx - (w - 1)))
    return best, version, torch.stack([dy.view(B, 1, 1).expand(B, h, w), dx], 1)


def _local_maps(version, d, sizes, mirrored, S, guidance_hw, ok_x, pix) -> torch.Tensor:
    """G pixel coords (1,2,Hf,Wf) of every frame pixel ``pix`` (1,2,Hf,Wf) (input px) from each coarse
    cell's (version, displacement): a similarity map X → G per cell, G = J·u + o (u continuous input
    coords), with o averaged over the cell's 3×3 neighbours that share its version and lie within one
    cell of it (never across disagreeing matches); a frame pixel takes its nearest cell's map."""
    Hg, Wg = guidance_hw
    h, w = version.shape
    dev = version.device
    hv = torch.tensor([s[0] for s in sizes], dtype=torch.float32, device=dev)[version]
    wv = torch.tensor([s[1] for s in sizes], dtype=torch.float32, device=dev)[version]
    mir = torch.tensor(mirrored, device=dev)[version]
    centre = grid(h, w, dev)[0].float() * S + S / 2  # (2,h,w) continuous input coords of cell centres
    src = centre + S * d.float()  # the matched place in G_v, continuous G_v coords
    jy = Hg / hv
    jx = torch.where(mir, -Wg / wv, Wg / wv)
    oy = src[0] * jy - jy * centre[0]
    ox = torch.where(mir, (wv - src[1]) * Wg / wv, src[1] * Wg / wv) - jx * centre[1]
    o = torch.stack([oy, ox])[None]  # (1,2,h,w)

    def around(t, fill):  # (1,c,h,w) → (1,c,9,h,w)
        c = t.shape[1]
        return F.pad(t, (1, 1, 1, 1), value=fill).unfold(2, 3, 1).unfold(3, 3, 1).reshape(1, c, h, w, 9).permute(0, 1, 4, 2, 3)

    tol = S * torch.stack([jy, jx.abs()]).amax(0)  # one coarse cell, in G pixels
    same = (around(version[None, None].float(), -1.0)[:, 0] == version.float()) \
        & ((around(o, 1e9) - o[:, :, None]).abs().amax(1) <= tol) & around(ok_x[None, None].float(), 0.0)[:, 0].bool()
    same = same | (torch.arange(9, device=dev) == 4).view(1, 9, 1, 1)  # a cell always counts itself
    o = (around(o, 0.0) * same[:, None]).sum(2) / same.sum(1, keepdim=True)
    cy = (pix[0, 0] // S).long().clamp(0, h - 1)
    cx = (pix[0, 1] // S).long().clamp(0, w - 1)
    u = pix[0] + 0.5
    gy = jy[cy, cx] * u[0] + o[0, 0, cy, cx] - 0.5
    gx = jx[cy, cx] * u[1] + o[0, 1, cy, cx] - 0.5
    return torch.stack([gy, gx])[None]


# -- matching in the placed frame ---------------------------------------------------------------------
def local_search(fx, fg, cfg: AggregationConfig, margin: int) -> torch.Tensor:
    """Local cost volume around each position's placed location (ours): coarse displacement by a
    neighbourhood vote, then fine.

    fx (B,C,h,w), fg (B,C,h+2·margin,w+2·margin): X's and the placed G's features (G's position
    p + margin is X's p). For every displacement d with |d|∞ ≤ ``radius`` the 3×3-patch cosine ``c_d(p)``
    between X at p and G at p + d (G's norm over the same cells as X's patch, which ends at X's edges) is
    a box filter of the per-pixel products. Coarse: each position takes the d that maximises the mean of
    ``c_d`` over its ``vote``×``vote`` neighbourhood, minus ``penalty``·|d|; fine: the best ``c_d(p)`` −
    penalty·|d| with d within one cell of that (``vote`` = 1: the best over all d). Candidates outside G
    are excluded. Built one displacement row at a time. Returns (B,2,h,w) long in G's frame.
    """
    radius, vote, penalty = cfg.radius, cfg.vote, cfg.penalty
    B, C, h, w = fx.shape
    R = radius
    P = max(0, R - margin)  # zero cells added where the margin is narrower than the radius: excluded
    o = margin + P  # index of X's position p in the padded G frame, at d = 0
    nx = patch_norm(fx)
    fgp = F.pad(fg, (P, P, P, P))
    sq = F.pad(fg.pow(2).sum(1, keepdim=True), (P, P, P, P))
    inside = F.pad(fx.new_ones(1, 1, *fg.shape[-2:]), (P, P, P, P))
    cos, ok = [], []
    for dy in range(-R, R + 1):  # one row of displacements: every dx at once, (B,·,h,D1,w) views
        rows = slice(o + dy, o + dy + h)
        cols = lambda t: t[:, :, rows].unfold(3, w, 1)[:, :, :, o - R:o + R + 1]  # noqa: E731
        dot = torch.einsum("bchw,bchdw->bdhw", fx, cols(fgp))
        ng = box3(cols(sq)[:, 0].permute(0, 2, 1, 3)).clamp_min(1e-12).sqrt()
        cos.append(box3(dot) / (nx * ng))
        ok.append(cols(inside)[:, 0].permute(0, 2, 1, 3) > 0)
    cos, ok = torch.cat(cos, 1), torch.cat(ok, 1)  # (B,D,h,w), d = (dy, dx) at index (dy+R)·D1 + dx+R
    d = torch.stack(torch.meshgrid(torch.arange(-R, R + 1, device=fx.device),
                                   torch.arange(-R, R + 1, device=fx.device), indexing="ij")).view(2, -1)
    pull = (penalty * d.float().pow(2).sum(0).sqrt()).to(fx.dtype).view(1, -1, 1, 1)
    neg = torch.finfo(fx.dtype).min
    if vote > 1:
        votes = box_sum(cos * ok, vote) / box_sum(fx.new_ones(h, w), vote)  # windows cut at X's frame
        coarse = (votes - pull).masked_fill(~ok, neg).argmax(1)  # (B,h,w)
        near = ((d[0].view(1, -1, 1, 1) - d[0][coarse][:, None]).abs() <= 1) \
            & ((d[1].view(1, -1, 1, 1) - d[1][coarse][:, None]).abs() <= 1)
        ok = ok & near
    best = (cos - pull).masked_fill(~ok, neg).argmax(1)
    return d[:, best].permute(1, 0, 2, 3) + grid(h, w, fx.device) + margin


def masa_search(fx, fg, cfg: AggregationConfig, margin: int = 0) -> torch.Tensor:
    """Coarse-to-fine search of MASA-SR (Lu et al., CVPR 2021) as the paper uses it: X split into
    ``block_size`` blocks, each block's centre 3×3 patch at ``dilations`` against every patch of G gives
    the block's window in G; every X position takes its best 3×3-patch cosine match inside that window."""
    centres = coarse_blocks(fx, fg, cfg.block_size, cfg.dilations, cfg.chunk_elements)
    origins, win = block_windows(centres, *fg.shape[-2:], cfg.window_scale)
    return fine_in_windows(fx, fg, origins, win, cfg.block_size, cfg.chunk_elements)


def _block_centres(n_blocks: int, size: int, k: int, device) -> torch.Tensor:
    start = torch.arange(n_blocks, device=device) * k
    return start + (torch.clamp(size - start, max=k) - 1) // 2


def coarse_blocks(fx, fg, k, dilations, budget) -> torch.Tensor:
    """MASA-SR coarse stage: each block's centre 3×3 patch at each dilation against every patch of G,
    cosine similarities summed over dilations, top-1. Returns block centres in G (B,nby,nbx,2) long."""
    B, C, h, w = fx.shape
    hg, wg = fg.shape[-2:]
    nby, nbx = -(-h // k), -(-w // k)
    cy, cx = _block_centres(nby, h, k, fx.device), _block_centres(nbx, w, k, fx.device)
    queries, norms = [], []
    for d in dilations:
        off = torch.arange(-1, 2, device=fx.device) * d + d  # into the d-padded map
        q = F.pad(fx, (d, d, d, d))[:, :, (cy[:, None] + off)[:, None, :, None], (cx[:, None] + off)[None, :, None, :]]
        queries.append(F.normalize(q.permute(0, 2, 3, 1, 4, 5).reshape(B, nby * nbx, C * 9), dim=-1))
        norms.append(patch_norm(fg, d).view(B, 1, hg * wg))
    nb = nby * nbx
    step = max(1, budget // max(1, B * hg * wg))
    best = []
    for s in range(0, nb, step):  # chunks of blocks, all blocks of a chunk at once
        total = 0
        for d, q, n in zip(dilations, queries, norms):
            qc = q[:, s:s + step]
            weight = qc.reshape(-1, C, 3, 3)  # (B·nc, C, 3, 3), grouped per sample
            corr = F.conv2d(fg.reshape(1, B * C, hg, wg), weight, padding=d, dilation=d, groups=B)
            total = total + corr.view(B, qc.shape[1], hg * wg) / n
        best.append(total.argmax(-1))
    idx = torch.cat(best, 1).view(B, nby, nbx)
    return torch.stack([idx // wg, idx % wg], -1)


def block_windows(centres, hg, wg, scale):
    """Windows of diameter 2·⌊(size_g / (2·blocks))·scale⌋ + 1 around coarse centres, clamped inside G."""
    nby, nbx = centres.shape[1:3]
    dy = min(hg, 2 * int(hg / (2 * nby) * scale) + 1)
    dx = min(wg, 2 * int(wg / (2 * nbx) * scale) + 1)
    lo = centres - centres.new_tensor([dy // 2, dx // 2])
    hi = centres.new_tensor([hg - dy, wg - dx])
    return torch.minimum(lo.clamp_min(0), hi), (dy, dx)


def fine_in_windows(fx, fg, origins, win, k, budget) -> torch.Tensor:
    """Every X position's best 3×3-patch cosine match inside its block's window of G.

    fx (B,C,h,w), fg (B,C,hg,wg), origins (B,nby,nbx,2) top-left of each block's window, win (dy,dx).
    X blocks carry a 1-px margin of X's own edge pixels repeated (as the paper's code pads), G a zero
    margin. Patch dot products come from one per-pixel correlation per block (bmm) summed along the 3×3
    diagonal, so a block costs (k+2)²·(dy+2)·(dx+2)·C multiply-adds. Returns (B,2,h,w) long in G.
    """
    B, C, h, w = fx.shape
    hg, wg = fg.shape[-2:]
    nby, nbx = origins.shape[1:3]
    dy, dx = win
    nb = nby * nbx
    dev = fx.device
    xr = F.pad(fx, (1, 1, 1, 1), mode="replicate")
    xb = F.pad(xr, (0, nbx * k - w, 0, nby * k - h)).unfold(2, k + 2, k).unfold(3, k + 2, k)
    xb = xb.permute(0, 2, 3, 4, 5, 1).reshape(B, nb, (k + 2) ** 2, C)
    fgl = F.pad(fg, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # (B,hg+2,wg+2,C), zero margin
    ng = patch_norm(fg)[:, 0]  # (B,hg,wg)
    origins = origins.reshape(B, nb, 2)
    ay, ax = torch.arange(dy + 2, device=dev), torch.arange(dx + 2, device=dev)
    bidx = torch.arange(B, device=dev)[:, None, None, None]
    per_block = (k + 2) ** 2 * (dy + 2) * (dx + 2) * 2 + C * ((k + 2) ** 2 + (dy + 2) * (dx + 2))
    step = max(1, budget // max(1, B * per_block))
    out = []
    for s in range(0, nb, step):  # chunks of blocks; every block of a chunk at once
        o = origins[:, s:s + step]  # (B,nc,2)
        nc = o.shape[1]
        rows = o[..., 0, None] + ay  # rows of the zero-margined G, (B,nc,dy+2)
        cols = o[..., 1, None] + ax
        wb = fgl[bidx, rows[:, :, :, None], cols[:, :, None, :]]  # (B,nc,dy+2,dx+2,C)
        corr = torch.matmul(xb[:, s:s + step], wb.reshape(B, nc, -1, C).transpose(-1, -2))
        corr = corr.view(B, nc, k + 2, k + 2, dy + 2, dx + 2)
        dot = sum(corr[:, :, u:u + k, v:v + k, u:u + dy, v:v + dx] for u in range(3) for v in range(3))
        cand_norm = ng[bidx[..., None], rows[:, :, None, :dy, None], cols[:, :, None, None, :dx]]  # (B,nc,1,dy,dx)
        cos = dot / cand_norm[:, :, :, None]  # (B,nc,k,k,dy,dx); X's own norm does not change the argmax
        j = cos.reshape(B, nc, k, k, dy * dx).argmax(-1)  # (B,nc,k,k)
        out.append(torch.stack([o[..., 0, None, None] + j // dx, o[..., 1, None, None] + j % dx], 2))
    q = torch.cat(out, 1).view(B, nby, nbx, 2, k, k).permute(0, 3, 1, 4, 2, 5)
    return q.reshape(B, 2, nby * k, nbx * k)[:, :, :h, :w].contiguous()


@dataclass(frozen=True)
class Search:
    place: Callable[..., Placed]
    match: Callable[..., torch.Tensor]
    own_frame: bool  # G matched in its own frame (masa) rather than placed in the input's (grown) frame
    known_place: bool = False  # the box is where G's content lies (aligned guidance): positions outside it
    #                            get none, and matches are not put to the mutual test


SEARCHES: dict[str, Search] = {
    "global": Search(place_global, local_search, own_frame=False),
    "prior": Search(place_box, local_search, own_frame=False, known_place=True),
    "masa": Search(place_rescaled, masa_search, own_frame=True),
}
