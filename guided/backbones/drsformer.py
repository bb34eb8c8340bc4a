"""DRSformer, written from "Learning A Sparse Transformer Network for Effective Image Deraining"
(Chen et al., CVPR 2023).

A Restormer-shaped U-Net ([4,6,6,8] blocks, decoders [6,6,4], heads [1,2,4,8,4,2,1]) whose blocks use
top-k sparse attention (TKSA: keep the k largest of each row of the channel-attention map, for four
k ∈ {C/2, 2C/3, 3C/4, 4C/5}, softmax each, combine with learned weights) and a mixed-scale feed-forward
network (MSFN: parallel 3×3 / 5×5 depthwise paths), plus a mixture-of-experts feature compensator (MEFC)
before the encoder and as refinement (the paper drops it for Rain200L and SPA-Data: ``mefc=False``).
Parameter names follow the official repository (cschenxiang/DRSformer, ``DRSformer_arch.py``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..aggregation import AggregationConfig
from .common import Restorer
from .restormer import TransformerBlock as RestormerBlock
from .restormer import (Downsample, OverlapPatchEmbed, Upsample, channel_attention_qkv, restormer_points,
                        transformer_stage)

TOPK_FRACTIONS = ((1, 2), (2, 3), (3, 4), (4, 5))  # k = C·num // den, as int(C·num/den) officially


class FeedForward(nn.Module):
    """Mixed-scale feed-forward network: 1×1 → {dw3×3, dw5×5} → ReLU, cross-mixed → {dw3×3, dw5×5}
    (grouped) → ReLU → 1×1."""

    def __init__(self, dim: int, ffn_expansion_factor: float, bias: bool):
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.project_in = nn.Conv2d(dim, hidden * 2, 1, bias=bias)
        self.dwconv3x3 = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2, bias=bias)
        self.dwconv5x5 = nn.Conv2d(hidden * 2, hidden * 2, 5, padding=2, groups=hidden * 2, bias=bias)
        self.dwconv3x3_1 = nn.Conv2d(hidden * 2, hidden, 3, padding=1, groups=hidden, bias=bias)
        self.dwconv5x5_1 = nn.Conv2d(hidden * 2, hidden, 5, padding=2, groups=hidden, bias=bias)
        self.project_out = nn.Conv2d(hidden * 2, dim, 1, bias=bias)

    def forward(self, x):
        x = self.project_in(x)
        a3, b3 = F.relu(self.dwconv3x3(x)).chunk(2, dim=1)
        a5, b5 = F.relu(self.dwconv5x5(x)).chunk(2, dim=1)
        a = F.relu(self.dwconv3x3_1(torch.cat([a3, a5], 1)))
        b = F.relu(self.dwconv5x5_1(torch.cat([b3, b5], 1)))
        return self.project_out(torch.cat([a, b], 1))


class Attention(nn.Module):
    """Top-k sparse channel attention (TKSA); ``attn1..attn4`` weigh the four sparsity levels."""

    def __init__(self, dim: int, num_heads: int, bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, 3, padding=1, groups=dim * 3, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=bias)
        for i in range(1, 5):
            setattr(self, f"attn{i}", nn.Parameter(torch.tensor([0.2])))

    def forward(self, x):
        q, k, v = channel_attention_qkv(x, self.qkv, self.qkv_dwconv, self.num_heads)
        attn = (q @ k.transpose(-2, -1)) * self.temperature  # (B, heads, C', C')
        c = attn.shape[-1]
        ranked = attn.sort(dim=-1, descending=True).values
        out = 0
        for i, (num, den) in enumerate(TOPK_FRACTIONS, 1):
            kth = ranked[..., max(1, c * num // den) - 1, None]  # the k-th largest of each row
            sparse = attn.masked_fill(attn < kth, float("-inf")).softmax(dim=-1)
            out = out + (sparse @ v) * getattr(self, f"attn{i}")
        return self.project_out(out.reshape(x.shape))


class TransformerBlock(RestormerBlock):
    """Sparse transformer block: x + TKSA(LN(x)), then + MSFN(LN(x)) (Restormer's block, other parts)."""

    attention_cls = Attention
    ffn_cls = FeedForward


# -- mixture-of-experts feature compensator (MEFC) ------------------------------------------------
class SepConv(nn.Module):
    """Two rounds of depthwise k×k + pointwise 1×1 (ReLU between)."""

    def __init__(self, c: int, k: int):
        super().__init__()
        p = k // 2
        self.op = nn.Sequential(
            nn.Conv2d(c, c, k, padding=p, groups=c, bias=False), nn.Conv2d(c, c, 1, bias=False), nn.ReLU(),
            nn.Conv2d(c, c, k, padding=p, groups=c, bias=False), nn.Conv2d(c, c, 1, bias=False))

    def forward(self, x):
        return self.op(x)


class DilConv(nn.Module):
    """Depthwise k×k with dilation 2, then pointwise 1×1."""

    def __init__(self, c: int, k: int):
        super().__init__()
        self.op = nn.Sequential(nn.Conv2d(c, c, k, padding=k - 1, dilation=2, groups=c, bias=False),
                                nn.Conv2d(c, c, 1, bias=False))

    def forward(self, x):
        return self.op(x)


def _experts(c: int) -> list[nn.Module]:
    """The eight experts, in the official order."""
    return [SepConv(c, 1), SepConv(c, 3), SepConv(c, 5), SepConv(c, 7), DilConv(c, 3), DilConv(c, 5),
            DilConv(c, 7), nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)]


