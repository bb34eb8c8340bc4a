"""Restormer, written from "Restormer: Efficient Transformer for High-Resolution Image Restoration"
(Zamir et al., CVPR 2022).

Parameter names follow the official repository (swz30/Restormer, ``restormer_arch.py``) so its
checkpoints (``{"params": …}``) load strictly into the backbone part. The building blocks here (MDTA,
GDFN, the layer norms, pixel-(un)shuffle resizing) are shared with PromptIR and DRSformer.
Fusion points (guided): ``enc0..enc2`` before encoder levels 1–3, ``mid`` before the latent,
``dec0..dec2`` before decoder levels 3, 2, 1 (after the skip).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..aggregation import AggregationConfig
from .common import Restorer


class BiasFreeLayerNorm(nn.Module):
    """Layer norm over the last dim without mean subtraction and bias (Restormer's 'BiasFree')."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x / (x.var(-1, keepdim=True, unbiased=False) + 1e-5).sqrt() * self.weight


class WithBiasLayerNorm(nn.Module):
    """Standard layer norm over the last dim (eps 1e-5), Restormer's 'WithBias'."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        return (x - mu) / (x.var(-1, keepdim=True, unbiased=False) + 1e-5).sqrt() * self.weight + self.bias


class LayerNorm(nn.Module):
    """Per-pixel layer norm of (B,C,H,W) over C; ``body`` is the official parameter holder."""

    def __init__(self, dim: int, layer_norm_type: str = "WithBias"):
        super().__init__()
        self.body = BiasFreeLayerNorm(dim) if layer_norm_type == "BiasFree" else WithBiasLayerNorm(dim)

    def forward(self, x):
        return self.body(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class FeedForward(nn.Module):
    """Gated-Dconv feed-forward network (GDFN): 1×1 → dw3×3 → GELU gate → 1×1."""

    def __init__(self, dim: int, ffn_expansion_factor: float, bias: bool):
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.project_in = nn.Conv2d(dim, hidden * 2, 1, bias=bias)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, 1, bias=bias)

    def forward(self, x):
        a, b = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(a) * b)


def channel_attention_qkv(x, qkv, qkv_dwconv, heads):
    """q, k, v of transposed (channel) attention: (B, heads, C/heads, H·W), q and k L2-normalised."""
    b, c, h, w = x.shape
    q, k, v = qkv_dwconv(qkv(x)).chunk(3, dim=1)
    q, k, v = (t.reshape(b, heads, c // heads, h * w) for t in (q, k, v))
    return F.normalize(q, dim=-1), F.normalize(k, dim=-1), v


class Attention(nn.Module):
    """Multi-Dconv head transposed attention (MDTA): attention across channels, (C/h)² per head."""

    def __init__(self, dim: int, num_heads: int, bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, 3, padding=1, groups=dim * 3, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=bias)

    def forward(self, x):
        q, k, v = channel_attention_qkv(x, self.qkv, self.qkv_dwconv, self.num_heads)
        attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1)
        return self.project_out((attn @ v).reshape(x.shape))


class TransformerBlock(nn.Module):
    """x + MDTA(LN(x)), then + GDFN(LN(x)). Subclasses swap the attention/feed-forward (DRSformer)."""

    attention_cls: type = Attention  # MDTA
    ffn_cls: type = FeedForward  # GDFN

    def __init__(self, dim: int, num_heads: int, ffn_expansion_factor: float = 2.66, bias: bool = False,
                 layer_norm_type: str = "WithBias"):
        super().__init__()
        self.norm1 = LayerNorm(dim, layer_norm_type)
        self.attn = self.attention_cls(dim, num_heads, bias)
        self.norm2 = LayerNorm(dim, layer_norm_type)
        self.ffn = self.ffn_cls(dim, ffn_expansion_factor, bias)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class OverlapPatchEmbed(nn.Module):
    """3×3 conv embedding of the image."""

    def __init__(self, in_c: int = 3, embed_dim: int = 48, bias: bool = False):
        super().__init__()
        self.proj = nn.Conv2d(in_c, embed_dim, 3, padding=1, bias=bias)

    def forward(self, x):
        return self.proj(x)


class Downsample(nn.Module):
    """3×3 conv to C/2, pixel-unshuffle ×2 → 2C channels at half size."""

    def __init__(self, n_feat: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x):
        return self.body(x)


class Upsample(nn.Module):
    """3×3 conv to 2C, pixel-shuffle ×2 → C/2 channels at double size."""

    def __init__(self, n_feat: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat * 2, 3, padding=1, bias=False), nn.PixelShuffle(2))

    def forward(self, x):
        return self.body(x)


def transformer_stage(dim, n, heads, ffn, bias, ln, block=TransformerBlock):
    return nn.Sequential(*[block(dim, heads, ffn, bias, ln) for _ in range(n)])


def restormer_points(dim: int) -> dict[str, tuple[int, int]]:
    """Fusion points of the Restormer-shaped U-Nets (4 levels): name → (level, channels)."""
    return {"enc0": (0, dim), "enc1": (1, 2 * dim), "enc2": (2, 4 * dim), "mid": (3, 8 * dim),
            "dec0": (2, 4 * dim), "dec1": (1, 2 * dim), "dec2": (0, 2 * dim)}


class Restormer(Restorer):
    """4-level transformer U-Net with refinement blocks and a global residual."""

    multiple = 8

    def __init__(self, inp_channels: int = 3, out_channels: int = 3, dim: int = 48,
                 num_blocks: Sequence[int] = (4, 6, 6, 8), num_refinement_blocks: int = 4,
                 heads: Sequence[int] = (1, 2, 4, 8), ffn_expansion_factor: float = 2.66, bias: bool = False,
                 layer_norm_type: str = "WithBias", *, guided: bool = False,
                 aggregation: AggregationConfig | None = None):
        super().__init__()
        args = (ffn_expansion_factor, bias, layer_norm_type)
        self.patch_embed = OverlapPatchEmbed(inp_channels, dim)
        self.encoder_level1 = transformer_stage(dim, num_blocks[0], heads[0], *args)
        self.down1_2 = Downsample(dim)
        self.encoder_level2 = transformer_stage(dim * 2, num_blocks[1], heads[1], *args)
        self.down2_3 = Downsample(dim * 2)
        self.encoder_level3 = transformer_stage(dim * 4, num_blocks[2], heads[2], *args)
        self.down3_4 = Downsample(dim * 4)
        self.latent = transformer_stage(dim * 8, num_blocks[3], heads[3], *args)
        self.up4_3 = Upsample(dim * 8)
        self.reduce_chan_level3 = nn.Conv2d(dim * 8, dim * 4, 1, bias=bias)
        self.decoder_level3 = transformer_stage(dim * 4, num_blocks[2], heads[2], *args)
        self.up3_2 = Upsample(dim * 4)
        self.reduce_chan_level2 = nn.Conv2d(dim * 4, dim * 2, 1, bias=bias)
        self.decoder_level2 = transformer_stage(dim * 2, num_blocks[1], heads[1], *args)
        self.up2_1 = Upsample(dim * 2)  # no channel reduction at level 1
        self.decoder_level1 = transformer_stage(dim * 2, num_blocks[0], heads[0], *args)
        self.refinement = transformer_stage(dim * 2, num_refinement_blocks, heads[0], *args)
        self.output = nn.Conv2d(dim * 2, out_channels, 3, padding=1, bias=bias)
        block = lambda c, level: TransformerBlock(c, heads[level], *args)  # noqa: E731
        self._attach_aggregation(guided, aggregation, 3, restormer_points(dim), block, dim)

    def restore(self, inp, aligned):
        f = lambda name, t: self.fuse(name, t, aligned)  # noqa: E731
        enc1 = self.encoder_level1(f("enc0", self.patch_embed(inp)))
        enc2 = self.encoder_level2(f("enc1", self.down1_2(enc1)))
        enc3 = self.encoder_level3(f("enc2", self.down2_3(enc2)))
        latent = self.latent(f("mid", self.down3_4(enc3)))
        dec3 = self.reduce_chan_level3(torch.cat([self.up4_3(latent), enc3], 1))
        dec3 = self.decoder_level3(f("dec0", dec3))
        dec2 = self.reduce_chan_level2(torch.cat([self.up3_2(dec3), enc2], 1))
        dec2 = self.decoder_level2(f("dec1", dec2))
        dec1 = self.decoder_level1(f("dec2", torch.cat([self.up2_1(dec2), enc1], 1)))
        return self.output(self.refinement(dec1)) + inp
