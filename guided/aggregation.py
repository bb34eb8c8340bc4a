"""Dynamic aggregation: align the guidance image's features to the degraded input and fuse them.

"Improving Image Restoration through Removing Degradations in Textual Representations" (Lin et al.,
CVPR 2024), §3.3 and eq. 4, after the matching of MASA-SR (Lu et al., CVPR 2021):

1. a shared encoder (same weights for the input X and the guidance G) gives features per scale;
2. matching on one level (default the coarsest): X is split into blocks; each block gets a window of
   G to search, either from the geometric prior (``search="prior"``, default: the generation half knows
   which rectangle of X the guidance shows) or from the paper's global coarse search
   (``search="global"``: the block's centre 3×3 patch at dilations {1,2,3} against every patch of G);
   every X position then takes its best 3×3-patch cosine match inside its window (fine matching);
3. transfer: at every level, G's features are gathered by that match (patch 3s, stride s at scale s,
   overlaps averaged) and weighted by the similarity score;
4. fusion (eq. 4): ``F_x ← F_x + α·B([F_x, F̂_g])``, B a block native to the backbone, α = 0 at init.

Unlike the paper's code: any input size, any guidance size and aspect ratio, no Python loop over blocks,
and memory bounded by ``AggregationConfig.chunk_elements`` for the similarity volumes.

Coordinates: a *box* ``(top, left, height, width)`` (B,4) float, in the input's pixel frame, is the
rectangle the guidance image shows (the generation half resizes it to 512²). ``guidance_box`` builds it
for the two layouts of the generation half.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LAYOUTS = ("center", "full")
SEARCHES = ("prior", "global")
FUSE_MODES = ("enc", "dec", "enc+dec")

BlockFactory = Callable[[int, int], nn.Module]  # (channels, level) -> module mapping (B,c,h,w) to (B,c,h,w)


@dataclass(frozen=True)
class AggregationConfig:
    """Settings of the dynamic aggregation (matching, transfer, fusion)."""

    nf: int | None = None  # shared-encoder channels at full scale; None: half the backbone's width, ≥ 8
    encoder_blocks: int = 1  # residual blocks per encoder level
    layout: str = "center"  # what the guidance shows when no box is given: "center" square or "full" frame
    search: str = "prior"  # "prior": windows around the expected location; "global": paper's coarse search
    # prior search defaults, tuned on the demo ablation (bench/guidance_ablation.py, BENCHMARKS.md): match at
    # 1/4 scale within ±4 cells (±16 px), centred features, a small pull towards the expected location
    radius: int = 4  # prior search: max |displacement| in match-level cells (Chebyshev)
    penalty: float = 0.02  # prior search: cosine − penalty·|displacement| (cells, Euclidean): prefer the prior
    centre: bool = True  # match on features minus their per-channel mean over the image (NCC-like)
    block_size: int = 8  # block side at the match level (paper: 8)
    window_scale: float = 1.5  # global search: window diameter 2·⌊(W_g / (2·blocks_x))·scale⌋ + 1
    dilations: tuple[int, ...] = (1, 2, 3)  # global coarse search: dilations of the block descriptor
    match_level: int | None = None  # encoder level matched on; None: 1/4 scale (prior), the coarsest (global, paper)
    alpha_init: float = 0.0  # α of eq. 4 (per channel); 0 leaves a (pretrained) backbone unchanged
    rescale_guidance: bool = True  # global search: resize G to the input's scale (from the box) first
    checkpoint_fusion: bool = False  # training: recompute fusion blocks in backward instead of storing
    chunk_elements: int = 1 << 24  # bound on the elements of one similarity chunk (64 MiB in fp32)

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {self.layout!r}")
        if self.search not in SEARCHES:
            raise ValueError(f"search must be one of {', '.join(SEARCHES)}, not {self.search!r}")
        if self.radius < 0 or self.block_size < 1 or self.encoder_blocks < 0 or self.chunk_elements < 1:
            raise ValueError("radius, encoder_blocks must be ≥ 0; block_size, chunk_elements ≥ 1")
        if not self.dilations or min(self.dilations) < 1:
            raise ValueError(f"dilations must be positive integers, not {self.dilations}")


@dataclass
class Matches:
    """The last matching, detached, for measuring it (match level of the padded input frame)."""

    x_yx: torch.Tensor  # (B,2,h,w) float: centre of each match-level cell, input pixel coords (y, x)
    g_yx: torch.Tensor  # (B,2,h,w) float: its matched location, guidance pixel coords (y, x)
    score: torch.Tensor  # (B,1,h,w) float: cosine similarity of the match (0 where invalid)
    valid: torch.Tensor  # (B,1,h,w) bool: the cell lies inside the input and (prior search) inside the box
    stride: int  # input pixels per match-level cell


def guidance_box(layout: str, frame_hw: tuple[int, int], *, crop_yx: tuple[float, float] = (0, 0),
                 batch: int = 1, device=None) -> torch.Tensor:
    """Box (B,4) = (top, left, height, width) in input pixels that the guidance of a frame shows.

    ``frame_hw`` is the full degraded frame the guidance was made from; ``crop_yx`` the top-left corner
    of the input inside that frame when the input is a crop of it (training patches).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    H, W = frame_hw
    if layout == "full":
        top, left, h, w = 0.0, 0.0, float(H), float(W)
    else:  # centre square of the short side, as the generation half crops it
        side = float(min(H, W))
        top, left, h, w = (H - side) / 2, (W - side) / 2, side, side
    box = torch.tensor([top - crop_yx[0], left - crop_yx[1], h, w], dtype=torch.float32, device=device)
    return box.expand(batch, 4).clone()


