"""DDIM sampling with classifier-free guidance over diffusers' UNet, VAE and scheduler.

DDIM (Song et al., "Denoising Diffusion Implicit Models", ICLR 2021), eta = 0, the step itself from
diffusers' :class:`~diffusers.DDIMScheduler`; classifier-free guidance (Ho & Salimans, 2022):
``eps = eps_u + s * (eps_c - eps_u)`` from ONE UNet call on the concatenated [uncond; cond] batch.
Paper settings (Lin et al., CVPR 2024): SD-2.1-base training schedule; steps, s and the output size are
:class:`tdr.pipeline.settings.SamplingSettings`'.

Initial noise is a function of (run seed, image id) only: each image draws its own (C, h, w) fp32 normal
sample on the CPU from ``torch.Generator().manual_seed(noise_seed(seed, image_id))``, so its guidance does
not depend on batch size, order or worker. Everything else stays on the device for the whole loop.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch
from diffusers import DDIMScheduler

# SD-2.1-base training schedule with the paper's DDIM settings.
PAPER_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


DECODE_CHUNK = 8  # latents per VAE decode call: bounds decoder activation memory at 512²


def make_scheduler(config: dict | None = None) -> DDIMScheduler:
    """A fresh DDIM scheduler (one per sampling call: schedulers hold per-call state)."""
    return DDIMScheduler.from_config({**PAPER_SCHEDULER_CONFIG, **(config or {})})


def noise_seed(seed: int, image_id: str) -> int:
    """A 63-bit generator seed from (run seed, image id): sha256 of ``f"{seed}:{image_id}"``."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def initial_noise(ids: Sequence[str], seed: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, h, w) fp32 CPU noise, row i drawn from its own generator seeded by (seed, ids[i])."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(noise_seed(seed, i))) for i in ids]
    return torch.stack(rows)


def latent_scale(vae) -> int:
    """Pixels per latent pixel: 2^(number of VAE levels - 1) (8 for SD)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def ddim_sample(
    unet: Callable,
    scheduler: DDIMScheduler,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    *,
    steps: int,
    scale: float,
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """DDIM (eta 0) + CFG from ``latents`` (B,C,h,w) x_T (fp32) to x_0 latents (B,C,h,w) fp32.

    ``cond`` (B, L, D) and ``uncond`` (1 or B, L, D) are text embeddings in the UNet's dtype; ``unet`` is
    a ``UNet2DConditionModel`` (or its compiled form). Latents and the guidance combination stay fp32;
    the UNet runs in its own dtype. ``callback(step, steps)`` reports progress.
    """
    b = latents.shape[0]
    device = latents.device
    dtype = cond.dtype
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps  # (steps,) long, on device
    # [uncond; cond] once for all steps: (2B, L, D)
    context = torch.cat([uncond.expand(b, -1, -1), cond])
    latents = latents * scheduler.init_noise_sigma
    for i, t in enumerate(timesteps.tolist()):
        x = torch.cat([latents, latents])
        x = scheduler.scale_model_input(x, t).to(dtype)
        eps = unet(x, timesteps[i], encoder_hidden_states=context, return_dict=False)[0].float()
        eps_u, eps_c = eps.chunk(2)
        eps = eps_u + scale * (eps_c - eps_u)
        latents = scheduler.step(eps, t, latents, eta=0.0, return_dict=False)[0]
        if callback is not None:
            callback(i + 1, steps)
    return latents


def decode_float(vae, latents: torch.Tensor, chunk: int = DECODE_CHUNK) -> torch.Tensor:
    """x_0 latents (B,C,h,w) -> images (B,3,H,W) float32 in [0,1]; decoded ``chunk`` at a time."""
    dtype = next(vae.parameters()).dtype
    z = latents / vae.config.scaling_factor  # 0.18215 for SD
    out = [vae.decode(part.to(dtype), return_dict=False)[0] for part in z.split(chunk)]
    return (torch.cat(out).float() / 2 + 0.5).clamp(0, 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) float [0,1] -> (B,H,W,3) uint8 (round to nearest)."""
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
