"""Dynamic aggregation: align the guidance image's features to the degraded input and fuse them.

"Improving Image Restoration through Removing Degradations in Textual Representations" (Lin et al.,
CVPR 2024), §3.3 and eq. 4, after the matching of MASA-SR (Lu et al., CVPR 2021):

1. the guidance G is *placed* in a frame and *searched* (``search.SEARCHES``): "global" (default) looks
   for each input position's content anywhere in G, at several scales and mirrored (generated guidance
   keeps content, not geometry); "prior" looks around the place the layout box gives (guidance whose
   geometry follows the input); "masa" is the paper's coarse-to-fine block search;
2. a shared encoder (same weights for X and G) gives features per scale; matching compares fixed image
   features (default) or the encoder's (paper), and scores each match by the encoder's cosine; where G's
   place is unknown (global, masa) each match is also put to a mutual test (``features.cycle_gap``: does
   G's patch, searched for back in X, find where it came from?) and weighted by it, G's colour standing
   in where the sample's share of mutual matches says G shows its scene (``mutual``, ``mutual_fill``);
3. transfer (``transfer.TRANSFERS``): G's features moved onto X's grid at every fused level, weighted by
   the score — sub-cell bilinear (default) or the paper's patches;
4. fusion (eq. 4): ``F_x ← F_x + α·B([F_x, F̂_g])``, B a block native to the backbone, α = 0 at init;
   optionally (``gate``) the branch weighted per position by how well the matches agree with the input.

Unlike the paper's code: any input size, any guidance size and aspect ratio, no Python loop over
blocks, bounded memory.

Files: ``config`` (settings), ``geometry`` (boxes, frames, coordinates), ``features`` (what is
compared), ``search`` (placements and matchers), ``transfer``, ``modules`` (encoder, fusion, the module).
"""

from .config import FUSE_MODES, MATCH_FEATURES, SCALES, SEARCHES, TRANSFERS, AggregationConfig
from .features import image_features
from .geometry import Context, Matches, guidance_box, input_to_guidance
from .modules import BlockFactory, DynamicAggregation, Fusion, SharedEncoder

__all__ = ["FUSE_MODES", "MATCH_FEATURES", "SCALES", "SEARCHES", "TRANSFERS", "AggregationConfig", "BlockFactory",
           "Context", "DynamicAggregation", "Fusion", "Matches", "SharedEncoder", "guidance_box", "image_features",
           "input_to_guidance"]
