"""Dataset adapters: folder layouts as downloaded → deterministic lists of ``Pair``s.

The registry is a plain dict filled by explicit imports below (one module per family)::

    from tdr.cache.datasets import get_dataset
    ds = get_dataset("gopro")                # or get_dataset("cbsd68", sigma=50)
    pairs = ds.pairs("/data/GOPRO_Large", "test")
    image = pairs[0].lq.load()               # (H,W,3) uint8 (uint16 for DPDD)
    report = ds.check("/data/GOPRO_Large")   # counts and every problem, never raises for pairing faults
"""

from __future__ import annotations

from ...errors import DatasetError
from . import custom, deblur, dehaze, demo, denoise, derain
from .base import CheckReport, Dataset
from .refs import NOISE_CONVENTIONS, Crop, ImageRef, MatBlock, Noise, Pair
from .synth import Synth

DATASETS: dict[str, Dataset] = {
    ds.name: ds
    for ds in (
        deblur.GOPRO,
        deblur.HIDE,
        deblur.REALBLUR_J,
        deblur.REALBLUR_R,
        deblur.DPDD,
        dehaze.SOTS_INDOOR,
        dehaze.SOTS_OUTDOOR,
        dehaze.ITS,
        dehaze.OTS,
        derain.RAIN100L,
        derain.RAINTRAINL,
        derain.RAIN200L,
        derain.RAIN200H,
        derain.DID,
        derain.DDN,
        denoise.SIDD,
        *denoise.GAUSSIAN_SETS,
        custom.FOLDER,
        demo.DEMO,
    )
}


def list_datasets() -> list[Dataset]:
    """The registered datasets, in registry order (grouped by task); ``DATASETS`` maps name → dataset."""
    return list(DATASETS.values())


def get_dataset(name: str, **options) -> Dataset:
    """The dataset called ``name`` (case-insensitive), with ``options`` applied (Gaussian sets: sigma,
    noise, seed); an unknown name raises ``DatasetError`` listing the valid ones."""
    dataset = DATASETS.get(name.strip().lower())
    if dataset is None:
        raise DatasetError(f"Unknown dataset '{name}'; choose one of: {', '.join(DATASETS)}.")
    return dataset.with_options(**options) if options else dataset


__all__ = [
    "DATASETS",
    "NOISE_CONVENTIONS",
    "CheckReport",
    "Crop",
    "Dataset",
    "ImageRef",
    "MatBlock",
    "Noise",
    "Pair",
    "Synth",
    "get_dataset",
    "list_datasets",
]
