"""Settings of the dynamic aggregation: one frozen dataclass, each choice's names defined once."""

from __future__ import annotations

from dataclasses import dataclass

from ...cache.layout import LAYOUTS

SEARCHES = ("global", "prior", "masa")  # see search.SEARCHES
TRANSFERS = ("bilinear", "patch")  # see transfer.TRANSFERS
MATCH_FEATURES = ("image", "encoder")
FUSE_MODES = ("enc", "dec", "enc+dec")
SCALES = (0.71, 0.84, 1.0, 1.19, 1.41)  # global search: G searched at these scales (×√2 range, steps of 2^¼)


@dataclass(frozen=True)
class AggregationConfig:
    """Settings of the dynamic aggregation (placement and search, transfer, fusion).

    ``search`` chooses how G is brought into the input's frame and matched (``search.SEARCHES``):
    "global" (default; generated guidance, unknown geometry), "prior" (guidance whose geometry follows
    the input: a window around the place the layout box gives), "masa" (the paper's coarse-to-fine search
    on G at the input's scale). Defaults measured on the demo ablation (bench/guidance_ablation.py).
    """

    fuse: str = "enc+dec"  # where guidance is fused: encoder, decoder or both (paper Table 10: both best)
    nf: int | None = None  # shared-encoder channels at full scale; None: half the backbone's width, ≥ 8
    encoder_blocks: int = 1  # residual blocks per encoder level (paper: 4 at the backbone's width)
    layout: str = "center"  # what the guidance shows when no box is given: "center" square or "full" frame
    search: str = "global"
    match_features: str = "image"  # "image": image_features() (fixed); "encoder": the shared encoder's (paper)
    transfer: str = "bilinear"  # "bilinear": sub-cell displacement, bilinear sampling; "patch": paper
    centre: bool = True  # match on features minus their per-channel mean over the input's frame (NCC-like)
    # local search (prior and global): match at 1/4 scale within ±radius cells of the placed position
    radius: int = 4  # max |displacement| in match-level cells (Chebyshev)
    penalty: float = 0.02  # cosine − penalty·|displacement| (cells, Euclidean): prefer the placed position
    vote: int = 17  # neighbourhood (cells) whose mean cosine picks the coarse displacement; 1: none
    # global search: G at several scales (× the layout box's) and mirrored, every version searched whole
    scales: tuple[float, ...] = SCALES
    mirror: bool = True  # also search G mirrored left-right
    coarse_cells: int = 64  # coarse level: the largest version of G spans at most this many cells (level ≥ 3)
    coarse_vote: int = 13  # coarse level: neighbourhood (cells) whose mean cosine scores a candidate (≈ 100 px,
    #                        the extent of the paper's dilated block descriptor at its coarsest level)
    # masa (paper): blocks, dilated block descriptors, windows
    block_size: int = 8  # block side at the match level (paper: 8)
    window_scale: float = 1.5  # window diameter 2·⌊(W_g / (2·blocks_x))·scale⌋ + 1
    dilations: tuple[int, ...] = (1, 2, 3)  # dilations of the block descriptor
    match_level: int | None = None  # encoder level matched on; None: 1/4 scale (global, prior), coarsest (masa)
    confidence: bool = False  # fusion also reads the matches' agreement (fixed image features) as a channel
    gate: tuple[float, float] | None = None  # (lo, hi): each fusion's branch is weighted per position by the
    #   matches' agreement ramped from 0 at lo to 1 at hi (DynamicAggregation.prepare); where it is shut the
    #   model is the plain backbone. None: no gate. Off: on the demo ladder (0.4, 0.6) costs content views
    #   about 0.5 dB and gains unrelated guidance 0.07 (BENCHMARKS.md)
    # mutual test (global and masa searches; the prior search's place is declared): a match is real if G's
    #   patch, searched for back in the input, finds the place it came from (features.cycle_gap). () for off
    mutual: tuple[float, ...] = (0.03, 0.1)  # (lo, hi): each match's transferred features are weighted by how
    #   mutual it is (1 where no X patch matches its G patch better than by lo, 0 from hi)
    mutual_fill: tuple[float, ...] = (0.12, 0.24)  # with mutual, (lo, hi): where a match is not mutual, G's
    #   mean features over its frame (its global colour and tone) stand in, weighted by the sample's share of
    #   mutual matches (searched back within ±mutual_window cells) ramped lo → hi: guidance that shows the
    #   sample's scene lends its colour, guidance that does not lends nothing. On the demo ladder with
    #   mutual: unrelated guidance's cost −0.39 → −0.05 dB, content views +0.99 → +0.78 (eight seeds,
    #   BENCHMARKS.md)
    mutual_trust: tuple[float, ...] = ()  # with mutual, (lo, hi): a sample whose share of mutual matches
    #   reaches hi transfers every match, as without the test; below lo only its mutual ones. Off: on the
    #   demo ladder (seeds 0–2) it kept less of unrelated guidance's cost off than mutual_fill (BENCHMARKS.md)
    mutual_window: int = 8
    drop: float = 0.0  # training: each sample's fusion branches are all switched off with this probability
    #   (guidance dropout), so the backbone keeps working without them; 0: never. Off: on the demo ladder
    #   0.3 costs content views about 0.3 dB for 0.06–0.4 on unrelated guidance (BENCHMARKS.md)
    alpha_init: float = 0.0  # α of eq. 4 (per channel); 0 leaves a (pretrained) backbone unchanged
    checkpoint_fusion: bool = False  # training: recompute fusion blocks in backward instead of storing
    chunk_elements: int = 1 << 24  # masa: bound on the elements of one similarity chunk (64 MiB in fp32)

    def __post_init__(self):
        for name, choices in (("fuse", FUSE_MODES), ("layout", LAYOUTS), ("search", SEARCHES),
                              ("transfer", TRANSFERS), ("match_features", MATCH_FEATURES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, not {getattr(self, name)!r}")
        if self.radius < 0 or self.block_size < 1 or self.encoder_blocks < 0 or self.chunk_elements < 1:
            raise ValueError("radius, encoder_blocks must be ≥ 0; block_size, chunk_elements ≥ 1")
        for name in ("vote", "coarse_vote"):
            if getattr(self, name) < 1 or getattr(self, name) % 2 == 0:
                raise ValueError(f"{name} must be an odd number of cells ≥ 1, not {getattr(self, name)}")
        if not self.dilations or min(self.dilations) < 1:
            raise ValueError(f"dilations must be positive integers, not {self.dilations}")
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"scales must be positive numbers, not {self.scales}")
        if self.gate is not None and not (len(self.gate) == 2 and -1.0 <= self.gate[0] < self.gate[1] <= 1.0):
            raise ValueError(f"gate must be (lo, hi) with -1 ≤ lo < hi ≤ 1 (agreement is a cosine), not {self.gate}")
        if self.mutual and not (len(self.mutual) == 2 and 0.0 <= self.mutual[0] < self.mutual[1] <= 2.0):
            raise ValueError(f"mutual must be (lo, hi) with 0 ≤ lo < hi ≤ 2 (a gap between cosines), or () for "
                             f"off; not {self.mutual}")
        for name in ("mutual_fill", "mutual_trust"):  # idle while mutual is off
            ramp = getattr(self, name)
            if ramp and not (len(ramp) == 2 and -1.0 <= ramp[0] < ramp[1] <= 1.0):
                raise ValueError(f"{name} must be (lo, hi) with -1 ≤ lo < hi ≤ 1 (a share of the matches), or () "
                                 f"for off; not {ramp}")
        if self.mutual_window < 1:
            raise ValueError(f"mutual_window must be at least 1 cell, not {self.mutual_window}")
        if not 0.0 <= self.drop < 1.0:
            raise ValueError(f"drop must be a probability in [0, 1), not {self.drop}")
        if self.coarse_cells < 8:
            raise ValueError(f"coarse_cells must be at least 8, not {self.coarse_cells}")
