"""The aggregation's networks: shared encoder, fusion (paper eq. 4), and the module tying them to a search."""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import FUSE_MODES, AggregationConfig
from .features import box_sum, cycle_gap, image_features, patch_cosine, subcell
from .geometry import Context, Matches, crop, grid, guidance_box, inside_box, sample_coords
from .search import SEARCHES
from .transfer import TRANSFERS

BlockFactory = Callable[[int, int], nn.Module]  # (channels, level) -> module mapping (B,c,h,w) to (B,c,h,w)


def _at_level(t: torch.Tensor, up: int, size) -> torch.Tensor:
    """A match-level map (B,1,h,w) at a level ``up`` octaves finer (bilinear) or coarser (mean)."""
    if up < 0:
        return F.avg_pool2d(t, 2 ** -up, ceil_mode=True)[..., :size[0], :size[1]]
    return F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False) if up else t


def _ramp(t: torch.Tensor, lo_hi: tuple[float, float]) -> torch.Tensor:
    """0 at or below lo, 1 at or above hi, linear between."""
    lo, hi = lo_hi
    return ((t - lo) / (hi - lo)).clamp(0.0, 1.0)


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

    def forward(self, x: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """(B,3,H,W) in [0,1], H and W multiples of 2^upto → [(B, nf·2^l, H/2^l, W/2^l) for l = 0…upto]
        (``upto``: the finest levels only; default every level)."""
        f = self.bodies[0](F.leaky_relu(self.stem(x), 0.1))
        feats = [f]
        upto = len(self.downs) if upto is None else upto
        for down, body in zip(self.downs[:upto], self.bodies[1:upto + 1]):
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

    def forward(self, x, guide, gate: torch.Tensor | None = None):
        """``gate``: (B,1,h,w) in [0,1] weighting the branch per position (None: 1 everywhere)."""
        if self.recompute and self.training and torch.is_grad_enabled():
            branch = checkpoint(self._branch, x, guide, use_reentrant=False)
        else:
            branch = self._branch(x, guide)
        return x + self.alpha * (branch if gate is None else gate * branch)


class Aligned(list):
    """What :meth:`DynamicAggregation.prepare` returns: per level the aligned guidance features (None where
    no fusion point needs the level), and in ``gates`` per level the fusions' gate (B,1,h,w) — (B,1,1,1)
    for guidance dropout alone — or None."""

    def __init__(self, features, gates=None):
        super().__init__(features)
        self.gates = list(gates) if gates is not None else [None] * len(self)


class DynamicAggregation(nn.Module):
    """Shared encoder, search, transfer and the fusion modules of one backbone.

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
        default_level = levels if config.search == "masa" else min(2, levels)
        self.match_level = default_level if config.match_level is None else config.match_level
        if not 0 <= self.match_level <= levels:
            raise ValueError(f"match_level must be in 0..{levels}, not {config.match_level}")
        nf = config.nf or max(8, width // 2)
        self.encoder = SharedEncoder(levels, nf, config.encoder_blocks)
        sides = fuse.split("+")
        self.fusions = nn.ModuleDict({
            name: Fusion(ch, nf * 2 ** lvl + int(config.confidence), block(ch, lvl), config.alpha_init,
                         config.checkpoint_fusion)
            for name, (lvl, ch) in points.items() if ("dec" if name.startswith("dec") else "enc") in sides})
        self.point_levels = {name: lvl for name, (lvl, _) in points.items()}
        self.last_matches: Matches | None = None

    def _margin(self) -> int:
        """Input pixels the placed G's frame extends past the input on each side, so that positions near
        the input's edges (a training crop's) can match ``radius`` cells outwards; a multiple of
        2^levels so every level's frame lines up. 0 for searches in G's own frame."""
        if SEARCHES[self.config.search].own_frame:
            return 0
        mult = 2 ** self.levels
        return -(-(self.config.radius + 1) * 2 ** self.match_level // mult) * mult

    def prepare(self, x: torch.Tensor, guidance: torch.Tensor, input_hw: tuple[int, int],
                box: torch.Tensor | None = None, context: Context | None = None) -> "Aligned":
        """Aligned guidance features per level for the padded input ``x``.

        x: (B,3,Hp,Wp) in [0,1], padded at the bottom/right to a multiple of 2^levels; ``input_hw`` its
        size before padding. guidance: (B,3,Hg,Wg) in [0,1], any size. box: (B,4) (top, left, height,
        width) in input pixels that the guidance is about (its scale; for the prior search its place);
        default from ``config.layout`` (input = frame). context: the degraded frame around the input (a
        training crop's), seen by the global search's coarse stage (:class:`Context`); None: the input only.
        Returns :class:`Aligned`: [(B, nf·2^l, Hp/2^l, Wp/2^l) or None where no fusion point needs level l];
        with ``config.confidence`` one more channel, the matches' agreement (:meth:`_agreement`); with
        ``config.gate`` per level the fusions' gate, that agreement ramped to [0, 1]; in training with
        ``config.drop`` each sample's gates zeroed together with that probability. With ``config.mutual``
        (not for the prior search, whose place is declared) each match transfers as far as it is mutual
        (:func:`~.features.cycle_gap`), or as far as the sample's share of mutual matches says that G shows
        its scene (``config.mutual_trust``); with ``config.mutual_fill`` G's mean features fill in for the
        rest, as far as that share says.
        """
        cfg, m = self.config, self.match_level
        search, transfer = SEARCHES[cfg.search], TRANSFERS[cfg.transfer]
        B, _, Hp, Wp = x.shape
        if guidance.shape[0] != B:
            raise ValueError(f"guidance batch {guidance.shape[0]} differs from input batch {B}")
        if box is None:
            box = guidance_box(cfg.layout, input_hw, batch=B, device=x.device)
        box = box.to(device=x.device, dtype=torch.float32)

        # 1. G into the frame matching runs in (search-specific; no gradient flows through placement).
        #    Outside G its edge pixels repeat: a box or frame edge is no image edge, and zeros there would
        #    give the encoder an edge that transfer carries into the restored image as a line
        margin = self._margin()
        with torch.no_grad():
            placed = search.place(x, guidance.to(x.dtype), box, cfg, margin or 2 ** self.levels, context)

        # 2. shared encoder: G's frame at every level (transfer reads them all); X only up to the match
        #    level (its features serve the match score, nothing else), with a few cells of its edge pixels
        #    repeated, as G's frame repeats G's, so equal content gives equal features up to X's edge
        g = placed.g
        pad = min(margin, 4 * 2 ** m)
        fx = self.encoder(F.pad(x, (pad,) * 4, mode="replicate") if pad else x, upto=m)
        fx, fg = [crop(f, pad // 2 ** l) for l, f in enumerate(fx)], self.encoder(g)

        # 3. matching on level m (features: the shared encoder's, or image-derived; see AggregationConfig),
        #    in float32 even under autocast: bf16 cosines are too coarse for an argmax or a sub-cell fit
        S = 2 ** m
        h, w = fx[m].shape[-2:]
        p = grid(h, w, x.device)  # (1,2,h,w) cell indices
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            if cfg.match_features == "image":
                mx, mg = image_features(x.float(), m), image_features(g.float(), m)
            else:
                mx, mg = fx[m].detach().float(), fg[m].detach().float()
            if cfg.centre:  # both minus their mean over X's frame
                mx = mx - mx.mean((2, 3), keepdim=True)
                mg = mg - crop(mg, margin // S).mean((2, 3), keepdim=True)
            q = search.match(mx, mg, cfg, margin // S)
            flow = subcell(mx, mg, q) if transfer.subcell else (q - p).float()
        # similarity score on the shared encoder's features: differentiable w.r.t. both feature maps
        score = patch_cosine(fx[m].float(), fg[m].float(), q)

        cell = p * S + (S - 1) / 2  # centre of each cell, input pixels
        valid = (cell[:, :1] < input_hw[0]) & (cell[:, 1:] < input_hw[1])
        if search.known_place:  # the box is where the guidance lies: positions outside it get none
            inside = inside_box(box, (h, w), S)
            score = score * inside.to(score.dtype)
            valid = valid & inside
        tested = bool(cfg.mutual) and not search.known_place
        if tested:  # content G does not share (no mutual match) transfers nothing
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):  # float32, as the matching
                scene_wide = bool(cfg.mutual_fill or cfg.mutual_trust)  # the sample's share is needed
                gaps = cycle_gap(mx, mg, q, valid, windows=(None, cfg.mutual_window) if scene_wide else (None,))
                mutual = 1 - _ramp(gaps[0], cfg.mutual)
                share = self._share(gaps[1], valid) if scene_wide else None
                if cfg.mutual_trust:  # guidance that shows the sample's scene: every match transfers
                    mutual = mutual + (1 - mutual) * _ramp(share, cfg.mutual_trust)
                mutual = mutual.to(score.dtype)
            score = score * mutual
        agree = self._agreement(x, g, mx, mg, q, valid) if cfg.confidence or cfg.gate else None
        with torch.no_grad():
            g_yx = sample_coords(placed.coords, (p + flow) * S + (S - 1) / 2)
        self.last_matches = Matches(cell.expand(B, -1, -1, -1).float(), g_yx, score.detach(),
                                    valid.expand(B, -1, -1, -1), S)

        # 4. transfer on every level a fusion point needs (with the agreement as one more channel)
        needed = {self.point_levels[name] for name in self.fusions}
        out = [transfer.fn(fg[l], flow, score, m - l) if l in needed else None for l in range(self.levels + 1)]
        if tested and cfg.mutual_fill:  # where no match is mutual: G's mean features (its colour and
            #   tone), as far as the sample's share of mutual matches says G shows its scene
            scene = _ramp(share, cfg.mutual_fill).to(score.dtype)
            out = [f if f is None else f + (1 - _at_level(mutual, m - l, f.shape[-2:])) * scene
                   * fg[l].mean((2, 3), keepdim=True) for l, f in enumerate(out)]
        if cfg.confidence:
            out = [f if f is None else torch.cat([f, _at_level(agree, m - l, f.shape[-2:])], 1) for l, f in enumerate(out)]
        gates = None
        if cfg.gate:  # the branch fires where the matches agree with the input (TTSR weights its fused
            #          texture by the match's relevance the same way); fixed image features: not learned
            gate = _ramp(agree, cfg.gate)
            gates = [None if f is None else _at_level(gate, m - l, f.shape[-2:]) for l, f in enumerate(out)]
        if cfg.drop and self.training:  # guidance dropout: a sample's branches all off together
            keep = (torch.rand(B, 1, 1, 1, device=x.device) >= cfg.drop).to(x.dtype)
            gates = [None if f is None else keep if gates is None else gates[l] * keep for l, f in enumerate(out)]
        return Aligned(out, gates)

    def _share(self, gap, valid) -> torch.Tensor:
        """(B,1,1,1): each sample's share of valid positions whose match is mutual (``gap``, the
        :func:`~.features.cycle_gap` within ±mutual_window cells, ≤ mutual's lo) — how far G shows the
        sample's scene."""
        ok = valid.expand_as(gap)
        return ((gap <= self.config.mutual[0]) & ok).sum((2, 3), keepdim=True) / ok.sum((2, 3), keepdim=True).clamp_min(1)

    @torch.no_grad()
    def _agreement(self, x, g, mx, mg, q, valid) -> torch.Tensor:
        """(B,1,h,w) in [-1,1]: how well G at the matches agrees with X around each position — the mean
        over the ``vote``² neighbourhood (input positions only) of the 3×3-patch cosine of the fixed image
        features at each match. Content the guidance shares scores high over a whole neighbourhood; a
        best match in unrelated content only here and there. A confidence the fusion reads from the first
        step, where the learned score must first be learned."""
        cfg, m = self.config, self.match_level
        if cfg.match_features != "image":
            mx, mg = image_features(x.float(), m), image_features(g.float(), m)
        ok = valid.to(mx.dtype).expand(q.shape[0], 1, -1, -1)
        c = patch_cosine(mx, mg, q) * ok
        return box_sum(c, cfg.vote) / box_sum(ok, cfg.vote).clamp_min(1.0)

    def fuse(self, name: str, feat: torch.Tensor, aligned: list[torch.Tensor | None]) -> torch.Tensor:
        """Apply fusion point ``name`` to the backbone feature ``feat``; identity if it has none."""
        fusion = self.fusions[name] if name in self.fusions else None
        if fusion is None:
            return feat
        level = self.point_levels[name]
        gates = getattr(aligned, "gates", None)
        gate = gates[level] if gates is not None else None
        return fusion(feat, aligned[level].to(feat.dtype), None if gate is None else gate.to(feat.dtype))
