"""Restoration backbones, plain or guided, by name.

Every model has ``forward(degraded, guidance=None, *, box=None, context=None) -> restored`` on (B,3,H,W) floats in
[0,1] of any size. Guided models keep the official parameter names for the backbone and put the
dynamic aggregation under ``agg.``: ``load_backbone_checkpoint`` loads official checkpoints into the
backbone part, ``model.aggregation_parameters()`` gives the aggregation's parameters (own lr).
Shapes from the paper's supplement; ``-test`` entries are tiny versions for fast tests.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

from ..aggregation import AggregationConfig
from ...errors import CheckpointMismatchError, UnknownBackboneError
from .common import Restorer, load_backbone_checkpoint
from .drsformer import DRSformer
from .nafnet import NAFNet
from .promptir import PromptIR
from .restormer import Restormer
from .sfnet import SFNet

_NAFNET_GOPRO = dict(enc_blk_nums=(1, 1, 1, 28), middle_blk_num=1, dec_blk_nums=(1, 1, 1, 1))
_ONE_PER_LEVEL = dict(enc_blk_nums=(1, 1, 1, 1), middle_blk_num=1, dec_blk_nums=(1, 1, 1, 1))
_TINY_TRANSFORMER = dict(dim=8, num_blocks=(1, 1, 1, 1), heads=(1, 1, 1, 1))

BACKBONES: dict[str, Callable[..., Restorer]] = {
    # motion deblurring (GoPro), paper main table; width 32 for the ablations
    "nafnet": partial(NAFNet, width=64, **_NAFNET_GOPRO),
    "nafnet-w32": partial(NAFNet, width=32, **_NAFNET_GOPRO),
    "nafnet-small": partial(NAFNet, width=16, **_ONE_PER_LEVEL),  # CPU experiments
    "nafnet-test": partial(NAFNet, width=8, **_ONE_PER_LEVEL),
    # deblurring, defocus (DPDD), denoising
    "restormer": partial(Restormer, dim=48, num_blocks=(4, 6, 6, 8), num_refinement_blocks=4, heads=(1, 2, 4, 8)),
    "restormer-test": partial(Restormer, num_refinement_blocks=1, **_TINY_TRANSFORMER),
    # all-in-one (noise, rain, haze)
    "promptir": partial(PromptIR, dim=48, num_blocks=(4, 6, 6, 8), num_refinement_blocks=4, heads=(1, 2, 4, 8)),
    "promptir-test": partial(PromptIR, num_refinement_blocks=1, prompt_dims=(8, 8, 16), prompt_sizes=(8, 4, 2),
                             reduced_prompt3=8, **_TINY_TRANSFORMER),
    # dehazing (SOTS)
    "sfnet": partial(SFNet, width=32, num_res=16),
    "sfnet-test": partial(SFNet, width=16, num_res=1),
    # deraining (Rain200L/H, DID, DDN)
    "drsformer": partial(DRSformer, dim=48, num_blocks=(4, 6, 6, 8), heads=(1, 2, 4, 8)),
    "drsformer-test": partial(DRSformer, **_TINY_TRANSFORMER),
}


def build_backbone(name: str, *, guided: bool = True, aggregation: AggregationConfig | None = None,
                   **overrides) -> Restorer:
    """Build backbone ``name`` (see ``BACKBONES``); ``overrides`` replace the factory's arguments.

    guided: add the dynamic aggregation (under ``agg.``); aggregation: its settings, where it fuses
    included (default ``AggregationConfig()``).
    """
    return backbone_factory(name)(guided=guided, aggregation=aggregation, **overrides)


def backbone_factory(name: str) -> Callable[..., Restorer]:
    """The factory of backbone ``name``; an unknown name is an error listing the choices."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise UnknownBackboneError(
            f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}") from None


__all__ = ["BACKBONES", "AggregationConfig", "CheckpointMismatchError", "DRSformer", "NAFNet", "PromptIR",
           "Restorer", "Restormer", "SFNet", "UnknownBackboneError", "backbone_factory", "build_backbone",
           "load_backbone_checkpoint"]
