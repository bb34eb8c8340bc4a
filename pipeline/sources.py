"""Guidance sources: how a batch of degraded images becomes Stable Diffusion conditioning (B, 77, D).

Everything after the conditioning — batched DDIM + CFG, per-image noise, one chunk per image, resume, dask
workers, the fingerprint — is shared (:class:`tdr.pipeline.GuidancePipeline`, :mod:`tdr.pipeline.generate`).
The three routes of Lin et al., "Improving Image Restoration through Removing Degradations in Textual
Representations", CVPR 2024:

- ``textual`` (the method, §3.2–3.3): CLIP image tokens -> mapper (20 words) -> cleaner -> injected into
  "a photo of a S"; needs both trained textual stages;
- ``mapper-only`` (supplement A, "without textual restoration"): the mapper's words injected directly, no
  cleaner; needs stage 1 only;
- ``caption`` (§3.1 and supplement B, "explicit"): the degraded image captioned by BLIP-2, degradation words
  removed (:mod:`tdr.pipeline.degradation_words`), the rest encoded as a plain prompt; needs no training.

    source = build_source("caption", device="cuda", dtype=torch.float16, caption_model="Salesforce/blip2-opt-2.7b")
    models = load_components(..., without=source.without)
    pipe = GuidancePipeline(models, source=source)

A source may describe each image in text (``describe``: the ``caption`` source's raw and cleaned captions,
stored beside the guidance); the others return None. ``fingerprint()`` holds what the source adds to the
guidance fingerprint; ``textual`` adds nothing, so stores made before sources existed keep their group.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..cache.layout import layout_region
from ..errors import TdrError
from .clip import encode_image, preprocess
from .injection import encode_injected, encode_prompt
from .settings import CAPTION_MODEL, DEFAULT_SOURCE

Texts = list[dict] | None  # per image {"raw": caption, "prompt": SD prompt, "edited": bool}, or None


class TextualSource:
    """The method: CLIP -> mapper -> cleaner -> words injected into "a photo of a S"."""

    name = "textual"
    without: tuple[str, ...] = ()
    use_cleaner = True

    @classmethod
    def load(cls, **options) -> "TextualSource":
        """The source with its own models loaded (none: the mapper and cleaner come with the guidance models)."""
        return cls()

    def describe(self, images: Sequence[np.ndarray], layout: str, given: Sequence[dict | None] | None = None) -> Texts:
        return None

    def condition(self, m, images: Sequence[np.ndarray], layout: str, texts: Texts) -> torch.Tensor:
        """Degraded images -> conditional text embeddings (B, 77, D)."""
        # 1. encode images with CLIP: (B, 1+P, d) hidden states before post-layernorm
        pixels = preprocess(images, size=m.clip_size, layout=layout, device=m.device, mean=m.clip_mean, std=m.clip_std)
        tokens = encode_image(m.clip, pixels)
        # 2. map to words: (B, N, D)
        words = m.mapper(tokens)
        # 3. clean the words
        if self.use_cleaner:
            words = m.cleaner(words)
        # 4. inject into the text encoder: "a photo of a S" with S -> the N words; (B, 77, D)
        return encode_injected(m.text_encoder, m.tokenizer, words)

    def fingerprint(self) -> dict:
        return {}


class MapperOnlySource(TextualSource):
    """Supplement A, "without textual restoration": the mapper's words go to SD directly, no cleaner."""

    name = "mapper-only"
    without = ("cleaner",)
    use_cleaner = False

    def fingerprint(self) -> dict:
        return {"source": self.name}


class CaptionSource:
    """§3.1 / supplement B, "explicit": caption, remove degradation words, prompt SD with the rest."""

    name = "caption"
    without = ("clip", "mapper", "cleaner")

    def __init__(self, captioner, word_filter):
        self.captioner = captioner  # tdr.pipeline.captions.Captioner
        self.filter = word_filter   # tdr.pipeline.degradation_words.DegradationFilter

    @classmethod
    def load(cls, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             caption_model: str | None = None, caption_words: Sequence[str] = (), **_) -> "CaptionSource":
        """Load the caption model (default BLIP-2 opt-2.7b) offline; ``caption_words`` extend the word list."""
        from .captions import load_captioner
        from .degradation_words import DEGRADATION_WORDS, DegradationFilter

        captioner = load_captioner(caption_model or CAPTION_MODEL, device=device, dtype=dtype)
        return cls(captioner, DegradationFilter((*DEGRADATION_WORDS, *caption_words)))

    def describe(self, images: Sequence[np.ndarray], layout: str, given: Sequence[dict | None] | None = None) -> Texts:
        """Captions of the images' guidance region (the centre square for ``center``); ``given`` records
        (stored, possibly hand-edited) are kept as they are."""
        given = list(given) if given is not None else [None] * len(images)
        todo = [k for k, g in enumerate(given) if g is None]
        if todo:
            raw = self.captioner([layout_region(images[k], layout) for k in todo])
            for k, text in zip(todo, raw, strict=True):
                given[k] = {"raw": text, "prompt": self.filter(text), "edited": False}
        return given

    def condition(self, m, images: Sequence[np.ndarray], layout: str, texts: Texts) -> torch.Tensor:
        if texts is None or len(texts) != len(images):
            raise ValueError("the caption source conditions on one text per image")
        return encode_prompt(m.text_encoder, m.tokenizer, [t["prompt"] for t in texts])

    def fingerprint(self) -> dict:
        from .fingerprints import weight_sha256

        c = self.captioner
        return {"source": self.name, "caption_model": c.name,
                "caption_weights": {p.name: weight_sha256(p) for p in c.weight_files},
                "caption_max_new_tokens": c.max_new_tokens, "degradation_words": self.filter.sha256}


SOURCES: dict[str, type] = {  # name -> class; ``cls.without`` names the guidance-model parts it does not use
    "textual": TextualSource,
    "mapper-only": MapperOnlySource,
    "caption": CaptionSource,
}


def check_source(name: str) -> str:
    if name not in SOURCES:
        raise TdrError(f"Unknown guidance source '{name}'; choose one of: {', '.join(SOURCES)}.")
    return name


def build_source(name: str = DEFAULT_SOURCE, **options):
    """The source ``name`` with its own models loaded (options: device, dtype, caption_model, caption_words)."""
    return SOURCES[check_source(name)].load(**options)


def source_of(fingerprint: dict) -> str:
    """The source a guidance group was made with (groups made before sources existed: ``textual``)."""
    if "source" in fingerprint:
        return str(fingerprint["source"])
    return DEFAULT_SOURCE if "preset" in fingerprint else str(fingerprint.get("kind", "other"))
