"""Degraded images -> guidance images, and guidance stores filled with them.

    from tdr.pipeline import ModelSpec, SamplingSettings, generate_guidance
    summary = generate_guidance("gopro.zarr", "gopro", ModelSpec(mapper="m.pt", cleaner="c.pt"), root="GOPRO_Large")

    models = load_components(sd_model, clip_model, mapper_ckpt=..., cleaner_ckpt=..., device="cuda")
    guidance = GuidancePipeline(models)(images, ids)   # (B, 512, 512, 3) uint8

Modules: :mod:`~tdr.pipeline.settings` (what a run loads and samples with, each default once),
:mod:`~tdr.pipeline.loading` / :mod:`~tdr.pipeline.presets` / :mod:`~tdr.pipeline.hub` /
:mod:`~tdr.pipeline.checkpoint` (models), :mod:`~tdr.pipeline.guidance` (the pipeline),
:mod:`~tdr.pipeline.generate` / :mod:`~tdr.pipeline.distributed` (filling a store),
:mod:`~tdr.pipeline.fingerprints`.

Names are imported on first use, so ``tdr.pipeline.settings`` (what the command line shows as defaults)
is read without loading torch or diffusers.
"""

from importlib import import_module

_EXPORTS = {
    "GuidanceModels": "loading",
    "load_components": "loading",
    "GuidancePipeline": "guidance",
    "ModelSpec": "settings",
    "SamplingSettings": "settings",
    "file_sha256": "fingerprints",
    "fingerprint": "fingerprints",
    "source_fingerprint": "fingerprints",
    "generate_guidance": "generate",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
