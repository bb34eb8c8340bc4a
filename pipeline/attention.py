"""Cross-attention that projects the text through the mapper's key/value copies (Lin et al., CVPR 2024, §3.2).

:class:`MapperKVProcessor` is a diffusers attention processor for the UNet's ``attn2`` modules. It is the
standard scaled-dot-product cross-attention except that ``to_k`` / ``to_v`` are the mapper's trainable
copies, in every call (conditional and unconditional halves of a CFG batch alike); the UNet's own
``to_k`` / ``to_v`` stay untouched and unused.

Backends: torch SDPA (default) or xformers' ``memory_efficient_attention`` when xformers imports *and* runs
a small attention on the device (its wheels are often built for another torch version).
:func:`select_backend` probes that once; the processor records which backend it actually ran
(``last_backend``).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError, MissingDependencyError

BACKENDS = ("auto", "sdpa", "xformers")


@functools.cache
def xformers_works(device_type: str) -> bool:
    """True when xformers imports and computes a tiny attention correctly on this device type."""
    if device_type != "cuda":
        return False
    try:
        import xformers.ops as xops

        q = torch.randn(1, 8, 2, 16, device="cuda", dtype=torch.float16)
        out = xops.memory_efficient_attention(q, q, q)  # (B, M, H, K) layout
        ref = F.scaled_dot_product_attention(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2))
        return bool(torch.allclose(out, ref.transpose(1, 2), atol=1e-2))
    except Exception:  # any import/extension/kernel failure means "not usable"
        return False


def select_backend(requested: str, device: torch.device | str) -> str:
    """``auto`` -> ``xformers`` if it truly works on ``device``, else ``sdpa``; ``xformers`` must work."""
    if requested not in BACKENDS:
        raise ConfigError(f"attention must be one of {', '.join(BACKENDS)}, not {requested!r}.", param="attention")
    works = xformers_works(torch.device(device).type)
    if requested == "xformers" and not works:
        raise MissingDependencyError("attention 'xformers' was asked for, but xformers does not load or run on this "
                                     "device; use attention 'sdpa' or 'auto'.", param="attention")
    if requested == "auto":
        return "xformers" if works else "sdpa"
    return requested


class MapperKVProcessor:
    """Attention processor for one ``attn2``: keys/values from the given copies, not ``attn.to_k/to_v``.

    Not an ``nn.Module`` on purpose: the copies belong to the mapper (its state_dict and optimiser), and
    diffusers would otherwise register them as UNet submodules.
    """

    def __init__(self, to_k: nn.Linear, to_v: nn.Linear, backend: str = "sdpa"):
        self.to_k = to_k
        self.to_v = to_v
        self.backend = backend
        self.last_backend: str | None = None

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise ValueError("MapperKVProcessor is for cross-attention; encoder_hidden_states is required")
        if attention_mask is not None:
            raise NotImplementedError("attention masks are not used by Stable Diffusion cross-attention")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:  # (B, C, H, W) -> (B, HW, C)
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)  # (B, Lq, inner)
        key = self.to_k(encoder_hidden_states)  # (B, Lk, inner): the mapper's copy
        value = self.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        # (B, L, heads, head_dim)
        query = query.view(batch, -1, attn.heads, head_dim)
        key = key.view(batch, -1, attn.heads, head_dim)
        value = value.view(batch, -1, attn.heads, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if self.backend == "xformers":
            import xformers.ops as xops

            out = xops.memory_efficient_attention(query, key, value, scale=attn.scale)
        else:
            out = F.scaled_dot_product_attention(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale=attn.scale
            ).transpose(1, 2)
        self.last_backend = self.backend
        hidden_states = out.reshape(batch, -1, attn.heads * head_dim).to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)  # linear
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_mapper_kv(unet: nn.Module, mapper: nn.Module, backend: str = "auto") -> str:
    """Route every ``attn2`` of ``unet`` through the mapper's k/v copies; returns the backend used.

    ``mapper`` must have been built for this UNet (same cross-attention names and shapes).
    """
    device = next(unet.parameters()).device
    chosen = select_backend(backend, device)
    modules = dict(unet.named_modules())
    names = [name for name, *_ in mapper.config.kv_layers]
    found = {n for n, m in modules.items() if n.endswith("attn2") and hasattr(m, "to_k")}
    if set(names) != found:
        raise ValueError("the mapper's k/v copies were made for a UNet with other cross-attention layers")
    for name in names:
        kv = mapper.kv_for(name)
        modules[name].set_processor(MapperKVProcessor(kv.to_k, kv.to_v, chosen))
    return chosen


def remove_mapper_kv(unet: nn.Module) -> None:
    """Give every ``attn2`` back diffusers' standard SDPA processor (the UNet's own ``to_k`` / ``to_v``)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    for name, module in unet.named_modules():
        if isinstance(getattr(module, "processor", None), MapperKVProcessor):
            module.set_processor(AttnProcessor2_0())


def installed_processors(unet: nn.Module) -> list[MapperKVProcessor]:
    """The :class:`MapperKVProcessor` instances currently set on ``unet``."""
    return [m.processor for m in unet.modules() if isinstance(getattr(m, "processor", None), MapperKVProcessor)]
