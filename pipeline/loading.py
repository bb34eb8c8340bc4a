"""Loading the guidance models: real ones offline, or the ``tiny`` random preset (:mod:`tdr.pipeline.presets`).

Real models (Lin et al., CVPR 2024): Stable Diffusion 2.1-base in diffusers' layout (subfolders ``unet``,
``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``) and the CLIP ViT-H/14 image encoder
(transformers ``CLIPVisionModel``), each given as a local directory or a hub id already in the Hugging Face
cache (:mod:`tdr.pipeline.hub`). Nothing is ever downloaded (``local_files_only``); everything missing is
reported in one :class:`~tdr.errors.ModelNotFoundError`. The mapper and cleaner come from checkpoints
(:mod:`tdr.pipeline.checkpoint`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelNotFoundError, TdrError
from .checkpoint import load_checkpoint
from .cleaner import Cleaner, CleanerConfig
from .clip import CLIP_MEAN, CLIP_STD
from .hub import DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS, first_existing, quiet, resolve, weight_files
from .mapper import Mapper, cross_attention_layers
from .presets import TINY_SEED, tiny_components
from .pretrained import locate
from .sampler import PAPER_SCHEDULER_CONFIG
from .settings import CLIP_MODEL, PRESETS, SD_MODEL

UNTRAINED_SEED = 0


@dataclass
class GuidanceModels:
    """Everything that makes guidance images, on one device in one dtype."""

    unet: nn.Module  # diffusers UNet2DConditionModel
    vae: nn.Module  # diffusers AutoencoderKL
    text_encoder: nn.Module  # transformers CLIPTextModel
    tokenizer: object  # transformers CLIPTokenizer (model_max_length 77)
    scheduler_config: dict  # DDIM config (PAPER_SCHEDULER_CONFIG + the model's training betas)
    clip: nn.Module | None  # transformers CLIPVisionModel; None when the guidance source needs no CLIP
    mapper: Mapper | None  # None when the source needs no mapper (``caption``)
    cleaner: Cleaner | None  # None when the source needs no cleaner (``mapper-only``, ``caption``)
    device: torch.device
    dtype: torch.dtype
    clip_mean: tuple[float, float, float] = CLIP_MEAN
    clip_std: tuple[float, float, float] = CLIP_STD
    # provenance for fingerprint(): model names and the weight files they were loaded from
    sources: dict = field(default_factory=dict)

    @property
    def clip_size(self) -> int:
        return self.clip.config.image_size


_SD_PARTS = {  # subfolder -> files of which one must exist
    "unet": DIFFUSERS_WEIGHTS,
    "vae": DIFFUSERS_WEIGHTS,
    "text_encoder": TRANSFORMERS_WEIGHTS,
    "tokenizer": ("tokenizer.json", "vocab.json"),
    "scheduler": ("scheduler_config.json",),
}


def _check_sd(name: str, missing: list[str]) -> tuple[Path | None, dict[str, list[Path]]]:
    root, where = resolve(name)
    how = f"pass --sd-model DIR or run `huggingface-cli download {SD_MODEL}`"
    if root is None:
        missing.append(f"Stable Diffusion model {name!r}: {where}; {how}")
        return None, {}
    files: dict[str, list[Path]] = {}
    for part, names in _SD_PARTS.items():
        folder = root / part
        if not (folder / "config.json").is_file() and part not in ("tokenizer", "scheduler"):
            missing.append(f"Stable Diffusion {part} of {name!r}: no {folder / 'config.json'}; {how}")
            continue
        if first_existing(folder, names) is None:
            missing.append(f"Stable Diffusion {part} of {name!r}: none of {', '.join(names)} in {folder}; {how}")
            continue
        if part in ("unet", "vae", "text_encoder"):
            files[part] = weight_files(folder, names)
    return root, files


def _check_clip(name: str, missing: list[str]) -> tuple[Path | None, list[Path]]:
    root, where = resolve(name)
    how = f"pass --clip-model DIR or run `huggingface-cli download {CLIP_MODEL}`"
    if root is None:
        missing.append(f"CLIP image encoder {name!r}: {where}; {how}")
        return None, []
    files = weight_files(root, TRANSFORMERS_WEIGHTS)
    if not (root / "config.json").is_file() or not files:
        missing.append(f"CLIP image encoder {name!r}: no config.json and weights in {root}; {how}")
        return None, []
    return root, files


def _check_ckpt(kind: str, path, flag: str, allow_untrained: bool, missing: list[str]) -> None:
    if path is None:
        if not allow_untrained:
            missing.append(
                f"{kind} checkpoint: none given; pass {flag} FILE|DIR|HUB_ID (made by `tdr train-{kind}`), "
                "or --allow-untrained for a smoke test with random weights"
            )
        return
    found, where = locate(path)
    if found is None:
        hint = f" or run `huggingface-cli download {path}`" if "HF cache" in where else ""
        missing.append(f"{kind} {path}: {where}; pass {flag} FILE|DIR|HUB_ID{hint}")



def default_dtype(device: torch.device | str) -> torch.dtype:
    """fp16 on CUDA, fp32 elsewhere (CPU fp16 convolutions are slow or missing)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def _scheduler_config(path: Path | None) -> dict:
    """The paper's DDIM settings over the model's own training schedule (betas, prediction type)."""
    cfg = dict(PAPER_SCHEDULER_CONFIG)
    if path is not None and path.is_file():
        own = json.loads(path.read_text())
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
        cfg.update({k: own[k] for k in keys if k in own})
    return cfg


