"""What a guidance run is made of, as two picklable settings objects, each default written here once.

:class:`ModelSpec` names the models to load (sent as it is to every dask worker, which calls
:meth:`ModelSpec.load`); :class:`SamplingSettings` holds what, besides the models, determines an image's
guidance. Paper settings (Lin et al., CVPR 2024): Stable Diffusion 2.1-base, the CLIP ViT-H/14 image
encoder, 200 DDIM steps, classifier-free guidance scale 5, the centre square, 512² guidance.

This module imports neither torch nor diffusers, so the command line can show these defaults cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import SettingsError, TdrError
from ..cache.store import GUIDANCE_SIZE, LAYOUTS

SD_MODEL = "stabilityai/stable-diffusion-2-1-base"
CLIP_MODEL = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CAPTION_MODEL = "Salesforce/blip2-opt-2.7b"  # the caption source's image-to-text model (BLIP-2, Li et al. 2023)
PRESETS = {  # model preset -> its default guidance side in pixels
    "full": GUIDANCE_SIZE,  # the real models: SD-2.1-base's native 512
    "tiny": 64,  # tiny random models (tests, demo): at 512² their self-attention costs ~10 s/image on a CPU
}
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}  # short name -> torch dtype name
DEFAULT_SOURCE = "textual"  # the method's guidance source (tdr.pipeline.sources.SOURCES holds them all)
BATCH_SIZE = 8  # images per sampling batch


def _one_of(name: str, value, choices) -> None:
    if value not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}.")


@dataclass(frozen=True)
class SamplingSettings:
    """What, besides the models, determines guidance (paper defaults).

    ``size`` None (the models' own side, :data:`PRESETS`) is settled by :meth:`for_preset` before sampling.
    """

    steps: int = 200  # DDIM steps
    scale: float = 5.0  # classifier-free guidance scale
    seed: int = 0  # run seed; each image's noise comes from (seed, its id)
    layout: str = LAYOUTS[0]  # "center": the centre square (paper); "full": the whole frame
    size: int | None = None  # guidance side in pixels; None: the models' own (PRESETS)

    def __post_init__(self):
        _one_of("layout", self.layout, LAYOUTS)
        if self.steps < 1:
            raise SettingsError(f"steps must be at least 1, got {self.steps}.")

    def for_preset(self, preset: str | None) -> "SamplingSettings":
        """These settings with ``size`` None replaced by the preset's own guidance side (models of no
        preset of :data:`PRESETS`: SD's)."""
        if self.size is not None:
            return self
        return replace(self, size=PRESETS.get(preset, GUIDANCE_SIZE))


@dataclass(frozen=True)
class ModelSpec:
    """The models a guidance run loads; picklable, sent to every dask worker.

    ``mapper`` / ``cleaner``: a checkpoint file, a ``pretrained/`` folder or a Hub id in the HF cache
    (see :func:`tdr.pipeline.load_components`).
    """

    sd_model: str = SD_MODEL
    clip_model: str = CLIP_MODEL
    mapper: str | None = None
    cleaner: str | None = None
    preset: str = "full"  # one of PRESETS
    device: str | None = None  # None: cuda if this process sees a GPU, else cpu
    dtype: str | None = None  # a key or value of DTYPES; None: fp16 on GPU, fp32 on CPU
    allow_untrained: bool = False  # real models with a random mapper/cleaner (smoke tests)
    compile: bool = False  # torch.compile the UNet
    threads: int | None = None  # torch intra-op threads per CPU worker (None: torch's default)
    source: str = DEFAULT_SOURCE  # a name of tdr.pipeline.sources.SOURCES
    caption_model: str | None = None  # caption source: image-to-text model (None: CAPTION_MODEL)
    caption_words: tuple[str, ...] = ()  # caption source: words added to the degradation list

    def __post_init__(self):
        from .sources import SOURCES

        _one_of("preset", self.preset, PRESETS)
        _one_of("source", self.source, SOURCES)
        if self.dtype is not None:
            _one_of("dtype", self.dtype, [*DTYPES, *DTYPES.values()])
        if self.source != "caption" and (self.caption_model or self.caption_words):
            raise SettingsError(f"caption_model and caption_words go with source 'caption', not {self.source!r}.")
        given = [kind for kind in ("mapper", "cleaner") if getattr(self, kind) and kind in SOURCES[self.source].without]
        if given:
            raise SettingsError(f"source {self.source!r} uses no {' and no '.join(given)}; leave {'/'.join(given)} unset.")

    @property
    def guidance_size(self) -> int:
        """The preset's default guidance side in pixels."""
        return PRESETS[self.preset]

    def torch_dtype(self, device: str):
        """The torch dtype to load in on ``device`` (``dtype``, or fp16 on CUDA and fp32 elsewhere)."""
        import torch

        from .loading import default_dtype

        return getattr(torch, DTYPES.get(self.dtype, self.dtype)) if self.dtype else default_dtype(device)

    def load(self):
        """(GuidancePipeline, model fingerprint) on this process's device."""
        import torch

        from .fingerprints import source_fingerprint
        from .guidance import GuidancePipeline
        from .loading import load_components
        from .sources import build_source

        if self.threads:
            torch.set_num_threads(self.threads)
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = self.torch_dtype(device)
        source = build_source(self.source, device=device, dtype=dtype, caption_model=self.caption_model,
                              caption_words=self.caption_words)
        models = load_components(self.sd_model, self.clip_model, mapper_ckpt=self.mapper, cleaner_ckpt=self.cleaner,
                                 device=device, dtype=dtype, preset=self.preset, allow_untrained=self.allow_untrained,
                                 without=source.without)
        return GuidancePipeline(models, source=source, compile=self.compile), source_fingerprint(models, source)
