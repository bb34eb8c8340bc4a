"""``GuidancePipeline``: degraded images -> guidance images (Lin et al., "Improving Image Restoration through
Removing Degradations in Textual Representations", CVPR 2024).

CLIP image encoder -> mapper (image to 20 words) -> cleaner (remove the degradation from the words) ->
text encoder (words injected into "a photo of a S") -> DDIM + classifier-free guidance on Stable Diffusion
2.1-base -> VAE decode -> uint8 RGB guidance. The part before DDIM is a guidance *source*
(:mod:`tdr.pipeline.sources`: ``textual``, the above; ``mapper-only``; ``caption``).

    models = load_components(sd_model, clip_model, mapper_ckpt=..., cleaner_ckpt=..., device="cuda")
    guidance = GuidancePipeline(models)(images, ids)                   # (B, 512, 512, 3) uint8, paper settings
    guidance = GuidancePipeline(models)(images, ids, steps=50, seed=1)  # any SamplingSettings field

    source = build_source("caption", device="cuda", dtype=torch.float16)            # tdr.pipeline.sources
    models = load_components(sd_model, device="cuda", without=source.without)
    guidance, captions = GuidancePipeline(models, source=source).generate(images, ids)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch

from .attention import install_mapper_kv, select_backend
from .clip import encode_image, preprocess
from .injection import encode_prompt
from .loading import GuidanceModels
from .sampler import DECODE_CHUNK, ddim_sample, decode_float, initial_noise, latent_scale, make_scheduler, to_uint8
from .settings import SamplingSettings
from .sources import TextualSource


class GuidancePipeline:
    """Makes guidance images from degraded images with :class:`GuidanceModels`.

    Args:
        models: from :func:`load_components` (``without=source.without``).
        source: a guidance source of :mod:`tdr.pipeline.sources` (default: ``textual``).
        attention: cross-attention backend, ``"auto"`` (xformers if it truly runs, else torch SDPA),
            ``"sdpa"`` or ``"xformers"``; the one chosen is ``self.attention_backend``.
        compile: ``torch.compile`` the UNet: ``False``, ``True`` (default mode) or a mode name
            (``"reduce-overhead"`` adds CUDA graphs, ``"max-autotune"``).
        batch_invariant: run images one at a time so that an image's result is bit-identical whatever
            batch, order or worker it comes in. Default: on for CPU, off for CUDA (speed; batched results
            agree to fp16 noise). Why it is needed on CPU (torch 2.13, fp32): GEMMs with 1-2 rows take another
            BLAS kernel than with 3+ rows (mapper/cleaner, time embedding: ~1e-7 differences) and oneDNN
            convolutions change their blocking with the batch size (~1e-6); amplified over the denoising loop
            these flip uint8 pixels. Bit-identity also needs the same torch build and
            ``torch.get_num_threads()`` (BLAS partitions its sums by thread count).
        decode_chunk: images per VAE decode call (bounds memory at 512^2).
    """

    def __init__(
        self,
        models: GuidanceModels,
        *,
        source=None,
        attention: str = "auto",
        compile: bool | str = False,
        batch_invariant: bool | None = None,
        decode_chunk: int = DECODE_CHUNK,
    ):
        self.models = models
        self.source = source or TextualSource()
        if models.mapper is not None:
            self.attention_backend = install_mapper_kv(models.unet, models.mapper, attention)
        else:  # no mapper k/v copies: the UNet's own cross-attention, diffusers' default processor
            select_backend(attention, models.device)
            self.attention_backend = "sdpa"
        self.compile_mode = ("default" if compile is True else compile) or None
        self.unet = torch.compile(models.unet, mode=self.compile_mode) if self.compile_mode else models.unet
        self._cudagraphs = self.compile_mode in ("reduce-overhead", "max-autotune")
        self.batch_invariant = models.device.type == "cpu" if batch_invariant is None else batch_invariant
        self.decode_chunk = decode_chunk
        self._uncond: torch.Tensor | None = None

    def _unet_call(self, *args, **kwargs):
        if self._cudagraphs:  # outputs of a CUDA-graph replay are overwritten by the next replay
            torch.compiler.cudagraph_mark_step_begin()
        return self.unet(*args, **kwargs)

    def uncond_embeddings(self) -> torch.Tensor:
        """(1, 77, D) text embeddings of the empty prompt (no injection), computed once."""
        if self._uncond is None:
            m = self.models
            self._uncond = encode_prompt(m.text_encoder, m.tokenizer, [""])
        return self._uncond

    @torch.inference_mode()
    def words(self, images: Sequence[np.ndarray], layout: str = SamplingSettings.layout) -> torch.Tensor:
        """Images -> cleaned word embeddings (B, 20, D) (steps 1-3 of ``__call__``)."""
        m = self.models
        pixels = preprocess(images, size=m.clip_size, layout=layout, device=m.device, mean=m.clip_mean, std=m.clip_std)
        tokens = encode_image(m.clip, pixels)  # (B, 1+P, d)
        return m.cleaner(m.mapper(tokens))  # (B, N, D)

    def __call__(self, images: Sequence[np.ndarray], ids: Sequence[str], settings: SamplingSettings | None = None,
                 **options) -> np.ndarray:
        """Degraded images (list of (H,W,3) uint8, any sizes) + their ids -> guidance (B,size,size,3) uint8.

        Arguments as :meth:`generate`. An image's guidance depends only on (models, source, image, id,
        settings).
        """
        return self.generate(images, ids, settings, **options)[0]

    @torch.inference_mode()
    def generate(
        self,
        images: Sequence[np.ndarray],
        ids: Sequence[str],
        settings: SamplingSettings | None = None,
        *,
        callback: Callable[[int, int], None] | None = None,
        texts: Sequence[dict | None] | None = None,
        **overrides,
    ) -> tuple[np.ndarray, list[dict] | None]:
        """Guidance (B,size,size,3) uint8 as ``__call__``, and the source's per-image texts (``caption``:
        ``{"raw", "prompt", "edited"}``; other sources: None).

        ``settings``: :class:`SamplingSettings` (default: the paper's); ``overrides``: fields of it to
        change (``steps=50, seed=1``). ``callback(step, steps)`` reports denoising progress. ``texts``:
        records to use instead of describing those images again (None entries are described).
        """
        settings = replace(settings or SamplingSettings(), **overrides).for_preset(self.models.sources.get("preset"))
        if len(images) != len(ids):
            raise ValueError(f"{len(images)} images but {len(ids)} ids")
        m = self.models
        f = latent_scale(m.vae)
        multiple = f * 2 ** (len(m.unet.config.block_out_channels) - 1)
        if settings.size % multiple:
            raise ValueError(f"size must be a multiple of {multiple}, got {settings.size}")
        if texts is not None and len(texts) != len(images):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        if self.batch_invariant and len(images) > 1:
            given = list(texts) if texts is not None else [None] * len(images)
            parts = [self.generate([im], [i], settings, texts=[t], callback=callback)
                     for im, i, t in zip(images, ids, given, strict=True)]
            described = [p[1][0] for p in parts] if parts[0][1] is not None else None
            return np.concatenate([p[0] for p in parts]), described

        # 1-4. the source: per-image texts (caption source), then conditional embeddings (B, 77, D)
        texts = self.source.describe(images, settings.layout, texts)
        cond = self.source.condition(m, images, settings.layout, texts)
        uncond = self.uncond_embeddings()
        # 5. prepare latents: per-image noise from (seed, id), fp32 on the CPU, then to the device
        shape = (m.unet.config.in_channels, settings.size // f, settings.size // f)
        latents = initial_noise(list(ids), settings.seed, shape).to(m.device)
        # 6. denoising loop: DDIM (eta 0) + CFG in one UNet call per step
        scheduler = make_scheduler(m.scheduler_config)
        latents = ddim_sample(
            self._unet_call, scheduler, latents, cond, uncond, steps=settings.steps, scale=settings.scale,
            callback=callback,
        )
        # 7. decode: VAE -> (B, size, size, 3) uint8
        images_out = decode_float(m.vae, latents, chunk=self.decode_chunk)
        return to_uint8(images_out).cpu().numpy(), texts