def input_to_guidance(yx: torch.Tensor, box: torch.Tensor, guidance_hw: tuple[int, int]) -> torch.Tensor:
    """Map input pixel coords (B,2,...) to guidance pixel coords through ``box`` (B,4) (pixel centres)."""
    shape = (yx.shape[0], 2) + (1,) * (yx.dim() - 2)
    origin, size = box[:, :2].reshape(shape), box[:, 2:].reshape(shape)
    g_size = torch.tensor(guidance_hw, dtype=yx.dtype, device=yx.device).reshape((1, 2) + shape[2:])
    return (yx + 0.5 - origin) / size * g_size - 0.5


class ResidualBlock(nn.Module):
    """conv3×3 → LeakyReLU → conv3×3, plus the input."""

    def __init__(self, nf: int):
        super().__init__()
        self.conv1 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv2 = nn.Conv2d(nf, nf, 3, 1, 1)

    def forward(self, x):
        return x + self.conv2(F.leaky_relu(self.conv1(x), 0.1))


class SharedEncoder(nn.Module):
    """conv3×3 → nf, residual blocks, then per level a stride-2 conv doubling the channels + blocks."""

    def __init__(self, levels: int, nf: int, blocks: int = 1):
        super().__init__()
        self.stem = nn.Conv2d(3, nf, 3, 1, 1)
        self.downs = nn.ModuleList(nn.Conv2d(nf * 2 ** l, nf * 2 ** (l + 1), 3, 2, 1) for l in range(levels))
        self.bodies = nn.ModuleList(
            nn.Sequential(*[ResidualBlock(nf * 2 ** l) for _ in range(blocks)]) for l in range(levels + 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B,3,H,W) in [0,1], H and W multiples of 2^levels → [(B, nf·2^l, H/2^l, W/2^l) for each level]."""
        f = self.bodies[0](F.leaky_relu(self.stem(x), 0.1))
        feats = [f]
        for down, body in zip(self.downs, self.bodies[1:]):
            f = body(F.leaky_relu(down(f), 0.1))
            feats.append(f)
        return feats


class Fusion(nn.Module):
    """Paper eq. 4: ``F_x + α·B([F_x, F̂_g])``, B = 1×1 conv to c channels then the backbone's block."""

    def __init__(self, channels: int, guide_channels: int, block: nn.Module, alpha_init: float = 0.0,
                 recompute: bool = False):
        super().__init__()
        self.reduce = nn.Conv2d(channels + guide_channels, channels, 1)
        self.block = block
        self.alpha = nn.Parameter(torch.full((1, channels, 1, 1), float(alpha_init)))
        self.recompute = recompute  # activation checkpointing: the block's activations are not stored

    def _branch(self, x, guide):
        return self.block(self.reduce(torch.cat([x, guide], 1)))

    def forward(self, x, guide):
        if self.recompute and self.training and torch.is_grad_enabled():
            return x + self.alpha * checkpoint(self._branch, x, guide, use_reentrant=False)
        return x + self.alpha * self._branch(x, guide)


class DynamicAggregation(nn.Module):
    """Shared encoder, matching, transfer and the fusion modules of one backbone.

    ``points`` names the backbone's fusion points: ``name -> (level, channels)``; names starting with
    "dec" are decoder points, all others ("enc0", "mid", …) encoder points. ``fuse`` selects which sides
    get a fusion module. ``block(channels, level)`` builds the backbone-native block B.
    """

    def __init__(self, levels: int, points: Mapping[str, tuple[int, int]], block: BlockFactory, *,
                 fuse: str = "enc+dec", config: AggregationConfig | None = None, width: int = 32):
        super().__init__()
        if fuse not in FUSE_MODES:
            raise ValueError(f"fuse must be one of {', '.join(FUSE_MODES)}, not {fuse!r}")
        self.config = config = config or AggregationConfig()
        self.levels = levels
        default_level = min(2, levels) if config.search == "prior" else levels
        self.match_level = default_level if config.match_level is None else config.match_level
        if not 0 <= self.match_level <= levels:
            raise ValueError(f"match_level must be in 0..{levels}, not {config.match_level}")
        nf = config.nf or max(8, width // 2)
        self.encoder = SharedEncoder(levels, nf, config.encoder_blocks)
        sides = fuse.split("+")
        self.fusions = nn.ModuleDict({
            name: Fusion(ch, nf * 2 ** lvl, block(ch, lvl), config.alpha_init, config.checkpoint_fusion)
            for name, (lvl, ch) in points.items() if ("dec" if name.startswith("dec") else "enc") in sides})
        self.point_levels = {name: lvl for name, (lvl, _) in points.items()}
        self.last_matches: Matches | None = None

    # -- guidance geometry ------------------------------------------------------------------------
    def _prepare_guidance(self, guidance, box, out_hw):
        """Prior search: G resampled into the (padded) input frame. Global: G at the input's scale."""
        mult = 2 ** self.levels
        B, _, Hg, Wg = guidance.shape
        scale = box[:, 2:] / box.new_tensor([Hg, Wg])  # input pixels per guidance pixel, (B,2)
        if self.config.search == "prior":
            # shrink first (antialiased) so bilinear sampling does not alias; then one affine resample
            s = scale.max(0).values.clamp(max=1.0)
            if float(s.min()) < 1.0:
                size = (max(1, round(Hg * float(s[0]))), max(1, round(Wg * float(s[1]))))
                guidance = F.interpolate(guidance, size=size, mode="bilinear", antialias=True, align_corners=False)
            H, W = out_hw
            ys = torch.arange(H, device=box.device, dtype=box.dtype) + 0.5
            xs = torch.arange(W, device=box.device, dtype=box.dtype) + 0.5
            gy = (ys[None] - box[:, :1]) / box[:, 2:3] * 2 - 1  # (B,H) in grid_sample's [-1, 1]
            gx = (xs[None] - box[:, 1:2]) / box[:, 3:4] * 2 - 1
            grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), -1)
            g = F.grid_sample(guidance, grid.to(guidance.dtype), mode="bilinear", padding_mode="zeros",
                              align_corners=False)
            return g, (1.0, 1.0)
        if self.config.rescale_guidance:
            s = scale.mean(0)
            size = (max(1, round(Hg * float(s[0]))), max(1, round(Wg * float(s[1]))))
            if size != (Hg, Wg):
                guidance = F.interpolate(guidance, size=size, mode="bilinear", antialias=True, align_corners=False)
        h, w = guidance.shape[-2:]
        g = _pad_to(guidance, (-(-h // mult) * mult, -(-w // mult) * mult))
        return g, (Hg / h, Wg / w)  # guidance pixels per resized pixel

    # -- forward pieces -------------------------------------------------------------------------
    def prepare(self, x: torch.Tensor, guidance: torch.Tensor, input_hw: tuple[int, int],
                box: torch.Tensor | None = None) -> list[torch.Tensor | None]:
        """Aligned guidance features per level for the padded input ``x``.

        x: (B,3,Hp,Wp) in [0,1], padded at the bottom/right to a multiple of 2^levels; ``input_hw`` its
        size before padding. guidance: (B,3,Hg,Wg) in [0,1], any size. box: (B,4) (top, left, height,
        width) in input pixels that the guidance shows; default from ``config.layout`` (input = frame).
        Returns [(B, nf·2^l, Hp/2^l, Wp/2^l) or None where no fusion point needs level l].
        """
        cfg, m = self.config, self.match_level
        B, _, Hp, Wp = x.shape
        if guidance.shape[0] != B:
            raise ValueError(f"guidance batch {guidance.shape[0]} differs from input batch {B}")
        if box is None:
            box = guidance_box(cfg.layout, input_hw, batch=B, device=x.device)
        box = box.to(device=x.device, dtype=torch.float32)
        g, g_per_px = self._prepare_guidance(guidance.to(x.dtype), box, (Hp, Wp))

        # 1. shared encoder (one batched call when both have the input's size)
        if g.shape[-2:] == x.shape[-2:]:
            fx, fg = zip(*(f.chunk(2) for f in self.encoder(torch.cat([x, g]))))
        else:
            fx, fg = self.encoder(x), self.encoder(g)

        # 2. matching on level m: windows (prior or coarse search), then fine matching in them
        S = 2 ** m
        fxm, fgm = fx[m], fg[m]
        h, w = fxm.shape[-2:]
        with torch.no_grad():
            if cfg.search == "prior":
                origins, win = _prior_windows(B, h, w, *fgm.shape[-2:], cfg.block_size, cfg.radius, x.device)
                limit = cfg.radius
            else:
                centres = _coarse_search(fxm, fgm, cfg.block_size, cfg.dilations, cfg.chunk_elements)
                origins, win = _global_windows(centres, *fgm.shape[-2:], cfg.window_scale)
                limit = None
            mx, mg = (fxm - fxm.mean((2, 3), keepdim=True), fgm - fgm.mean((2, 3), keepdim=True)) if cfg.centre else (fxm, fgm)
            q = _fine_search(mx, mg, origins, win, cfg.block_size, limit, cfg.chunk_elements,
                             cfg.penalty if cfg.search == "prior" else 0.0)
        score = _patch_cosine(fxm, fgm, q)  # (B,1,h,w), differentiable w.r.t. both feature maps

        p = _grid(h, w, x.device)  # (1,2,h,w) cell indices
        cell = p * S + (S - 1) / 2  # centre of each cell, input pixels
        valid = (cell[:, :1] < input_hw[0]) & (cell[:, 1:] < input_hw[1])
        if cfg.search == "prior":
            y0, x0 = box[:, 0, None, None, None], box[:, 1, None, None, None]
            inside = ((cell[:, :1] + 0.5 >= y0) & (cell[:, :1] + 0.5 <= y0 + box[:, 2, None, None, None])
                      & (cell[:, 1:] + 0.5 >= x0) & (cell[:, 1:] + 0.5 <= x0 + box[:, 3, None, None, None]))
            valid = valid & inside
            score = score * inside.to(score.dtype)
        self.last_matches = self._matches(q, cell, score, valid, box, guidance.shape[-2:], g_per_px, S)

        # 3. transfer on every level a fusion point needs
        needed = {self.point_levels[name] for name in self.fusions}
        disp = q - p.long()
        return [_transfer(fg[l], disp, score, m - l) if l in needed else None for l in range(self.levels + 1)]

    def _matches(self, q, cell, score, valid, box, guidance_hw, g_per_px, S) -> Matches:
        q_px = q.float() * S + (S - 1) / 2
        if self.config.search == "prior":  # G was resampled into the input frame: map through the box
            g_yx = input_to_guidance(q_px, box, tuple(guidance_hw))
        else:
            g_yx = (q_px + 0.5) * q_px.new_tensor(g_per_px).view(1, 2, 1, 1) - 0.5
        B = q.shape[0]
        return Matches(cell.expand(B, -1, -1, -1).float(), g_yx, score.detach(), valid.expand(B, -1, -1, -1), S)

    def fuse(self, name: str, feat: torch.Tensor, aligned: list[torch.Tensor | None]) -> torch.Tensor:
        """Apply fusion point ``name`` to the backbone feature ``feat``; identity if it has none."""
        fusion = self.fusions[name] if name in self.fusions else None
        if fusion is None:
            return feat
        return fusion(feat, aligned[self.point_levels[name]].to(feat.dtype))


# -- helpers (pure functions on tensors) ------------------------------------------------------------
def _pad_to(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Pad (B,C,H,W) at the bottom/right to ``hw``: reflect where possible, else replicate."""
    ph, pw = hw[0] - x.shape[-2], hw[1] - x.shape[-1]
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < x.shape[-2] and pw < x.shape[-1] else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def _grid(h: int, w: int, device) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([ys, xs])[None]  # (1,2,h,w) long


def _patch_norm(f: torch.Tensor, dilation: int = 1) -> torch.Tensor:
    """L2 norm of every (dilated, zero-padded) 3×3 patch of (B,C,H,W) → (B,1,H,W)."""
    sq = f.pow(2).sum(1, keepdim=True)
    ones = sq.new_ones(1, 1, 3, 3)
    return F.conv2d(sq, ones, padding=dilation, dilation=dilation).clamp_min(1e-12).sqrt()


def _block_centres(n_blocks: int, size: int, k: int, device) -> torch.Tensor:
    start = torch.arange(n_blocks, device=device) * k
    return start + (torch.clamp(size - start, max=k) - 1) // 2


def _coarse_search(fx, fg, k, dilations, budget) -> torch.Tensor:
    """Paper's coarse search: each block's centre 3×3 patch at each dilation against every patch of G,
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
        norms.append(_patch_norm(fg, d).view(B, 1, hg * wg))
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


def _global_windows(centres, hg, wg, scale):
    """Windows of diameter 2·⌊(size_g / (2·blocks))·scale⌋ + 1 around coarse centres, clamped inside G."""
    nby, nbx = centres.shape[1:3]
    dy = min(hg, 2 * int(hg / (2 * nby) * scale) + 1)
    dx = min(wg, 2 * int(wg / (2 * nbx) * scale) + 1)
    lo = centres - centres.new_tensor([dy // 2, dx // 2])
    hi = centres.new_tensor([hg - dy, wg - dx])
    return torch.minimum(lo.clamp_min(0), hi), (dy, dx)


def _prior_windows(B, h, w, hg, wg, k, r, device):
    """Prior search (G already in the input frame): each block's window = the block grown by r."""
    nby, nbx = -(-h // k), -(-w // k)
    dy, dx = min(hg, k + 2 * r), min(wg, k + 2 * r)
    oy = (torch.arange(nby, device=device) * k - r).clamp(0, hg - dy)
    ox = (torch.arange(nbx, device=device) * k - r).clamp(0, wg - dx)
    origins = torch.stack(torch.broadcast_tensors(oy[:, None], ox[None, :]), -1)
    return origins.expand(B, nby, nbx, 2), (dy, dx)


def _fine_search(fx, fg, origins, win, k, limit, budget, penalty: float = 0.0) -> torch.Tensor:
    """Every X position's best 3×3-patch cosine match inside its block's window of G.

    fx (B,C,h,w), fg (B,C,hg,wg), origins (B,nby,nbx,2) top-left of each block's window, win (dy,dx).
    ``limit``: if set, candidates further than ``limit`` (Chebyshev) from the position are excluded, and
    ``penalty`` · (Euclidean distance in cells) is subtracted from each candidate's cosine.
    Patch dot products come from one per-pixel correlation per block (bmm) summed along the 3×3
    diagonal, so a block costs (k+2)²·(dy+2)·(dx+2)·C multiply-adds. Returns (B,2,h,w) long in G.
    """
    B, C, h, w = fx.shape
    hg, wg = fg.shape[-2:]
    nby, nbx = origins.shape[1:3]
    dy, dx = win
    nb = nby * nbx
    dev = fx.device
    # X blocks with a 1-px margin (zero outside X), as views: (B,C,nby,nbx,k+2,k+2)
    xb = F.pad(fx, (1, nbx * k - w + 1, 1, nby * k - h + 1)).unfold(2, k + 2, k).unfold(3, k + 2, k)
    xb = xb.permute(0, 2, 3, 4, 5, 1).reshape(B, nb, (k + 2) ** 2, C)
    fgl = F.pad(fg, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # (B,hg+2,wg+2,C), zero margin
    ng = _patch_norm(fg)[:, 0]  # (B,hg,wg)
    origins = origins.reshape(B, nb, 2)
    ay, ax = torch.arange(dy + 2, device=dev), torch.arange(dx + 2, device=dev)
    bidx = torch.arange(B, device=dev)[:, None, None, None]
    if limit is not None:  # block-local coords of positions (p) and window cells (q), per block
        by, bx = (torch.arange(nb, device=dev) // nbx) * k, (torch.arange(nb, device=dev) % nbx) * k
        ik = torch.arange(k, device=dev)
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
        if limit is not None:
            py = by[s:s + nc, None] + ik  # (nc,k) absolute rows of the block's positions
            px = bx[s:s + nc, None] + ik
            qy = o[..., 0, None] + torch.arange(dy, device=dev)  # (B,nc,dy)
            qx = o[..., 1, None] + torch.arange(dx, device=dev)
            ddy = (qy[:, :, None, :] - py[None, :, :, None]).abs()  # (B,nc,k,dy)
            ddx = (qx[:, :, None, :] - px[None, :, :, None]).abs()
            ok = (ddy <= limit)[:, :, :, None, :, None] & (ddx <= limit)[:, :, None, :, None, :]
            if penalty:
                dist = (ddy[:, :, :, None, :, None].float() ** 2 + ddx[:, :, None, :, None, :].float() ** 2).sqrt()
                cos = cos - penalty * dist
            cos = cos.masked_fill(~ok, float("-inf"))
        j = cos.reshape(B, nc, k, k, dy * dx).argmax(-1)  # (B,nc,k,k)
        out.append(torch.stack([o[..., 0, None, None] + j // dx, o[..., 1, None, None] + j % dx], 2))
    q = torch.cat(out, 1).view(B, nby, nbx, 2, k, k).permute(0, 3, 1, 4, 2, 5)
    return q.reshape(B, 2, nby * k, nbx * k)[:, :, :h, :w].contiguous()


def _patch_cosine(fx, fg, q) -> torch.Tensor:
    """Cosine similarity (B,1,h,w) of X's 3×3 patch at each position and G's at ``q`` (B,2,h,w)."""
    B, C, h, w = fx.shape
    hg, wg = fg.shape[-2:]
    fxp, fgp = F.pad(fx, (1, 1, 1, 1)), F.pad(fg, (1, 1, 1, 1)).flatten(2)
    dot = 0
    for u in range(3):
        for v in range(3):
            idx = ((q[:, 0] + u) * (wg + 2) + q[:, 1] + v).view(B, 1, h * w).expand(B, C, h * w)
            dot = dot + (fxp[:, :, u:u + h, v:v + w] * fgp.gather(2, idx).view(B, C, h, w)).sum(1, keepdim=True)
    ng = _patch_norm(fg).flatten(2).gather(2, (q[:, 0] * wg + q[:, 1]).view(B, 1, h * w)).view(B, 1, h, w)
    return dot / (_patch_norm(fx) * ng)


def _transfer(feat, disp, score, up: int) -> torch.Tensor:
    """G's features at one level aligned to X by the match-level displacement, weighted by score.

    feat (B,C,Hg,Wg); disp (B,2,h,w) long (match cell → G cell, in match cells); score (B,1,h,w);
    ``up`` = log2 of the level's scale relative to the match level (> 0 finer, < 0 coarser).
    Finer levels (s = 2^up): every match cell's 3s×3s patch (stride s) is moved by s·disp and the
    overlaps are averaged (fold), as in the paper; coarser levels take the rounded displacement of the
    cell's centre. Sources outside G contribute zeros. Returns (B,C,h·s,w·s).
    """
    B, C, Hg, Wg = feat.shape
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
        y, x = _grid(H, W, disp.device)[0]
        d = disp[:, :, (y * f + f // 2).clamp(max=h - 1), (x * f + f // 2).clamp(max=w - 1)]
        d = torch.div(d + f // 2, f, rounding_mode="floor")
        out = gather(y + d[:, 0], x + d[:, 1])
        return out * (F.avg_pool2d(score, f, ceil_mode=True) if f > 1 else score)
    s = 2 ** up
    H, W = h * s, w * s
    y, x = _grid(H, W, disp.device)[0]
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