class OperationLayer(nn.Module):
    """Experts weighted per sample, concatenated, 1×1 conv + ReLU."""

    def __init__(self, c: int):
        super().__init__()
        self._ops = nn.ModuleList(_experts(c))
        self._out = nn.Sequential(nn.Conv2d(c * len(self._ops), c, 1, bias=False), nn.ReLU())

    def forward(self, x, weights):  # weights (B, n_experts)
        return self._out(torch.cat([op(x) * weights[:, i, None, None, None] for i, op in enumerate(self._ops)], 1))


class ReLUConv(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.op = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.ReLU())

    def forward(self, x):
        return self.op(x)


class GroupOLs(nn.Module):
    """``steps`` residual operation layers after a 1×1 conv."""

    def __init__(self, steps: int, c: int):
        super().__init__()
        self.preprocess = ReLUConv(c)
        self._ops = nn.ModuleList(OperationLayer(c) for _ in range(steps))

    def forward(self, x, weights):  # weights (B, steps, n_experts)
        x = self.preprocess(x)
        for i, op in enumerate(self._ops):
            x = F.relu(op(x, weights[:, i]) + x)
        return x


class OALayer(nn.Module):
    """Expert weights from the global average: (B,C,H,W) → (B, steps, n_experts) logits."""

    def __init__(self, channel: int, k: int, num_ops: int):
        super().__init__()
        self.k, self.num_ops = k, num_ops
        hidden = k * num_ops * 2
        self.ca_fc = nn.Sequential(nn.Linear(channel, hidden), nn.ReLU(), nn.Linear(hidden, k * num_ops))

    def forward(self, x):
        return self.ca_fc(x.mean(dim=(-2, -1))).view(-1, self.k, self.num_ops)


class subnet(nn.Module):  # noqa: N801 (official module name)
    """MEFC: per layer, expert weights (softmax over experts) then the weighted expert groups."""

    def __init__(self, dim: int, layer_num: int = 1, steps: int = 4):
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(layer_num):
            self.layers += [OALayer(dim, steps, 8), GroupOLs(steps, dim)]

    def forward(self, x):
        for oa, group in zip(self.layers[0::2], self.layers[1::2]):
            x = group(x, F.softmax(oa(x), dim=-1))
        return x


class DRSformer(Restorer):
    """Sparse-transformer U-Net with MEFC before the encoder and as refinement."""

    multiple = 8

    def __init__(self, inp_channels: int = 3, out_channels: int = 3, dim: int = 48,
                 num_blocks: Sequence[int] = (4, 6, 6, 8), heads: Sequence[int] = (1, 2, 4, 8),
                 ffn_expansion_factor: float = 2.66, bias: bool = False, layer_norm_type: str = "WithBias",
                 mefc: bool = True, *, guided: bool = False,
                 aggregation: AggregationConfig | None = None):
        super().__init__()
        args = (ffn_expansion_factor, bias, layer_norm_type)
        stage = lambda d, n, h: transformer_stage(d, n, h, *args, block=TransformerBlock)  # noqa: E731
        self.patch_embed = OverlapPatchEmbed(inp_channels, dim)
        self.encoder_level0 = subnet(dim) if mefc else nn.Identity()
        self.encoder_level1 = stage(dim, num_blocks[0], heads[0])
        self.down1_2 = Downsample(dim)
        self.encoder_level2 = stage(dim * 2, num_blocks[1], heads[1])
        self.down2_3 = Downsample(dim * 2)
        self.encoder_level3 = stage(dim * 4, num_blocks[2], heads[2])
        self.down3_4 = Downsample(dim * 4)
        self.latent = stage(dim * 8, num_blocks[3], heads[3])
        self.up4_3 = Upsample(dim * 8)
        self.reduce_chan_level3 = nn.Conv2d(dim * 8, dim * 4, 1, bias=bias)
        self.decoder_level3 = stage(dim * 4, num_blocks[2], heads[2])
        self.up3_2 = Upsample(dim * 4)
        self.reduce_chan_level2 = nn.Conv2d(dim * 4, dim * 2, 1, bias=bias)
        self.decoder_level2 = stage(dim * 2, num_blocks[1], heads[1])
        self.up2_1 = Upsample(dim * 2)
        self.decoder_level1 = stage(dim * 2, num_blocks[0], heads[0])
        self.refinement = subnet(dim * 2) if mefc else nn.Identity()
        self.output = nn.Conv2d(dim * 2, out_channels, 3, padding=1, bias=bias)
        block = lambda c, level: TransformerBlock(c, heads[level], *args)  # noqa: E731
        self._attach_aggregation(guided, aggregation, 3, restormer_points(dim), block, dim)

    def restore(self, inp, aligned):
        f = lambda name, t: self.fuse(name, t, aligned)  # noqa: E731
        enc1 = self.encoder_level1(f("enc0", self.encoder_level0(self.patch_embed(inp))))
        enc2 = self.encoder_level2(f("enc1", self.down1_2(enc1)))
        enc3 = self.encoder_level3(f("enc2", self.down2_3(enc2)))
        latent = self.latent(f("mid", self.down3_4(enc3)))
        dec3 = self.reduce_chan_level3(torch.cat([self.up4_3(latent), enc3], 1))
        dec3 = self.decoder_level3(f("dec0", dec3))
        dec2 = self.reduce_chan_level2(torch.cat([self.up3_2(dec3), enc2], 1))
        dec2 = self.decoder_level2(f("dec1", dec2))
        dec1 = self.decoder_level1(f("dec2", torch.cat([self.up2_1(dec2), enc1], 1)))
        return self.output(self.refinement(dec1)) + inp
