"""Restoration networks guided by guidance images, for use from Python (the ``tdr`` commands call these).

Build a guided backbone and restore one image::

    from tdr.guided import build_backbone, restore
    model = build_backbone("nafnet-test").eval()       # guided; AggregationConfig() settings
    restored = restore(model, degraded, guidance)       # (1,3,H,W) and (1,3,S,S) floats in [0,1]

Train on a guidance store and score the run::

    result = train(TrainConfig(backbone="nafnet-w32", store="gopro.zarr", out="runs/gopro"))
    scores = evaluate(EvalConfig(checkpoint=str(result.checkpoint), store="gopro.zarr"))

This package imports neither diffusers nor the command line's libraries.
"""

from ..errors import TdrError, UnknownBackboneError
from .aggregation import AggregationConfig
from .backbones import BACKBONES, build_backbone, load_backbone_checkpoint
from .config import EvalConfig, TrainConfig
from .data import TripleDataset
from .evaluate import EvalResult, evaluate, load_run, restore
from .metrics import MetricConvention, psnr, ssim
from .train import TrainResult, train

__all__ = [
    "BACKBONES", "build_backbone", "load_backbone_checkpoint", "AggregationConfig",
    "TripleDataset",
    "TrainConfig", "TrainResult", "train",
    "EvalConfig", "EvalResult", "evaluate", "load_run", "restore",
    "MetricConvention", "psnr", "ssim",
    "TdrError", "UnknownBackboneError",
]
