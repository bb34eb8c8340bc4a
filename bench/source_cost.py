"""What each guidance source costs per image, counted on the real model shapes (no weights, no GPU needed).

Every model is built from its real config on PyTorch's meta device; parameters are counted and one image's
forward FLOPs are counted with torch's ``FlopCounterMode`` (matmuls, convolutions, attention):

- shared by all sources: the SD-2.1-base UNet at 64^2 latents (x 2 for CFG x steps), the text encoder on
  77 tokens, the VAE decoder to 512^2;
- ``textual``: CLIP ViT-H/14 at 224^2 + mapper + cleaner; ``mapper-only``: the same without the cleaner;
- ``caption``: BLIP-2 opt-2.7b (ViT-g/14 at 224^2, Q-Former with 32 queries, OPT-2.7B over the 32 query
  tokens + ``--tokens`` caption tokens, counted as one forward over all of them, which is what greedy
  decoding with a KV cache computes up to the attention terms).

    python bench/source_cost.py                # 200 steps, 30 caption tokens
    python bench/source_cost.py --steps 100

FLOPs are not seconds: decoding 30 tokens one at a time is bound by reading the 2.7B OPT weights per
token, not by FLOPs; BENCHMARKS.md says how the two compare.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from tdr.pipeline.cleaner import Cleaner, CleanerConfig
from tdr.pipeline.mapper import Mapper, MapperConfig, cross_attention_layers
from tdr.pipeline.presets import SD21_BASE_UNET_CONFIG, SD21_TEXT_CONFIG, SD_VAE_CONFIG, VIT_H14_VISION_CONFIG

# Salesforce/blip2-opt-2.7b (its config.json): EVA ViT-g/14, a 12-layer Q-Former, OPT-2.7B
BLIP2_OPT27_CONFIG = {
    "vision_config": {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39,
                      "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "qkv_bias": True},
    "qformer_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                       "num_attention_heads": 12, "encoder_hidden_size": 1408, "cross_attention_frequency": 2},
    "text_config": {"model_type": "opt", "hidden_size": 2560, "ffn_dim": 10240, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "vocab_size": 50272, "word_embed_proj_dim": 2560,
                    "max_position_embeddings": 2048},
    "num_query_tokens": 32,
}


def count(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=30, help="caption tokens generated (tdr's max_new_tokens)")
    args = ap.parse_args()

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import Blip2Config, Blip2ForConditionalGeneration, CLIPTextConfig, CLIPTextModel, \
        CLIPVisionConfig, CLIPVisionModel

    rows = {}
    with torch.device("meta"), torch.no_grad():
        unet = UNet2DConditionModel(**SD21_BASE_UNET_CONFIG)
        vae = AutoencoderKL(**SD_VAE_CONFIG)
        text = CLIPTextModel(CLIPTextConfig(**SD21_TEXT_CONFIG))
        clip = CLIPVisionModel(CLIPVisionConfig(**VIT_H14_VISION_CONFIG))
        mapper = Mapper(MapperConfig(1280, 1024, 20, cross_attention_layers(unet)))
        cleaner = Cleaner(CleanerConfig(1024, 1280, 20))
        blip = Blip2ForConditionalGeneration(Blip2Config(**BLIP2_OPT27_CONFIG))

        ctx = torch.empty(1, 77, 1024)
        unet_f = count(lambda: unet(torch.empty(1, 4, 64, 64), torch.tensor([1]), encoder_hidden_states=ctx))
        rows["UNet, one forward (64^2 latents)"] = (params(unet), unet_f)
        sampling = 2 * args.steps * unet_f
        rows[f"UNet, {args.steps} steps x 2 (CFG)"] = (params(unet), sampling)
        rows["VAE decode to 512^2"] = (params(vae.decoder), count(lambda: vae.decode(torch.empty(1, 4, 64, 64))))
        rows["text encoder, 77 tokens"] = (params(text), count(lambda: text(input_ids=torch.zeros(1, 77, dtype=torch.long))))
        tokens = torch.empty(1, 257, 1280)
        rows["CLIP ViT-H/14, 224^2"] = (params(clip), count(lambda: clip(pixel_values=torch.empty(1, 3, 224, 224))))
        rows["mapper (20 words)"] = (params(mapper), count(lambda: mapper(tokens)))
        rows["cleaner"] = (params(cleaner), count(lambda: cleaner(torch.empty(1, 20, 1024))))
        n_q = BLIP2_OPT27_CONFIG["num_query_tokens"]
        vision_f = count(lambda: blip.vision_model(pixel_values=torch.empty(1, 3, 224, 224)))
        image_embeds = torch.empty(1, 257, 1408)
        qformer_f = count(lambda: blip.qformer(query_embeds=torch.empty(1, n_q, 768), encoder_hidden_states=image_embeds))
        lm = blip.language_model
        lm_f = count(lambda: lm(inputs_embeds=torch.empty(1, n_q + 1 + args.tokens, 2560)))
        rows["BLIP-2 ViT-g/14, 224^2"] = (params(blip.vision_model), vision_f)
        rows["BLIP-2 Q-Former (32 queries)"] = (params(blip.qformer) + params(blip.language_projection), qformer_f)
        rows[f"BLIP-2 OPT-2.7B, {n_q}+1+{args.tokens} tokens"] = (params(lm), lm_f)
        rows["BLIP-2 opt-2.7b total"] = (params(blip), vision_f + qformer_f + lm_f)

    print(f"{'part':42s} {'params':>10s} {'GFLOP/image':>14s}")
    for name, (p, f) in rows.items():
        print(f"{name:42s} {p / 1e6:9.0f}M {f / 1e9:14.1f}")
    shared = sampling + rows["VAE decode to 512^2"][1] + rows["text encoder, 77 tokens"][1]
    textual = rows["CLIP ViT-H/14, 224^2"][1] + rows["mapper (20 words)"][1]
    per_source = {"textual": textual + rows["cleaner"][1], "mapper-only": textual,
                  "caption": rows["BLIP-2 opt-2.7b total"][1]}
    print(f"\nshared sampling + decode: {shared / 1e12:.1f} TFLOP/image")
    for name, f in per_source.items():
        print(f"{name:12s} source: {f / 1e9:7.1f} GFLOP/image = {100 * f / shared:.2f}% of the shared part")


if __name__ == "__main__":
    main()
