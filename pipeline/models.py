"""Loading the guidance models: real ones offline, or a ``tiny`` random preset for tests.

Real models (Lin et al., CVPR 2024): Stable Diffusion 2.1-base in diffusers' layout (subfolders ``unet``,
``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``) and the CLIP ViT-H/14 image encoder
(transformers ``CLIPVisionModel``), each given as a local directory or a hub id already in the Hugging Face
cache. Nothing is ever downloaded (``local_files_only``); everything missing is reported in one
:class:`~tdr.cache.errors.ModelNotFoundError`.

Mapper / cleaner: a schema-1 checkpoint file, a folder in the layout of :mod:`tdr.pipeline.pretrained`
(``config.json`` + ``model.safetensors``) or a Hub repo id of such a folder in the HF cache. The checkpoint
file format (``torch.load(path, weights_only=True)`` reads it)::

    {
        "schema": 1,
        "kind": "mapper" | "cleaner",
        "config": MapperConfig.to_dict() | CleanerConfig.to_dict(),   # dims (+ the UNet's attn2 names/shapes)
        "state_dict": {name: tensor},                                 # Mapper / Cleaner state_dict
        "meta": {...},                                                # free-form JSON-able (training run, step)
    }

The ``tiny`` preset builds random models of the same classes from small configs with fixed seeds (as
diffusers' fast tests do): same code paths, seconds on a CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..cache.errors import ModelNotFoundError, TdrError
from .clip import CLIP_MEAN, CLIP_STD
from .cleaner import Cleaner, CleanerConfig
from .mapper import Mapper, MapperConfig, cross_attention_layers
from .pretrained import load_pretrained, locate, textual_sha256
from .sampler import PAPER_SCHEDULER_CONFIG

SCHEMA = 1
SD_MODEL = "stabilityai/stable-diffusion-2-1-base"
CLIP_MODEL = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
TINY_SEED = 0
UNTRAINED_SEED = 0

# --- configs of the real models (shapes only; used for random-weight benchmarks and parameter counts) ---
SD21_BASE_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "attention_head_dim": (5, 10, 20, 20),
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "norm_num_groups": 32,
}
SD_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD21_TEXT_CONFIG = {  # OpenCLIP ViT-H/14 text tower as in SD-2.1 (23 of its 24 layers)
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 512,
}
VIT_H14_VISION_CONFIG = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "hidden_act": "gelu",
    "projection_dim": 1024,
}

# --- the tiny preset ---
TINY_UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "attention_head_dim": (2, 4),
    "cross_attention_dim": 32,
    "use_linear_projection": True,
    "norm_num_groups": 8,
}
TINY_VAE_CONFIG = {  # four levels, so one latent pixel is 8x8 pixels as in SD
    **SD_VAE_CONFIG,
    "block_out_channels": (8, 8, 16, 16),
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 64,
}
TINY_TEXT_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
}
TINY_VISION_CONFIG = {  # the real 224 / patch-14 geometry (257 tokens), tiny width
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 224,
    "patch_size": 14,
    "hidden_act": "gelu",
}
TINY_CLEANER_HIDDEN = 40


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


# ----------------------------------------------------------------------------------------------------------
# checkpoints


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def module_checkpoint(module: Mapper | Cleaner, meta: dict | None = None) -> dict:
    """A mapper or cleaner as the schema-1 payload of this module's docstring (tensors on the CPU, in their
    dtype), for :func:`tdr.runs.checkpoint.save`."""
    kind = "mapper" if isinstance(module, Mapper) else "cleaner"
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    return {"schema": SCHEMA, "kind": kind, "config": module.config.to_dict(), "state_dict": state,
            "meta": dict(meta or {})}


def load_checkpoint(path: str | os.PathLike, kind: str) -> Mapper | Cleaner:
    """Read a mapper or cleaner (on CPU): a checkpoint file (in the dtype it was saved in), a folder of
    :mod:`tdr.pipeline.pretrained` or a Hub id of one in the HF cache."""
    found, where = locate(path)
    if found is None:
        raise ModelNotFoundError(f"The {kind} {path} was not found ({where}).")
    if found.is_dir():
        return load_pretrained(found, kind)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelNotFoundError(f"The {kind} checkpoint {path} does not exist.") from None
    except Exception as e:
        raise TdrError(f"{path} is not a readable {kind} checkpoint ({type(e).__name__}).") from None
    if not isinstance(ckpt, dict) or ckpt.get("schema") != SCHEMA or ckpt.get("kind") != kind:
        got = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise TdrError(f"{path} is not a schema-{SCHEMA} {kind} checkpoint (it holds {got!r}).")
    try:
        if kind == "mapper":
            module: Mapper | Cleaner = Mapper(MapperConfig.from_dict(ckpt["config"]))
        else:
            module = Cleaner(CleanerConfig.from_dict(ckpt["config"]))
        module.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise TdrError(f"The {kind} checkpoint {path} is inconsistent ({type(e).__name__}): save it again.") from None
    return module


# ----------------------------------------------------------------------------------------------------------
# tiny / random components


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level BPE alphabet: every byte -> a printable unicode character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def tiny_tokenizer():
    """An offline CLIP tokenizer: the 512 byte-level symbols, a few merges (``a photo of``), 77 tokens."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    merges = [("p", "h"), ("ph", "o"), ("pho", "t"), ("phot", "o</w>"), ("o", "f</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def random_components(
    unet_config: dict,
    vae_config: dict,
    text_config: dict,
    vision_config: dict,
    *,
    cleaner_hidden: int = 1280,
    num_words: int = 20,
    seed: int = TINY_SEED,
    device: torch.device | str = "cpu",
) -> dict:
    """Random models of the real classes from configs (fp32), each seeded from ``seed`` (global RNG kept)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

    tokenizer = tiny_tokenizer()
    text_cfg = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **text_config,
    }
    text_cfg["vocab_size"] = max(text_cfg["vocab_size"], len(tokenizer))
    builders = {
        "unet": lambda: UNet2DConditionModel(**unet_config),
        "vae": lambda: AutoencoderKL(**vae_config),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**text_cfg)),
        "clip": lambda: CLIPVisionModel(CLIPVisionConfig(**vision_config)),
    }
    out: dict = {"tokenizer": tokenizer}
    with torch.random.fork_rng(devices=[]), torch.device(device):
        for k, (name, build) in enumerate(builders.items()):
            torch.manual_seed(seed + k)
            out[name] = build().eval()
        torch.manual_seed(seed + len(builders))
        out["mapper"] = Mapper.for_models(
            out["unet"], vision_config["hidden_size"], text_cfg["hidden_size"], num_words
        )
        torch.manual_seed(seed + len(builders) + 1)
        out["cleaner"] = Cleaner(CleanerConfig(text_cfg["hidden_size"], cleaner_hidden, num_words))
    return out


# ----------------------------------------------------------------------------------------------------------
# finding real models offline

_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_SD_PARTS = {  # subfolder -> files of which one must exist
    "unet": _DIFFUSERS_WEIGHTS,
    "vae": _DIFFUSERS_WEIGHTS,
    "text_encoder": _TRANSFORMERS_WEIGHTS,
    "tokenizer": ("tokenizer.json", "vocab.json"),
    "scheduler": ("scheduler_config.json",),
}


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (HF_HUB_CACHE, HF_HOME, default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def _looks_like_hub_id(name: str) -> bool:
    parts = str(name).split("/")
    return len(parts) == 2 and all(parts) and not str(name).startswith((".", "~"))


def _resolve(name: str | os.PathLike) -> tuple[Path | None, str]:
    """A model name -> (local directory or None, where it was looked for)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path, f"directory {path}"
    if not _looks_like_hub_id(str(name)):
        return None, f"no directory {path}"
    cache = hf_cache_dir()
    where = f"not in the HF cache {cache / ('models--' + str(name).replace('/', '--'))}"
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name), cache_dir=cache, local_files_only=True)), where
    except Exception:
        return None, where