def _check_fit(mapper: Mapper, cleaner: Cleaner, parts: dict, sources: dict) -> None:
    """Refuse a mapper/cleaner made for other models (one sentence each)."""
    if mapper is None:
        return
    mc = mapper.config
    clip_dim = parts["clip"].config.hidden_size
    word_dim = parts["text_encoder"].config.hidden_size
    if mc.clip_dim != clip_dim or mc.word_dim != word_dim:
        raise TdrError(
            f"The mapper {sources.get('mapper')} maps {mc.clip_dim}-d CLIP tokens to {mc.word_dim}-d words, "
            f"but the loaded models need {clip_dim} -> {word_dim}; pass the mapper trained for these models."
        )
    if [tuple(x[:3]) for x in mc.kv_layers] != [tuple(x[:3]) for x in cross_attention_layers(parts["unet"])]:
        raise TdrError(
            f"The mapper {sources.get('mapper')} holds key/value copies for another UNet's cross-attention "
            "layers; pass the mapper trained for this Stable Diffusion model."
        )
    if cleaner is None:
        return
    cc = cleaner.config
    if cc.word_dim != word_dim or cc.num_words != mc.num_words:
        raise TdrError(
            f"The cleaner {sources.get('cleaner')} cleans {cc.num_words} words of {cc.word_dim} dims, but the "
            f"mapper makes {mc.num_words} of {word_dim}; pass the cleaner trained with this mapper."
        )


