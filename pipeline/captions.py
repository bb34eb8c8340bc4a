"""Captioning degraded images with an image-to-text model (the paper's explicit route: BLIP-2, Li et al.,
ICML 2023, ``Salesforce/blip2-opt-2.7b``, 3.9B parameters).

Any model transformers loads with ``AutoModelForImageTextToText`` + ``AutoProcessor`` and that captions an
image without a text prompt works (BLIP-2, BLIP, …), from a local folder or a Hub id already in the HF cache;
nothing is downloaded. Captions are greedy (``num_beams=1``, no sampling), batched, in the guidance dtype
(fp16 on GPU).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelNotFoundError, TdrError
from .hub import TRANSFORMERS_WEIGHTS, quiet, resolve, weight_files
from .settings import CAPTION_MODEL

MAX_NEW_TOKENS = 30


class Captioner:
    """Images (list of (H, W, 3) uint8) -> captions (list of str)."""

    def __init__(self, model, processor, name: str, weight_files: Sequence[Path] = (),
                 max_new_tokens: int = MAX_NEW_TOKENS):
        self.model = model
        self.processor = processor
        self.name = name
        self.weight_files = list(weight_files)
        self.max_new_tokens = max_new_tokens

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.inference_mode()
    def __call__(self, images: Sequence[np.ndarray]) -> list[str]:
        inputs = self.processor(images=list(images), return_tensors="pt")
        inputs = {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                  for k, v in inputs.items()}
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        if "input_ids" in inputs and out.shape[1] > inputs["input_ids"].shape[1]:  # decoder-only: drop the prompt
            out = out[:, inputs["input_ids"].shape[1]:]
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]


def load_captioner(name: str | os.PathLike = CAPTION_MODEL, *, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32, max_new_tokens: int = MAX_NEW_TOKENS) -> Captioner:
    """Load an image-to-text model offline; one :class:`ModelNotFoundError` line naming it if it is missing."""
    root, where = resolve(str(name))
    how = f"pass a folder as caption_model or run `huggingface-cli download {name}`"
    if root is None:
        raise ModelNotFoundError(f"Caption model {str(name)!r}: {where}; {how}.", param="caption_model")
    files = weight_files(root, TRANSFORMERS_WEIGHTS)
    if not (root / "config.json").is_file() or not files:
        raise ModelNotFoundError(f"Caption model {str(name)!r}: no config.json and weights in {root}; {how}.",
                                 param="caption_model")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    with quiet():
        try:
            processor = AutoProcessor.from_pretrained(root, local_files_only=True)
            model = AutoModelForImageTextToText.from_pretrained(root, local_files_only=True, dtype=dtype)
        except (ValueError, KeyError, OSError) as exc:
            why = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise TdrError(f"Caption model {str(name)!r} is not an image-to-text model transformers can load "
                           f"({why}).") from None
    model = model.to(device).eval().requires_grad_(False)
    return Captioner(model, processor, str(name), files, max_new_tokens)