def _first_existing(folder: Path, names: Iterable[str]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _weight_files(folder: Path, names: Iterable[str]) -> list[Path]:
    """The weight files a loader reads from ``folder`` (shards listed by an index file included)."""
    first = _first_existing(folder, names)
    if first is None:
        return []
    if first.name.endswith(".index.json"):
        shards = sorted(set(json.loads(first.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    return [first]


def _check_sd(name: str, missing: list[str]) -> tuple[Path | None, dict[str, list[Path]]]:
    root, where = _resolve(name)
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
        if _first_existing(folder, names) is None:
            missing.append(f"Stable Diffusion {part} of {name!r}: none of {', '.join(names)} in {folder}; {how}")
            continue
        if part in ("unet", "vae", "text_encoder"):
            files[part] = _weight_files(folder, names)
    return root, files


def _check_clip(name: str, missing: list[str]) -> tuple[Path | None, list[Path]]:
    root, where = _resolve(name)
    how = f"pass --clip-model DIR or run `huggingface-cli download {CLIP_MODEL}`"
    if root is None:
        missing.append(f"CLIP image encoder {name!r}: {where}; {how}")
        return None, []
    files = _weight_files(root, _TRANSFORMERS_WEIGHTS)
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


# ----------------------------------------------------------------------------------------------------------
# load_components


@contextlib.contextmanager
def _quiet():
    """Silence diffusers/transformers load reports and progress bars (library code never prints)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    levels = dlog.get_verbosity(), tlog.get_verbosity()
    bars = tlog.is_progress_bar_enabled()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(levels[0])
        tlog.set_verbosity(levels[1])
        if bars:
            tlog.enable_progress_bar()


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
    if preset not in ("full", "tiny"):
        raise TdrError(f"Unknown model preset {preset!r}; use 'full' or 'tiny'.")
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
        parts = random_components(
            TINY_UNET_CONFIG,
            TINY_VAE_CONFIG,
            TINY_TEXT_CONFIG,
            TINY_VISION_CONFIG,
            cleaner_hidden=TINY_CLEANER_HIDDEN,
        )
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
        with _quiet():
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
            with _quiet():  # diffusers warns on every dtype cast
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


# ----------------------------------------------------------------------------------------------------------
# fingerprint

_HASHES: dict[tuple[str, int, int], str] = {}


def weight_sha256(path: Path) -> str:
    """sha256 of a weight file; free for HF-cache files (the blob's name is its sha256), else hashed once."""
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and len(real.name) == 64 and all(c in "0123456789abcdef" for c in real.name):
        return real.name
    st = real.stat()
    key = (str(real), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = file_sha256(real)
    return _HASHES[key]


def fingerprint(models: GuidanceModels) -> dict:
    """Everything about the models that determines guidance (JSON-able).

    Model names, sha256 of every weight file loaded (or the tiny preset and its seed), mapper and cleaner
    checkpoint sha256 (``"untrained"`` when random; a folder's: :func:`~tdr.pipeline.pretrained.textual_sha256`),
    DDIM schedule, dtype and device type; parts loaded ``without`` are left out. Sampling settings (steps,
    scale, seed, layout, size) and the guidance source's entries are the caller's to add.
    """
    s = models.sources
    without = set(s.get("without", ()))
    fp: dict = {"preset": s["preset"], "sd_model": s.get("sd_model"), "clip_model": s.get("clip_model")}
    if "clip" in without:
        del fp["clip_model"]
    if s["preset"] == "tiny":
        fp["seed"] = s["seed"]
    else:
        fp["weights"] = {
            part: {p.name: weight_sha256(p) for p in files} for part, files in s["weight_files"].items()
        }
    for kind in ("mapper", "cleaner"):
        if kind not in without:
            fp[kind] = textual_sha256(s.get(kind + "_path") or s[kind]) if s.get(kind) else "untrained"
    fp["scheduler"] = dict(models.scheduler_config)
    fp["dtype"] = str(models.dtype).removeprefix("torch.")
    fp["device_type"] = models.device.type
    return fp