def load_components(
    sd_model: str | os.PathLike = SD_MODEL,
    clip_model: str | os.PathLike = CLIP_MODEL,
    *,
    mapper_ckpt: str | os.PathLike | None = None,
    cleaner_ckpt: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    preset: str = "full",
    allow_untrained: bool = False,
    without: tuple[str, ...] = (),
) -> GuidanceModels:
    """Load every model guidance needs, offline, onto ``device`` in ``dtype`` (default: fp16 CUDA, fp32 CPU).

    ``preset="full"``: real models from local directories or the HF cache; raises one
    :class:`ModelNotFoundError` naming every missing piece, and refuses to run without mapper and cleaner
    checkpoints unless ``allow_untrained`` (random mapper/cleaner, seeded). ``preset="tiny"``: tiny random
    models from configs (``sd_model``/``clip_model`` ignored); checkpoints are optional and, when given,
    must match the tiny models. ``without``: parts of ``("clip", "mapper", "cleaner")`` that the guidance
    source does not use; they are neither looked for nor loaded (``None`` in the result).
    """
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    if preset not in PRESETS:
        raise TdrError(f"Unknown model preset {preset!r}; use one of {', '.join(map(repr, PRESETS))}.")
    unknown = set(without) - {"clip", "mapper", "cleaner"}
    if unknown:
        raise ValueError(f"without: unknown parts {sorted(unknown)}")
    if "clip" in without and "mapper" not in without:
        raise ValueError("the mapper needs the CLIP image encoder")
    missing: list[str] = []
    for kind, path in (("mapper", mapper_ckpt), ("cleaner", cleaner_ckpt)):
        if kind not in without:
            _check_ckpt(kind, path, f"--{kind}", allow_untrained or preset == "tiny", missing)
    sources: dict = {"preset": preset}

    if preset == "tiny":
        if missing:
            raise ModelNotFoundError("Missing for guidance (nothing is downloaded):\n- " + "\n- ".join(missing))
        parts = tiny_components()
        sources.update(sd_model="tiny", clip_model="tiny", seed=TINY_SEED)
        scheduler_config = dict(PAPER_SCHEDULER_CONFIG)
        clip_mean, clip_std = CLIP_MEAN, CLIP_STD
    else:
        sd_root, sd_files = _check_sd(str(sd_model), missing)
        clip_root, clip_files = _check_clip(str(clip_model), missing) if "clip" not in without else (None, [])
        if missing:
            raise ModelNotFoundError("Missing for guidance (nothing is downloaded):\n- " + "\n- ".join(missing))
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModel

        offline = {"local_files_only": True, "dtype": dtype}
        with quiet():
            parts = {
                "unet": UNet2DConditionModel.from_pretrained(sd_root, subfolder="unet", **offline),
                "vae": AutoencoderKL.from_pretrained(sd_root, subfolder="vae", **offline),
                "text_encoder": CLIPTextModel.from_pretrained(sd_root / "text_encoder", **offline),
                "tokenizer": CLIPTokenizer.from_pretrained(sd_root / "tokenizer", local_files_only=True),
                "clip": CLIPVisionModel.from_pretrained(clip_root, **offline) if clip_root else None,
            }
        scheduler_config = _scheduler_config(sd_root / "scheduler" / "scheduler_config.json")
        clip_mean, clip_std = CLIP_MEAN, CLIP_STD
        pre = clip_root / "preprocessor_config.json" if clip_root else None
        if pre is not None and pre.is_file():
            pcfg = json.loads(pre.read_text())
            clip_mean = tuple(pcfg.get("image_mean", clip_mean))
            clip_std = tuple(pcfg.get("image_std", clip_std))
        sources.update(
            sd_model=str(sd_model),
            clip_model=str(clip_model),
            weight_files={**{f"sd/{k}": v for k, v in sd_files.items()}, **({"clip": clip_files} if clip_root else {})},
        )
        word_dim = parts["text_encoder"].config.hidden_size
        with torch.random.fork_rng(devices=[]):  # untrained (allow_untrained): seeded random weights
            torch.manual_seed(UNTRAINED_SEED)
            if mapper_ckpt is None and "mapper" not in without:
                parts["mapper"] = Mapper.for_models(parts["unet"], parts["clip"].config.hidden_size, word_dim)
            if cleaner_ckpt is None and "cleaner" not in without:
                parts["cleaner"] = Cleaner(CleanerConfig(word_dim))

    for kind, path in (("mapper", mapper_ckpt), ("cleaner", cleaner_ckpt)):
        if kind in without:
            parts[kind] = None
            continue
        parts[kind] = load_checkpoint(path, kind) if path is not None else parts[kind]
        sources[kind] = str(path) if path is not None else None
        sources[kind + "_path"] = str(locate(path)[0]) if path is not None else None
    if "clip" in without:
        parts["clip"] = None
    sources["without"] = sorted(without)
    _check_fit(parts["mapper"], parts["cleaner"], parts, sources)

    return models_from_parts(
        parts,
        device=device,
        dtype=dtype,
        scheduler_config=scheduler_config,
        clip_mean=clip_mean,
        clip_std=clip_std,
        sources=sources,
    )


def models_from_parts(
    parts: dict,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    scheduler_config: dict | None = None,
    clip_mean: tuple = CLIP_MEAN,
    clip_std: tuple = CLIP_STD,
    sources: dict | None = None,
) -> GuidanceModels:
    """Bundle modules (as from :func:`random_components`) on ``device`` in ``dtype``, frozen, eval mode."""
    device = torch.device(device)
    moved = dict(parts)
    for k in ("unet", "vae", "text_encoder", "clip", "mapper", "cleaner"):
        if parts.get(k) is None:
            moved[k] = None
            continue
        module = parts[k].to(device)
        if next(module.parameters()).dtype != dtype:
            with quiet():  # diffusers warns on every dtype cast
                module = module.to(dtype)
        moved[k] = module.eval().requires_grad_(False)
    return GuidanceModels(
        unet=moved["unet"],
        vae=moved["vae"],
        text_encoder=moved["text_encoder"],
        tokenizer=moved["tokenizer"],
        scheduler_config=dict(scheduler_config or PAPER_SCHEDULER_CONFIG),
        clip=moved["clip"],
        mapper=moved["mapper"],
        cleaner=moved["cleaner"],
        device=device,
        dtype=dtype,
        clip_mean=tuple(clip_mean),
        clip_std=tuple(clip_std),
        sources=dict(sources or {"preset": "random"}),
    )

