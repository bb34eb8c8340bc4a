"""CLIP image encoder input: the paper's preprocessing, done in torch on the device.

Preprocessing (as CLIP's own image processor, here on tensors): centre-crop the short side to a square
(layout ``"center"``, the paper's) or squash the whole frame to a square (layout ``"full"``), resize to the
encoder's input size (224 for ViT-H/14) as CLIP's processor does with PIL (antialiased bicubic, one pass per
axis, each rounded to 8 bits), normalise with CLIP's mean/std. The mapper reads the final layer's ``last_hidden_state``
*before* post-layernorm: CLS + patch tokens, (B, 257, 1280) for ViT-H/14 at 224.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.nn import functional as F

from ..cache.images import to_float_chw
from ..cache.layout import LAYOUTS, layout_box  # noqa: F401  (LAYOUTS: the layouts preprocess takes)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_tensor(image: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """(H,W,3) uint8/uint16 array -> (1,3,H,W) float32 in [0,1] on ``device``; (3,H,W)/(1,3,H,W) floats pass."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
        return to_float_chw(image).unsqueeze(0).to(device)
    t = image.to(device=device, dtype=torch.float32)
    return t.unsqueeze(0) if t.ndim == 3 else t


def square(x: torch.Tensor, layout: str = "center") -> torch.Tensor:
    """(B,3,H,W) -> (B,3,h,w): the part of the frame its guidance shows (``tdr.cache.layout``), the
    centre square of side min(H, W) (``center``) or the frame (``full``)."""
    top, left, h, w = layout_box(layout, *x.shape[-2:])
    return x[..., top : top + h, left : left + w]


def _to_8bit(x: torch.Tensor) -> torch.Tensor:
    return x.mul(255.0).round_().clamp_(0.0, 255.0).div_(255.0)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B,3,H,W) float [0,1] -> (B,3,size,size), as PIL's bicubic resize of CLIP's image processor.

    Antialiased bicubic (PIL's kernel), horizontal pass then vertical pass, each rounded to 8 bits as PIL
    does: within one grey level of PIL even on noise, where a single float pass differs by up to ~20.
    """
    x = F.interpolate(x, size=(x.shape[-2], size), mode="bicubic", antialias=True, align_corners=False)
    x = F.interpolate(_to_8bit(x), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return _to_8bit(x)


def preprocess(
    images: Sequence[np.ndarray | torch.Tensor] | torch.Tensor,
    *,
    size: int = 224,
    layout: str = "center",
    device: torch.device | str = "cpu",
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """Images (a list of (H,W,3) uint8 of any sizes, or a (B,3,H,W) float [0,1] batch) -> (B,3,size,size).

    Each image is cropped and resized on its own, so its pixels never depend on the batch it came in.
    """
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        images = list(images.unbind(0))
    x = torch.cat([resize(square(to_tensor(image, device), layout), size) for image in images])
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def encode_image(vision_model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(B,3,224,224) normalised pixels -> (B, 1+P, d) final hidden states before post-layernorm."""
    dtype = next(vision_model.parameters()).dtype
    return vision_model(pixel_values=pixels.to(dtype)).last_hidden_state
