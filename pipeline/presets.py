"""Model shapes: the real models' configs (for random-weight benchmarks and parameter counts) and the
``tiny`` preset, random models of the same classes from small configs with fixed seeds (as diffusers'
fast tests build theirs): same code paths, seconds on a CPU.

Real models (Lin et al., CVPR 2024): Stable Diffusion 2.1-base (UNet, VAE, OpenCLIP ViT-H/14 text tower)
and the CLIP ViT-H/14 image encoder; the configs below are theirs, in diffusers' / transformers' names.
"""

from __future__ import annotations

import torch

from .cleaner import Cleaner, CleanerConfig
from .mapper import Mapper, MapperConfig

TINY_SEED = 0

# --- the real models (shapes only) ---
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
    cleaner_hidden: int = CleanerConfig.hidden_dim,
    num_words: int = MapperConfig.num_words,
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


def tiny_components(seed: int = TINY_SEED) -> dict:
    """The ``tiny`` preset's random models (fp32, CPU): :func:`random_components` of the tiny configs."""
    return random_components(TINY_UNET_CONFIG, TINY_VAE_CONFIG, TINY_TEXT_CONFIG, TINY_VISION_CONFIG,
                             cleaner_hidden=TINY_CLEANER_HIDDEN, seed=seed)
