"""SFNet, written from "Selective Frequency Network for Image Restoration" (Cui et al., ICLR 2023).

A 3-scale U-Net (width 32, 16 residual blocks per stage) with shallow multi-scale image inputs (SCM +
FAM). The last residual block of each stage carries the multi-branch dynamic selective frequency
module (MDSF): a learned low-pass filter per sample and channel group (3×3 on one half of the channels,
5×5 on the other) splits low and high frequencies and a selective-kernel attention recombines them.
Every residual block carries the multi-scale frequency selection module (MSFS): global and 2×2
quadrant average pooling separate low frequencies, learned per-channel weights rescale both bands.

Names follow the official repository (c-yn/SFNet) where practical; the official test-time local
pooling (``AvgPool2d(base_size=…)``) is replaced by global pooling (its training behaviour), and
``forward`` returns the full-scale output only (``forward_pyramid`` gives all three).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..aggregation import AggregationConfig
from .common import Restorer, pad_to_multiple


class BasicConv(nn.Module):
    """conv (or 4×4 stride-2 transposed conv) with optional GELU."""

    def __init__(self, in_channel, out_channel, kernel_size, stride=1, bias=True, relu=True, transpose=False):
        super().__init__()
        if transpose:
            conv = nn.ConvTranspose2d(in_channel, out_channel, kernel_size, stride, kernel_size // 2 - 1, bias=bias)
        else:
            conv = nn.Conv2d(in_channel, out_channel, kernel_size, stride, kernel_size // 2, bias=bias)
        self.main = nn.Sequential(conv, nn.GELU()) if relu else nn.Sequential(conv)

    def forward(self, x):
        return self.main(x)


class SFconv(nn.Module):
    """Selective-kernel fusion of the low and high bands: GAP(low + high) → fc → two attention vectors,
    a softmax over their concatenation (as the official code does), weighted sum, 1×1 conv."""

    def __init__(self, features: int, r: int = 2, L: int = 32):
        super().__init__()
        d = max(features // r, L)
        self.fc = nn.Conv2d(features, d, 1)
        self.fcs = nn.ModuleList([nn.Conv2d(d, features, 1), nn.Conv2d(d, features, 1)])
        self.out = nn.Conv2d(features, features, 1)

    def forward(self, low, high):
        z = self.fc((low + high).mean(dim=(-2, -1), keepdim=True))
        att_high, att_low = torch.cat([self.fcs[0](z), self.fcs[1](z)], 1).softmax(dim=1).chunk(2, dim=1)
        return self.out(high * att_high + low * att_low)


class dynamic_filter(nn.Module):  # noqa: N801 (official module name)
    """Dynamic low-pass filter: per sample and channel group a softmax-normalised k×k kernel predicted
    from GAP(x); low = filter ∗ x (reflect padded), high = x − low, fused by ``SFconv``."""

    def __init__(self, inchannels: int, kernel_size: int = 3, group: int = 8):
        super().__init__()
        self.kernel_size = kernel_size
        self.group = math.gcd(group, inchannels)
        # official parameters its forward never uses: buffers, so checkpoints still load strictly
        self.register_buffer("lamb_l", torch.zeros(inchannels))
        self.register_buffer("lamb_h", torch.zeros(inchannels))
        self.conv = nn.Conv2d(inchannels, self.group * kernel_size ** 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(self.group * kernel_size ** 2)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        self.modulate = SFconv(inchannels)

    def forward(self, x):
        B, C, H, W = x.shape
        k, g = self.kernel_size, self.group
        f = self.conv(x.mean(dim=(-2, -1), keepdim=True))
        if self.training and B == 1:  # batch statistics of one 1×1 sample are undefined
            f = F.batch_norm(f, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias)
        else:
            f = self.bn(f)
        f = f.view(B, g, k * k).softmax(dim=-1)  # (B, groups, k²)
        weight = f.repeat_interleave(C // g, dim=1).reshape(B * C, 1, k, k)  # every channel its group's kernel
        xp = F.pad(x, (k // 2,) * 4, mode="reflect" if min(H, W) > k // 2 else "replicate")
        low = F.conv2d(xp.reshape(1, B * C, H + k - 1, W + k - 1), weight, groups=B * C).view(B, C, H, W)
        return self.modulate(low, x - low)


class Patch_ap(nn.Module):  # noqa: N801 (official module name)
    """Local frequency split: the mean of each of the 2×2 quadrants is the low band; both bands are
    rescaled per channel and quadrant (``l``, ``h``; zero at init)."""

    def __init__(self, inchannel: int, patch_size: int = 2):
        super().__init__()
        self.patch_size = p = patch_size
        self.h = nn.Parameter(torch.zeros(inchannel * p * p))
        self.l = nn.Parameter(torch.zeros(inchannel * p * p))  # noqa: E741

    def forward(self, x):
        B, C, H, W = x.shape
        p = self.patch_size
        q = x.view(B, C, p, H // p, p, W // p).permute(0, 1, 2, 4, 3, 5).reshape(B, C * p * p, H // p, W // p)
        low = q.mean(dim=(-2, -1), keepdim=True)
        out = (q - low) * self.h[:, None, None] + low * self.l[:, None, None]
        return out.view(B, C, p, p, H // p, W // p).permute(0, 1, 2, 4, 3, 5).reshape(B, C, H, W)


class Gap(nn.Module):
    """Global frequency split: GAP is the low band; low·fscale_d + high·(fscale_h + 1)."""

    def __init__(self, in_channel: int):
        super().__init__()
        self.fscale_d = nn.Parameter(torch.zeros(in_channel))
        self.fscale_h = nn.Parameter(torch.zeros(in_channel))

    def forward(self, x):
        low = x.mean(dim=(-2, -1), keepdim=True)
        return (x - low) * (self.fscale_h[:, None, None] + 1.0) + low * self.fscale_d[:, None, None]


class ResBlock(nn.Module):
    """conv3×3+GELU → [MDSF if ``filter``] → MSFS (global half, quadrant half) → conv3×3, + input."""

    def __init__(self, in_channel: int, out_channel: int, filter: bool = False):  # noqa: A002 (official)
        super().__init__()
        self.conv1 = BasicConv(in_channel, out_channel, 3, relu=True)
        self.conv2 = BasicConv(out_channel, out_channel, 3, relu=False)
        self.filter = filter
        half = in_channel // 2
        self.dyna = dynamic_filter(half) if filter else nn.Identity()
        self.dyna_2 = dynamic_filter(half, kernel_size=5) if filter else nn.Identity()
        self.localap = Patch_ap(half, patch_size=2)
        self.global_ap = Gap(half)

    def forward(self, x):
        out = self.conv1(x)
        if self.filter:
            k3, k5 = out.chunk(2, dim=1)
            out = torch.cat([self.dyna(k3), self.dyna_2(k5)], 1)
        non_local, local = out.chunk(2, dim=1)
        return self.conv2(torch.cat([self.global_ap(non_local), self.localap(local)], 1)) + x


class Stage(nn.Module):
    """``num_res`` residual blocks, the last with the dynamic filter (official EBlock / DBlock)."""

    def __init__(self, channel: int, num_res: int):
        super().__init__()
        self.layers = nn.Sequential(*[ResBlock(channel, channel, filter=i == num_res - 1) for i in range(num_res)])

    def forward(self, x):
        return self.layers(x)


class SCM(nn.Module):
    """Shallow convolution module: features of the downscaled image for FAM."""

    def __init__(self, out_plane: int):
        super().__init__()
        self.main = nn.Sequential(
            BasicConv(3, out_plane // 4, 3), BasicConv(out_plane // 4, out_plane // 2, 1),
            BasicConv(out_plane // 2, out_plane // 2, 3), BasicConv(out_plane // 2, out_plane, 1, relu=False),
            nn.InstanceNorm2d(out_plane, affine=True))

    def forward(self, x):
        return self.main(x)


class FAM(nn.Module):
    """Feature attention module: 3×3 conv over [x, SCM features]."""

    def __init__(self, channel: int):
        super().__init__()
        self.merge = BasicConv(channel * 2, channel, 3, relu=False)

    def forward(self, x1, x2):
        return self.merge(torch.cat([x1, x2], 1))


class SFNet(Restorer):
    """3-scale encoder–decoder; fusion points ``enc0``, ``enc1`` (before encoder stages 1, 2), ``mid``
    (before the bottom encoder stage), ``dec0``, ``dec1`` (before decoder stages 2, 3)."""

    multiple = 8  # two downsamplings, then 2×2 quadrants

    def __init__(self, width: int = 32, num_res: int = 16, *, guided: bool = False,
                 aggregation: AggregationConfig | None = None):
        super().__init__()
        c = width
        self.Encoder = nn.ModuleList([Stage(c, num_res), Stage(c * 2, num_res), Stage(c * 4, num_res)])
        self.feat_extract = nn.ModuleList([
            BasicConv(3, c, 3), BasicConv(c, c * 2, 3, stride=2), BasicConv(c * 2, c * 4, 3, stride=2),
            BasicConv(c * 4, c * 2, 4, stride=2, transpose=True), BasicConv(c * 2, c, 4, stride=2, transpose=True),
            BasicConv(c, 3, 3, relu=False)])
        self.Decoder = nn.ModuleList([Stage(c * 4, num_res), Stage(c * 2, num_res), Stage(c, num_res)])
        self.Convs = nn.ModuleList([BasicConv(c * 4, c * 2, 1), BasicConv(c * 2, c, 1)])
        self.ConvsOut = nn.ModuleList([BasicConv(c * 4, 3, 3, relu=False), BasicConv(c * 2, 3, 3, relu=False)])
        self.FAM1, self.SCM1 = FAM(c * 4), SCM(c * 4)
        self.FAM2, self.SCM2 = FAM(c * 2), SCM(c * 2)
        points = {"enc0": (0, c), "enc1": (1, c * 2), "mid": (2, c * 4), "dec0": (1, c * 2), "dec1": (0, c)}
        self._attach_aggregation(guided, aggregation, 2, points, lambda ch, level: ResBlock(ch, ch), width)

    def _pyramid(self, x, aligned):
        f = lambda name, t: self.fuse(name, t, aligned)  # noqa: E731
        x2 = F.interpolate(x, scale_factor=0.5)
        x4 = F.interpolate(x2, scale_factor=0.5)
        res1 = self.Encoder[0](f("enc0", self.feat_extract[0](x)))
        z = self.FAM2(self.feat_extract[1](res1), self.SCM2(x2))
        res2 = self.Encoder[1](f("enc1", z))
        z = self.FAM1(self.feat_extract[2](res2), self.SCM1(x4))
        z = self.Decoder[0](self.Encoder[2](f("mid", z)))
        out4 = self.ConvsOut[0](z) + x4
        z = self.Convs[0](torch.cat([self.feat_extract[3](z), res2], 1))
        z = self.Decoder[1](f("dec0", z))
        out2 = self.ConvsOut[1](z) + x2
        z = self.Convs[1](torch.cat([self.feat_extract[4](z), res1], 1))
        z = self.Decoder[2](f("dec1", z))
        return [out4, out2, self.feat_extract[5](z) + x]

    def restore(self, inp, aligned):
        return self._pyramid(inp, aligned)[-1]

    def forward_pyramid(self, degraded, guidance=None, *, box=None, context=None) -> list[torch.Tensor]:
        """Outputs at 1/4, 1/2 and full scale (SFNet's multi-scale loss), each cropped to its input."""
        h, w = degraded.shape[-2:]
        x = pad_to_multiple(degraded, self.multiple)
        aligned = None if self.agg is None else self.agg.prepare(x, guidance, (h, w), box, context)
        outs = self._pyramid(x, aligned)
        return [o[..., : -(-h // 2 ** i), : -(-w // 2 ** i)] for o, i in zip(outs, (2, 1, 0))]
