"""Dynamic aggregation: align the guidance image's features to the degraded input and fuse them.

"Improving Image Restoration through Removing Degradations in Textual Representations" (Lin et al.,
CVPR 2024), §3.3 and eq. 4, after the matching of MASA-SR (Lu et al., CVPR 2021):

1. a shared encoder (same weights for the input X and the guidance G) gives features per scale;
2. matching on one level: either the paper's global search (``search="global"``: X split into blocks,
   each block's centre 3×3 patch at dilations {1,2,3} against every patch of G gives the block's window,
   then every X position takes its best 3×3-patch cosine match inside that window), or — the default —
   the prior search (``search="prior"``): the generation half knows which rectangle of X the guidance
   shows, so G is resampled into X's frame (grown by a margin, so a training crop's edges can match
   outwards) and every position searches displacements up to ``radius`` cells around its own place: a
   coarse displacement by the mean cosine over a ``vote``×``vote`` neighbourhood (a block-sized
   template, robust where one 3×3 patch is ambiguous), then the best 3×3 patch within one cell of it;
3. transfer: at every level, G's features are moved by the match, weighted by the similarity score:
   whole-cell patches (``transfer="patch"``, paper: patch 3s, stride s at scale s, overlaps averaged) or
   sampled bilinearly at a sub-cell displacement (``transfer="bilinear"``, default: a parabola through
   the cosines around each match);
4. fusion (eq. 4): ``F_x ← F_x + α·B([F_x, F̂_g])``, B a block native to the backbone, α = 0 at init.

What is matched: the shared encoder's features (``match_features="encoder"``, paper) or fixed
``image_features`` (default: locally normalised colour gradients), which survive blur, haze, rain and
noise far better than a freshly initialised encoder's — measured on the aligned-content ablation
(bench/guidance_ablation.py, BENCHMARKS.md): with the vote and the sub-cell placement about 90 % of
positions within 4 px of the truth, against 53 % for the encoder's features at initialisation and 40 %
after training. The similarity scores that weight
the transfer always come from the shared encoder, so the encoder still learns through them.

Unlike the paper's code: any input size, any guidance size and aspect ratio, no Python loop over blocks,
and memory bounded by ``AggregationConfig.chunk_elements`` for the global search's similarity volumes
(the prior search keeps a few image-sized maps per displacement).

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
MATCH_FEATURES = ("image", "encoder")
TRANSFERS = ("bilinear", "patch")

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
    match_features: str = "image"  # "image": image_features() (default); "encoder": the shared encoder's (paper)
    transfer: str = "bilinear"  # "bilinear": sub-cell displacement (parabola fit), bilinear sampling;
    #                             "patch": paper (3s×3s patches by the cell's displacement, overlaps averaged)
    vote: int = 17  # prior search: neighbourhood (cells) whose mean cosine picks the coarse displacement; ≤ 1: none
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
        if self.vote < 1 or self.vote % 2 == 0:
            raise ValueError(f"vote must be an odd number of cells ≥ 1, not {self.vote}")
        if self.transfer not in TRANSFERS:
            raise ValueError(f"transfer must be one of {', '.join(TRANSFERS)}, not {self.transfer!r}")
        if self.match_features not in MATCH_FEATURES:
            raise ValueError(f"match_features must be one of {', '.join(MATCH_FEATURES)}, not {self.match_features!r}")
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
    def _margin(self) -> int:
        """Prior search: input pixels G's resampled frame extends past the input on each side, so that
        positions near the input's edges (a training crop's) can match ``radius`` cells outwards; a
        multiple of 2^levels so every level's frame lines up. 0 for the global search."""
        if self.config.search != "prior":
            return 0
        mult = 2 ** self.levels
        return -(-(self.config.radius + 1) * 2 ** self.match_level // mult) * mult

    def _prepare_guidance(self, guidance, box, out_hw):
        """Prior search: G resampled into the (padded) input frame grown by ``_margin()`` on each side,
        its edge pixels repeated outside its box. Global: G at the input's scale. Returns (G, guidance
        pixels per pixel of G)."""
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
            M = self._margin()
            ys = torch.arange(-M, H + M, device=box.device, dtype=box.dtype) + 0.5
            xs = torch.arange(-M, W + M, device=box.device, dtype=box.dtype) + 0.5
            gy = (ys[None] - box[:, :1]) / box[:, 2:3] * 2 - 1  # (B,H) in grid_sample's [-1, 1]
            gx = (xs[None] - box[:, 1:2]) / box[:, 3:4] * 2 - 1
            grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), -1)
            g = F.grid_sample(guidance, grid.to(guidance.dtype), mode="bilinear", padding_mode="border",
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
        # G in X's frame, its edge pixels extended past its box: a box edge is no image edge, and zeros
        # there would give the encoder an edge that transfer carries into the restored image as a line
        g, g_per_px = self._prepare_guidance(guidance.to(x.dtype), box, (Hp, Wp))

        # 1. shared encoder, one batched call when both have the same frame. Prior search: X is encoded
        #    inside G's frame (its edge pixels repeated, as G's are outside its box) and cropped back, so
        #    both see the same context at the edges
        margin = self._margin()  # G's frame starts ``margin`` input pixels before X's
        xe = F.pad(x, (margin,) * 4, mode="replicate") if margin else x
        if g.shape[-2:] == xe.shape[-2:]:
            fx, fg = zip(*(f.chunk(2) for f in self.encoder(torch.cat([xe, g]))))
        else:
            fx, fg = self.encoder(xe), self.encoder(g)
        if margin:
            fx = [_crop(f, margin // 2 ** l) for l, f in enumerate(fx)]

        # 2. matching on level m (features: the shared encoder's, or image-derived; see AggregationConfig),
        #    in float32 even under autocast: bf16 cosines are too coarse for an argmax or a sub-cell fit
        S = 2 ** m
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            if cfg.match_features == "image":
                # neither X's frame nor G's box edge is an image edge: no zeros around either
                mx = image_features(x.float(), m)
                mg = image_features(g.float(), m)
            else:
                mx, mg = fx[m].detach().float(), fg[m].detach().float()
            if cfg.centre:  # both minus their mean over X's frame
                mx = mx - mx.mean((2, 3), keepdim=True)
                mg = mg - _crop(mg, margin // S).mean((2, 3), keepdim=True)
            if cfg.search == "prior":
                q = _prior_search(mx, mg, cfg.radius, cfg.vote, cfg.penalty, margin // S)
            else:
                centres = _coarse_search(mx, mg, cfg.block_size, cfg.dilations, cfg.chunk_elements)
                origins, win = _global_windows(centres, *mg.shape[-2:], cfg.window_scale)
                q = _fine_search(mx, mg, origins, win, cfg.block_size, cfg.chunk_elements)
            flow = _subcell(mx, mg, q) if cfg.transfer == "bilinear" else None  # sub-cell displacement
        # similarity score on the shared encoder's features: differentiable w.r.t. both feature maps
        score = _patch_cosine(fx[m].float(), fg[m].float(), q)

        h, w = fx[m].shape[-2:]
        p = _grid(h, w, x.device)  # (1,2,h,w) cell indices
        cell = p * S + (S - 1) / 2  # centre of each cell, input pixels
        valid = (cell[:, :1] < input_hw[0]) & (cell[:, 1:] < input_hw[1])
        if cfg.search == "prior":  # positions outside the guidance's box get no guidance
            inside = self._inside(box, (h, w), S)
            score = score * inside.to(score.dtype)
            valid = valid & inside
        matched = q if flow is None else p + flow
        self.last_matches = self._matches(matched - margin // S, cell, score, valid, box, guidance.shape[-2:],
                                          g_per_px, S)

        # 3. transfer on every level a fusion point needs
        needed = {self.point_levels[name] for name in self.fusions}
        if flow is not None:
            return [_transfer_bilinear(fg[l], flow, score, m - l) if l in needed else None
                    for l in range(self.levels + 1)]
        disp = q - p
        return [_transfer(fg[l], disp, score, m - l) if l in needed else None for l in range(self.levels + 1)]

    @staticmethod
    def _inside(box, hw, stride) -> torch.Tensor:
        """(B,1,h,w) bool: the centre of each cell of a level (``stride`` input pixels) lies in ``box``."""
        c = _grid(*hw, box.device) * stride + (stride - 1) / 2 + 0.5
        y0, x0, bh, bw = (box[:, i, None, None, None] for i in range(4))
        return (c[:, :1] >= y0) & (c[:, :1] <= y0 + bh) & (c[:, 1:] >= x0) & (c[:, 1:] <= x0 + bw)

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


def _crop(x: torch.Tensor, m: int) -> torch.Tensor:
    """(…,H,W) without ``m`` rows/columns on each side."""
    return x[..., m:x.shape[-2] - m, m:x.shape[-1] - m] if m else x


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


def _fine_search(fx, fg, origins, win, k, budget) -> torch.Tensor:
    """Every X position's best 3×3-patch cosine match inside its block's window of G.

    fx (B,C,h,w), fg (B,C,hg,wg), origins (B,nby,nbx,2) top-left of each block's window, win (dy,dx).
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


def _prior_search(fx, fg, radius: int, vote: int, penalty: float, margin: int = 0) -> torch.Tensor:
    """Prior search as a local cost volume: coarse displacement by a neighbourhood vote, then fine.

    fx (B,C,h,w), fg (B,C,h+2·margin,w+2·margin): X's and G's features, G resampled through the box
    into X's frame grown by ``margin`` cells on each side (G's position p + margin is X's p). For every
    displacement d with |d|∞ ≤ ``radius`` the 3×3-patch cosine ``c_d(p)`` between X at p and G at p + d
    (G's norm over the same cells as X's patch, which ends at X's edges) is a box filter of the
    per-pixel products. Coarse: each position takes the d that maximises the mean of ``c_d`` over its
    ``vote``×``vote`` neighbourhood (a block-sized template, robust where a lone 3×3 patch is
    ambiguous), minus ``penalty``·|d|; fine: the best ``c_d(p)`` − penalty·|d| with d within one cell of
    that (``vote`` ≤ 1: the best over all d). Candidates outside G are excluded. The volume holds
    (2r+1)² maps of (B,h,w), built one displacement row at a time. Returns (B,2,h,w) long in G.
    """
    B, C, h, w = fx.shape
    R, D1 = radius, 2 * radius + 1
    P = max(0, R - margin)  # zero cells added where the margin is narrower than the radius: excluded
    o = margin + P  # index of X's position p in the padded G frame, at d = 0
    nx = _patch_norm(fx)
    fgp = F.pad(fg, (P, P, P, P))
    sq = F.pad(fg.pow(2).sum(1, keepdim=True), (P, P, P, P))
    inside = F.pad(fx.new_ones(1, 1, *fg.shape[-2:]), (P, P, P, P))
    ones3 = fx.new_ones(1, 1, 3, 3)
    box3 = lambda t: F.conv2d(t.reshape(-1, 1, h, w), ones3, padding=1).view(t.shape)  # noqa: E731
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
        votes = F.avg_pool2d((cos * ok).view(-1, 1, h, w), vote, 1, vote // 2, count_include_pad=False)
        coarse = (votes.view(cos.shape) - pull).masked_fill(~ok, neg).argmax(1)  # (B,h,w)
        near = ((d[0].view(1, -1, 1, 1) - d[0][coarse][:, None]).abs() <= 1) \
            & ((d[1].view(1, -1, 1, 1) - d[1][coarse][:, None]).abs() <= 1)
        ok = ok & near
    best = (cos - pull).masked_fill(~ok, neg).argmax(1)
    return d[:, best].permute(1, 0, 2, 3) + _grid(h, w, fx.device) + margin


def image_features(img: torch.Tensor, level: int) -> torch.Tensor:
    """Fixed matching features at one level: local-contrast-normalised colour gradients of the image
    averaged down to the level's scale, (B,6,H/2^l,W/2^l). They ignore brightness, contrast and colour
    shifts (haze, colour casts, a generated image's palette) and average out noise and rain streaks."""
    f = F.avg_pool2d(img, 2 ** level) if level else img
    gy = F.pad(f[..., 1:, :] - f[..., :-1, :], (0, 0, 0, 1))
    gx = F.pad(f[..., :, 1:] - f[..., :, :-1], (0, 1))
    grad = torch.cat([gy, gx], 1)
    scale = F.avg_pool2d(grad.pow(2).mean(1, keepdim=True), 9, 1, 4, count_include_pad=False).sqrt()
    return grad / (scale + 1e-3)


def _patch_cosine(fx, fg, q) -> torch.Tensor:
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
            dot = dot + (fxp[:, :, u:u + h, v:v + w] * fgp.gather(2, idx.expand(B, C, h * w)).view(B, C, h, w)).sum(1, keepdim=True)
            ng2 = ng2 + sqp.gather(2, idx).view(B, 1, h, w) * in_x[:, :, u:u + h, v:v + w]
    return dot / (_patch_norm(fx) * ng2.clamp_min(1e-12).sqrt())


def _subcell(fx, fg, q) -> torch.Tensor:
    """Displacement field (B,2,h,w) float in cells: ``q − p`` plus a sub-cell offset per axis from a
    parabola through the 3×3-patch cosines at q − 1, q, q + 1 (clamped to ±½; none where a neighbour
    falls outside G or the peak is not a maximum), then averaged over each 3×3 neighbourhood of cells
    weighted by the peak's sharpness, since one cell's estimate is noisy."""
    hg, wg = fg.shape[-2:]
    c0 = _patch_cosine(fx, fg, q)
    flow = (q - _grid(*q.shape[-2:], q.device)).to(c0.dtype)
    out = []
    for axis, size in ((0, hg), (1, wg)):
        step = torch.zeros_like(q)
        step[:, axis] = 1
        ok = (q[:, axis:axis + 1] > 0) & (q[:, axis:axis + 1] < size - 1)
        lo = _patch_cosine(fx, fg, torch.where(ok, q - step, q))
        hi = _patch_cosine(fx, fg, torch.where(ok, q + step, q))
        curv = lo - 2 * c0 + hi
        sure = ok & (curv < 0)
        off = torch.where(sure, 0.5 * (lo - hi) / curv.clamp(max=-1e-6), torch.zeros_like(c0)).clamp(-0.5, 0.5)
        weight = torch.where(sure, -curv, torch.zeros_like(curv))
        num = F.avg_pool2d((flow[:, axis:axis + 1] + off) * weight, 3, 1, 1)
        den = F.avg_pool2d(weight, 3, 1, 1)
        out.append(torch.where(den > 1e-6, num / den.clamp_min(1e-6), flow[:, axis:axis + 1]))
    return torch.cat(out, 1)


def _transfer_bilinear(feat, flow, score, up: int) -> torch.Tensor:
    """G's features at one level sampled bilinearly at p + flow (sub-cell alignment; the alternative to
    the paper's patch transfer). flow (B,2,h,w) in cells of the level it was found on; ``up`` = log2 of
    this level's scale relative to that one (> 0 finer: flow upsampled bilinearly, < 0 coarser: pooled).
    Sources outside G read zeros. Returns (B,C,h·2^up,w·2^up), weighted by the score."""
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
    grid = torch.stack([(xs + 0.5) / Wg * 2 - 1, (ys + 0.5) / Hg * 2 - 1], -1)
    # float32 positions: a bf16 grid would be off by about a pixel across a few hundred pixels
    out = F.grid_sample(feat.float(), grid.float(), mode="bilinear", padding_mode="zeros", align_corners=False)
    return out * score


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
