"""PromptIR, written from "PromptIR: Prompting for All-in-One Blind Image Restoration" (Potlapalli et
al., NeurIPS 2023): the Restormer U-Net with prompt blocks in the decoder. A prompt-generation module
mixes a few learned prompt components with weights predicted from the feature's global average, and a
prompt-interaction module (concatenate, transformer block, 1×1 conv) injects it.

Parameter names follow the official repository (va1shn9v/PromptIR, ``net/model.py``, decoder=True);
the few tensors it defines but never uses (``chnl_reduce*``, ``reduce_noise_channel_*``) are buffers
here so official checkpoints (Lightning: ``{"state_dict": {"net.…"}}``) still load strictly.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..aggregation import AggregationConfig
from .common import Restorer, Unused
from .restormer import (Downsample, OverlapPatchEmbed, TransformerBlock, Upsample, restormer_points,
                        transformer_stage)


class PromptGenBlock(nn.Module):
    """Prompt generation: softmax(linear(GAP(x))) weights over ``prompt_len`` learned prompt maps,
    resized to the feature's size, then a 3×3 conv. (B,lin_dim,H,W) → (B,prompt_dim,H,W)."""

    def __init__(self, prompt_dim: int = 128, prompt_len: int = 5, prompt_size: int = 96, lin_dim: int = 192):
        super().__init__()
        self.prompt_param = nn.Parameter(torch.rand(1, prompt_len, prompt_dim, prompt_size, prompt_size))
        self.linear_layer = nn.Linear(lin_dim, prompt_len)
        self.conv3x3 = nn.Conv2d(prompt_dim, prompt_dim, 3, padding=1, bias=False)

    def forward(self, x):
        weights = F.softmax(self.linear_layer(x.mean(dim=(-2, -1))), dim=1)  # (B, prompt_len)
        prompt = torch.einsum("bl,lchw->bchw", weights, self.prompt_param[0])
        prompt = F.interpolate(prompt, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv3x3(prompt)


class PromptIR(Restorer):
    """Restormer shape; after the latent and after decoder levels 3 and 2 a prompt block.

    ``prompt_dims``/``prompt_sizes`` are the official (64, 128, 320) / (64, 32, 16) for dim 48;
    ``reduced_prompt3`` is the width (256) of the official unused ``chnl_reduce3``.
    """

    multiple = 8

    def __init__(self, inp_channels: int = 3, out_channels: int = 3, dim: int = 48,
                 num_blocks: Sequence[int] = (4, 6, 6, 8), num_refinement_blocks: int = 4,
                 heads: Sequence[int] = (1, 2, 4, 8), ffn_expansion_factor: float = 2.66, bias: bool = False,
                 layer_norm_type: str = "WithBias", prompt_dims: Sequence[int] = (64, 128, 320),
                 prompt_sizes: Sequence[int] = (64, 32, 16), prompt_len: int = 5, reduced_prompt3: int = 256, *,
                 guided: bool = False, aggregation: AggregationConfig | None = None):
        super().__init__()
        args = (ffn_expansion_factor, bias, layer_norm_type)
        p1, p2, p3 = prompt_dims
        self.patch_embed = OverlapPatchEmbed(inp_channels, dim)
        self.prompt1 = PromptGenBlock(p1, prompt_len, prompt_sizes[0], dim * 2)
        self.prompt2 = PromptGenBlock(p2, prompt_len, prompt_sizes[1], dim * 4)
        self.prompt3 = PromptGenBlock(p3, prompt_len, prompt_sizes[2], dim * 8)
        # defined but unused by the official forward: kept as buffers for strict checkpoint loading
        self.chnl_reduce1 = Unused(p1, p1, 1, 1)
        self.chnl_reduce2 = Unused(p2, p2, 1, 1)
        self.chnl_reduce3 = Unused(reduced_prompt3, p3, 1, 1)
        self.reduce_noise_channel_1 = Unused(dim, dim + p1, 1, 1)
        self.reduce_noise_channel_2 = Unused(dim * 2, dim * 2 + p2, 1, 1)
        self.reduce_noise_channel_3 = Unused(dim * 4, dim * 4 + reduced_prompt3, 1, 1)

        self.encoder_level1 = transformer_stage(dim, num_blocks[0], heads[0], *args)
        self.down1_2 = Downsample(dim)
        self.encoder_level2 = transformer_stage(dim * 2, num_blocks[1], heads[1], *args)
        self.down2_3 = Downsample(dim * 2)
        self.encoder_level3 = transformer_stage(dim * 4, num_blocks[2], heads[2], *args)
        self.down3_4 = Downsample(dim * 4)
        self.latent = transformer_stage(dim * 8, num_blocks[3], heads[3], *args)

        self.noise_level3 = TransformerBlock(dim * 8 + p3, heads[2], *args)
        self.reduce_noise_level3 = nn.Conv2d(dim * 8 + p3, dim * 4, 1, bias=bias)
        self.up4_3 = Upsample(dim * 4)
        self.reduce_chan_level3 = nn.Conv2d(dim * 2 + dim * 4, dim * 4, 1, bias=bias)
        self.decoder_level3 = transformer_stage(dim * 4, num_blocks[2], heads[2], *args)

        self.noise_level2 = TransformerBlock(dim * 4 + p2, heads[2], *args)
        self.reduce_noise_level2 = nn.Conv2d(dim * 4 + p2, dim * 4, 1, bias=bias)
        self.up3_2 = Upsample(dim * 4)
        self.reduce_chan_level2 = nn.Conv2d(dim * 4, dim * 2, 1, bias=bias)
        self.decoder_level2 = transformer_stage(dim * 2, num_blocks[1], heads[1], *args)

        self.noise_level1 = TransformerBlock(dim * 2 + p1, heads[2], *args)
        self.reduce_noise_level1 = nn.Conv2d(dim * 2 + p1, dim * 2, 1, bias=bias)
        self.up2_1 = Upsample(dim * 2)
        self.decoder_level1 = transformer_stage(dim * 2, num_blocks[0], heads[0], *args)
        self.refinement = transformer_stage(dim * 2, num_refinement_blocks, heads[0], *args)
        self.output = nn.Conv2d(dim * 2, out_channels, 3, padding=1, bias=bias)
        block = lambda c, level: TransformerBlock(c, heads[level], *args)  # noqa: E731
        self._attach_aggregation(guided, aggregation, 3, restormer_points(dim), block, dim)

    @staticmethod
    def _interact(x, prompt_block, transformer, reduce):
        """Prompt-interaction module: [x, prompt] → transformer block → 1×1 conv."""
        return reduce(transformer(torch.cat([x, prompt_block(x)], 1)))

    def restore(self, inp, aligned):
        f = lambda name, t: self.fuse(name, t, aligned)  # noqa: E731
        enc1 = self.encoder_level1(f("enc0", self.patch_embed(inp)))
        enc2 = self.encoder_level2(f("enc1", self.down1_2(enc1)))
        enc3 = self.encoder_level3(f("enc2", self.down2_3(enc2)))
        latent = self.latent(f("mid", self.down3_4(enc3)))
        latent = self._interact(latent, self.prompt3, self.noise_level3, self.reduce_noise_level3)
        dec3 = self.reduce_chan_level3(torch.cat([self.up4_3(latent), enc3], 1))
        dec3 = self.decoder_level3(f("dec0", dec3))
        dec3 = self._interact(dec3, self.prompt2, self.noise_level2, self.reduce_noise_level2)
        dec2 = self.reduce_chan_level2(torch.cat([self.up3_2(dec3), enc2], 1))
        dec2 = self.decoder_level2(f("dec1", dec2))
        dec2 = self._interact(dec2, self.prompt1, self.noise_level1, self.reduce_noise_level1)
        dec1 = self.decoder_level1(f("dec2", torch.cat([self.up2_1(dec2), enc1], 1)))
        return self.output(self.refinement(dec1)) + inp
