"""NAFNet, written from "Simple Baselines for Image Restoration" (Chen et al., ECCV 2022).

Parameter names follow the official repository (megvii-research/NAFNet, ``NAFNet_arch.py``) so its
checkpoints (e.g. NAFNet-GoPro-width64: ``{"params": …}``) load strictly into the backbone part.
Fusion points (guided): ``enc{i}`` before encoder stage i, ``mid`` before the middle blocks, ``dec{j}``
after decoder j's upsampling and skip, before its blocks.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..aggregation import AggregationConfig
from .common import Restorer


class LayerNorm2d(nn.Module):
    """Layer norm over the channels of (B,C,H,W), per pixel, with affine weight and bias."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        return (x - mu) / (var + self.eps).sqrt() * self.weight[:, None, None] + self.bias[:, None, None]


class SimpleGate(nn.Module):
    """Split the channels in two halves and multiply them (NAFNet §3.3)."""

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return a * b


class NAFBlock(nn.Module):
    """Nonlinear-activation-free block: LN → 1×1 → dw3×3 → gate → simplified channel attention → 1×1,
    then LN → 1×1 → gate → 1×1 (feed-forward); both residuals scaled by β, γ (zero at init)."""

    def __init__(self, c: int, dw_expand: int = 2, ffn_expand: int = 2):
        super().__init__()
        dw = c * dw_expand
        self.conv1 = nn.Conv2d(c, dw, 1)
        self.conv2 = nn.Conv2d(dw, dw, 3, padding=1, groups=dw)
        self.conv3 = nn.Conv2d(dw // 2, c, 1)
        self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dw // 2, dw // 2, 1))
        self.sg = SimpleGate()
        ffn = c * ffn_expand
        self.conv4 = nn.Conv2d(c, ffn, 1)
        self.conv5 = nn.Conv2d(ffn // 2, c, 1)
        self.norm1 = LayerNorm2d(c)
        self.norm2 = LayerNorm2d(c)
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, inp):
        x = self.sg(self.conv2(self.conv1(self.norm1(inp))))
        x = self.conv3(x * self.sca(x))
        y = inp + x * self.beta
        x = self.conv5(self.sg(self.conv4(self.norm2(y))))
        return y + x * self.gamma


class NAFNet(Restorer):
    """U-Net of NAFBlocks: intro 3×3, encoder stages with 2×2 stride-2 downs, middle blocks, decoder
    stages with 1×1 + pixel-shuffle ups and additive skips, ending 3×3, global residual."""

    def __init__(self, img_channel: int = 3, width: int = 16, middle_blk_num: int = 1,
                 enc_blk_nums: Sequence[int] = (1, 1, 1, 28), dec_blk_nums: Sequence[int] = (1, 1, 1, 1), *,
                 guided: bool = False, aggregation: AggregationConfig | None = None):
        super().__init__()
        self.intro = nn.Conv2d(img_channel, width, 3, padding=1)
        self.ending = nn.Conv2d(width, img_channel, 3, padding=1)
        self.encoders, self.decoders, self.ups, self.downs = (nn.ModuleList() for _ in range(4))
        chan = width
        for num in enc_blk_nums:
            self.encoders.append(nn.Sequential(*[NAFBlock(chan) for _ in range(num)]))
            self.downs.append(nn.Conv2d(chan, 2 * chan, 2, 2))
            chan *= 2
        self.middle_blks = nn.Sequential(*[NAFBlock(chan) for _ in range(middle_blk_num)])
        for num in dec_blk_nums:
            self.ups.append(nn.Sequential(nn.Conv2d(chan, chan * 2, 1, bias=False), nn.PixelShuffle(2)))
            chan //= 2
            self.decoders.append(nn.Sequential(*[NAFBlock(chan) for _ in range(num)]))
        levels = len(enc_blk_nums)
        if len(dec_blk_nums) != levels:
            raise ValueError(f"NAFNet needs as many decoder as encoder stages, got {dec_blk_nums} vs {enc_blk_nums}")
        points = {f"enc{i}": (i, width * 2 ** i) for i in range(levels)}
        points["mid"] = (levels, width * 2 ** levels)
        points.update({f"dec{j}": (levels - 1 - j, width * 2 ** (levels - 1 - j)) for j in range(levels)})
        self._attach_aggregation(guided, aggregation, levels, points, lambda c, level: NAFBlock(c), width)

    def restore(self, inp, aligned):
        x = self.intro(inp)
        skips = []
        for i, (encoder, down) in enumerate(zip(self.encoders, self.downs)):
            x = encoder(self.fuse(f"enc{i}", x, aligned))
            skips.append(x)
            x = down(x)
        x = self.middle_blks(self.fuse("mid", x, aligned))
        for j, (decoder, up, skip) in enumerate(zip(self.decoders, self.ups, skips[::-1])):
            x = decoder(self.fuse(f"dec{j}", up(x) + skip, aligned))
        return self.ending(x) + inp
