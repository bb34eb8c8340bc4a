"""Guidance throughput: diffusers' per-image StableDiffusionPipeline vs tdr's batched pipeline, same run.

Random weights with the real shapes (compute does not depend on the weights): ``--preset sd21`` builds the
SD-2.1-base UNet (block_out_channels (320, 640, 1280, 1280), heads (5, 10, 20, 20), cross-attention 1024,
linear projections), SD's VAE, the SD-2.1 text encoder and the CLIP ViT-H/14 image encoder, at the paper's
settings (200 DDIM steps, CFG 5, 512^2). ``--preset small`` is a reduced UNet at 256^2 (32^2 latents) with
few steps for a CPU. Prints seconds per image for (a) diffusers, one image per call, and (b) tdr, batched,
their ratio, the achieved UNet TFLOP/s (FLOPs counted with torch's FlopCounterMode on one forward), and the
largest pixel difference between the two outputs for the same images (uint8 levels).

    python bench/guidance_throughput.py                       # GPU: sd21, fp16, batch 16
    python bench/guidance_throughput.py --compile             # + torch.compile of the UNet
    python bench/guidance_throughput.py --preset small        # CPU, < 3 min
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from tdr.pipeline import GuidancePipeline
from tdr.pipeline.injection import encode_injected
from tdr.pipeline.loading import models_from_parts
from tdr.pipeline.presets import (
    SD21_BASE_UNET_CONFIG,
    SD21_TEXT_CONFIG,
    SD_VAE_CONFIG,
    TINY_TEXT_CONFIG,
    TINY_VAE_CONFIG,
    TINY_VISION_CONFIG,
    VIT_H14_VISION_CONFIG,
    random_components,
)
from tdr.pipeline.sampler import initial_noise, latent_scale, make_scheduler

SMALL_UNET_CONFIG = {
    **SD21_BASE_UNET_CONFIG,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "attention_head_dim": (2, 4, 4),
    "cross_attention_dim": TINY_TEXT_CONFIG["hidden_size"],
    "sample_size": 32,
}
PRESETS = {
    # name: (unet, vae, text, vision, cleaner hidden, default size, default steps)
    "sd21": (SD21_BASE_UNET_CONFIG, SD_VAE_CONFIG, SD21_TEXT_CONFIG, VIT_H14_VISION_CONFIG, 1280, 512, 200),
    "small": (SMALL_UNET_CONFIG, TINY_VAE_CONFIG, TINY_TEXT_CONFIG, TINY_VISION_CONFIG, 40, 256, 5),
}


def parse_args(argv=None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="sd21" if cuda else "small")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16" if cuda else "fp32")
    p.add_argument("--batch", type=int, default=16 if cuda else 4, help="images per tdr call")
    p.add_argument("--diffusers-images", type=int, default=2, help="images timed through diffusers, one per call")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: 200 sd21, 5 small)")
    p.add_argument("--scale", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--size", type=int, default=None, help="output side (default: 512 sd21, 256 small)")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="torch.compile the UNet (MODE: default, reduce-overhead = + CUDA graphs, max-autotune)")
    p.add_argument("--channels-last", action="store_true", help="UNet in channels_last memory format")
    p.add_argument("--attention", choices=["auto", "sdpa", "xformers"], default="auto")
    p.add_argument("--rounds", type=int, default=1 if cuda else 2,
                   help="alternating (a)/(b) timing rounds; the best round of each counts (shared, noisy machines)")
    return p.parse_args(argv)


def attn2_processors(unet) -> dict:
    return {name: m.processor for name, m in unet.named_modules() if name.endswith("attn2")}


def set_attn2_processors(unet, processors: dict) -> None:
    modules = dict(unet.named_modules())
    for name, proc in processors.items():
        modules[name].set_processor(proc)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def unet_tflop_per_latent(unet, latent: int, context: torch.Tensor) -> float:
    """TFLOP of one UNet forward on one latent (matmul/conv/attention FLOPs, torch's counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, unet.config.in_channels, latent, latent, device=context.device, dtype=context.dtype)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor(500, device=context.device), encoder_hidden_states=context[:1])
    return counter.get_total_flops() / 1e12


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    unet_cfg, vae_cfg, text_cfg, vision_cfg, hidden, size, steps = PRESETS[args.preset]
    size, steps = args.size or size, args.steps or steps

    t0 = time.perf_counter()
    parts = random_components(unet_cfg, vae_cfg, text_cfg, vision_cfg, cleaner_hidden=hidden, device=device)
    models = models_from_parts(parts, device=device, dtype=dtype)
    if args.channels_last:
        models.unet.to(memory_format=torch.channels_last)
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (size * 3 // 4, size, 3), dtype=np.uint8) for _ in range(args.batch)]
    ids = [f"img{i}" for i in range(args.batch)]
    f = latent_scale(models.vae)
    latent = size // f

    # conditioning for the diffusers baseline: our words for the same images
    pipe_for_words = GuidancePipeline(models, attention="sdpa")
    with torch.inference_mode():
        cond = encode_injected(models.text_encoder, models.tokenizer, pipe_for_words.words(images))
        uncond = pipe_for_words.uncond_embeddings()
    noise = initial_noise(ids, 0, (models.unet.config.in_channels, latent, latent)).to(device)
    tflop = unet_tflop_per_latent(models.unet, latent, cond)

    # (b) tdr, batched; its processors route cross-attention through the mapper's k/v copies (equal to the
    # UNet's own here, so both pipelines should give the same images)
    pipe = GuidancePipeline(models, attention=args.attention, compile=args.compile or False, batch_invariant=False)
    ours_procs = attn2_processors(models.unet)
    t0 = time.perf_counter()
    pipe(images, ids, steps=2, scale=args.scale, size=size)  # warm-up (+ compilation)
    sync(device)
    warm_s = time.perf_counter() - t0

    # (a) diffusers StableDiffusionPipeline, one image per call, diffusers' own cross-attention processor
    from diffusers import StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0

    standard = {name: AttnProcessor2_0() for name in ours_procs}
    sd = StableDiffusionPipeline(
        vae=models.vae,
        text_encoder=models.text_encoder,
        tokenizer=models.tokenizer,
        unet=models.unet,
        scheduler=make_scheduler(models.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sd.set_progress_bar_config(disable=True)

    def sd_call(i: int, n_steps: int) -> np.ndarray:
        out = sd(
            prompt_embeds=cond[i : i + 1],
            negative_prompt_embeds=uncond,
            latents=noise[i : i + 1].to(dtype),
            num_inference_steps=n_steps,
            guidance_scale=args.scale,
            height=size,
            width=size,
            output_type="np",
        ).images
        return np.round(out * 255).astype(np.uint8)

    def timed(fn, n: int) -> tuple[float, np.ndarray]:
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        return (time.perf_counter() - t) / n, out

    n_ref = min(args.diffusers_images, args.batch)
    sd_times, tdr_times = [], []
    for r in range(args.rounds):  # alternate, so both see the same machine load
        set_attn2_processors(models.unet, standard)
        if r == 0:
            sd_call(0, 2)  # warm-up
        sd_s, ref = timed(lambda: np.concatenate([sd_call(i, steps) for i in range(n_ref)]), n_ref)
        set_attn2_processors(models.unet, ours_procs)  # the same objects: a compiled UNet stays valid
        tdr_s, ours = timed(lambda: pipe(images, ids, steps=steps, scale=args.scale, size=size), args.batch)
        sd_times.append(sd_s)
        tdr_times.append(tdr_s)
    sd_s, tdr_s = min(sd_times), min(tdr_times)

    diff = int(np.abs(ours[:n_ref].astype(int) - ref.astype(int)).max())
    flop = 2 * steps * tflop  # per image: uncond + cond latent per step
    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"threads {torch.get_num_threads()}, {args.dtype}, preset {args.preset}: {size}^2 ({latent}^2 latents), "
          f"{steps} steps, CFG {args.scale}; models built in {build_s:.1f} s")
    print(f"UNet: {tflop:.3g} TFLOP per latent per forward -> {flop:.3g} TFLOP per image")
    print(f"(a) diffusers StableDiffusionPipeline, 1 image/call: {sd_s:8.3f} s/image  "
          f"({flop / sd_s:.3g} TFLOP/s)  [{n_ref} images]")
    print(f"(b) tdr batched x{args.batch}, attention {pipe.attention_backend}, compile {args.compile or 'off'}"
          f"{', channels_last' if args.channels_last else ''}: {tdr_s:8.3f} s/image  ({flop / tdr_s:.3g} TFLOP/s)"
          f"  [warm-up {warm_s:.1f} s]")
    print(f"speed-up (a)/(b): {sd_s / tdr_s:.2f}x (best of {args.rounds} alternating rounds; all rounds "
          f"(a) {', '.join(f'{t:.3f}' for t in sd_times)}  (b) {', '.join(f'{t:.3f}' for t in tdr_times)});  "
          f"max |tdr - diffusers| = {diff} uint8 levels")


if __name__ == "__main__":
    main()
