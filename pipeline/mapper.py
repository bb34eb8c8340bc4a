"""Image-to-words mapper (I2T) of Lin et al., "Improving Image Restoration through Removing Degradations in
Textual Representations", CVPR 2024, §3.2.

For word i (N = 20 words), from the CLIP image encoder's final hidden states (CLS + patch tokens, before
post-layernorm):

    w_i = MLP_i(CLS) + mean_over_patches(MLPpatch_i(patch))

each MLP = 3 x [Linear(d->d), LayerNorm, LeakyReLU] + Linear(d->D), d = CLIP width (1280 for ViT-H/14),
D = text-encoder width (1024 for SD-2.1). The 2N MLPs are *grouped*: one weight tensor per layer with a
leading word axis, run as one batched matmul (no Python loop over words).

The mapper also owns trainable copies of every UNet cross-attention key/value projection (``to_k``,
``to_v`` of each ``attn2``; 16 layers in SD-2.1), initialised from the UNet's. They are used instead of the
UNet's own through :mod:`tdr.pipeline.attention`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F


class GroupedLinear(nn.Module):
    """``groups`` independent Linear layers applied at once: (G, M, in) -> (G, M, out)."""

    def __init__(self, groups: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(groups, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(groups, out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same distribution as nn.Linear's default init (kaiming_uniform a=sqrt(5) == U(+-1/sqrt(in))).
        bound = 1.0 / math.sqrt(self.weight.shape[-1])
        if self.weight.device.type != "meta":
            nn.init.uniform_(self.weight, -bound, bound)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (G, M, in) -> (G, M, out)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))


class GroupedLayerNorm(nn.Module):
    """``groups`` independent LayerNorms over the last axis of (G, M, C)."""

    def __init__(self, groups: int, features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(groups, features))
        self.bias = nn.Parameter(torch.zeros(groups, features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        return torch.addcmul(self.bias.unsqueeze(1), x, self.weight.unsqueeze(1))


class GroupedMLP(nn.Module):
    """G independent MLPs: every hidden Linear is followed by LayerNorm + LeakyReLU, the last is plain.

    ``dims = (in, h1, ..., out)``; state_dict names are ``layers.{k}.weight`` with shapes (G, out, in) for
    Linear layers and (G, C) for LayerNorms, in the order Linear, LayerNorm, LeakyReLU, ..., Linear.
    """

    def __init__(self, groups: int, dims: tuple[int, ...]):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(GroupedLinear(groups, a, b))
            if i < len(dims) - 2:
                layers += [GroupedLayerNorm(groups, b), nn.LeakyReLU()]
        self.layers = nn.Sequential(*layers)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Everything but the last Linear: (G, M, in) -> (G, M, h_last)."""
        return self.layers[:-1](x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The last Linear: (G, M, h_last) -> (G, M, out)."""
        return self.layers[-1](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@dataclass(frozen=True)
class MapperConfig:
    """Shape of a mapper; saved in its checkpoint and checked against the loaded models."""

    clip_dim: int = 1280  # CLIP vision width d
    word_dim: int = 1024  # text-encoder token-embedding width D
    num_words: int = 20  # N
    # one entry per UNet cross-attention: (module name, cross_attention_dim, inner_dim, has_bias)
    kv_layers: tuple[tuple[str, int, int, bool], ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kv_layers"] = [list(x) for x in self.kv_layers]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MapperConfig:
        d = dict(d)
        d["kv_layers"] = tuple(tuple(x) for x in d.get("kv_layers", ()))
        return cls(**d)


def cross_attention_layers(unet: nn.Module) -> tuple[tuple[str, int, int, bool], ...]:
    """Every cross-attention (``attn2``) of a diffusers UNet: (name, cross_dim, inner_dim, has_bias)."""
    out = []
    for name, module in unet.named_modules():
        if name.endswith("attn2") and hasattr(module, "to_k"):
            k = module.to_k
            out.append((name, k.in_features, k.out_features, k.bias is not None))
    return tuple(out)


def kv_key(layer_name: str) -> str:
    """ModuleDict key of a UNet cross-attention: dots are not allowed in module names."""
    return layer_name.replace(".", "_")


class KVProjection(nn.Module):
    """A trainable copy of one cross-attention's ``to_k`` / ``to_v``."""

    def __init__(self, cross_dim: int, inner_dim: int, bias: bool = False):
        super().__init__()
        self.to_k = nn.Linear(cross_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(cross_dim, inner_dim, bias=bias)


class Mapper(nn.Module):
    """CLIP image tokens (B, 1+P, d) -> N word embeddings (B, N, D), plus the UNet k/v copies (``kv``)."""

    def __init__(self, config: MapperConfig):
        super().__init__()
        self.config = config
        n, d, dw = config.num_words, config.clip_dim, config.word_dim
        self.cls_mlp = GroupedMLP(n, (d, d, d, d, dw))  # MLP_i on the CLS token
        self.patch_mlp = GroupedMLP(n, (d, d, d, d, dw))  # MLPpatch_i on every patch token
        self.kv = nn.ModuleDict(
            {kv_key(name): KVProjection(cin, cout, bias) for name, cin, cout, bias in config.kv_layers}
        )

    @classmethod
    def for_models(cls, unet: nn.Module, clip_dim: int, word_dim: int,
                   num_words: int = MapperConfig.num_words) -> Mapper:
        """A fresh mapper sized for these models, its k/v copies initialised from ``unet``."""
        mapper = cls(MapperConfig(clip_dim, word_dim, num_words, cross_attention_layers(unet)))
        mapper.copy_kv_from(unet)
        return mapper

    @torch.no_grad()
    def copy_kv_from(self, unet: nn.Module) -> None:
        """Initialise the k/v copies from the UNet's own cross-attention projections."""
        modules = dict(unet.named_modules())
        for name, *_ in self.config.kv_layers:
            src, dst = modules[name], self.kv[kv_key(name)]
            dst.to_k.load_state_dict(src.to_k.state_dict())
            dst.to_v.load_state_dict(src.to_v.state_dict())

    def kv_for(self, layer_name: str) -> KVProjection:
        return self.kv[kv_key(layer_name)]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, 1+P, d): CLS then P patch tokens -> words (B, N, D)."""
        b, _, d = tokens.shape
        n = self.config.num_words
        cls_tok = tokens[:, 0].unsqueeze(0).expand(n, b, d)  # (N, B, d)
        patches = tokens[:, 1:]  # (B, P, d)
        p = patches.shape[1]
        w_cls = self.cls_mlp(cls_tok)  # (N, B, D)
        h = self.patch_mlp.hidden(patches.reshape(1, b * p, d).expand(n, b * p, d))  # (N, B*P, d)
        # The last layer is affine, so mean(head(h)) == head(mean(h)): average before it (P x cheaper).
        h = h.view(n, b, p, -1).mean(dim=2)  # (N, B, d)
        w_patch = self.patch_mlp.head(h)  # (N, B, D)
        return (w_cls + w_patch).transpose(0, 1)  # (B, N, D)
