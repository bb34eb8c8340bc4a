"""What every backbone shares: padding to the multiple it needs, the guidance plumbing (the
``DynamicAggregation`` lives under the ``agg.`` prefix, apart from the backbone's official parameter
names) and loading official checkpoints into the backbone part."""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import CheckpointMismatchError, ConfigError, UnknownBackboneError  # noqa: F401  (importable from here as before)
from ..aggregation import AggregationConfig, BlockFactory, Context, DynamicAggregation

AGG_PREFIX = "agg."


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad (B,C,H,W) at the bottom/right to multiples of ``multiple``: reflect, or replicate if too small."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


class Unused(nn.Module):
    """Holds a tensor an official checkpoint has but the official forward never uses, as a buffer, so
    checkpoints load strictly while the optimiser and DDP see no parameter without a gradient."""

    def __init__(self, *shape: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(shape))


class Restorer(nn.Module):
    """Base of every backbone: ``forward(degraded, guidance=None, *, box=None, context=None) -> restored``.

    Subclasses build their official modules, then call ``_attach_aggregation`` (last, so a guided and
    an unguided model built under the same seed get the same backbone weights), and implement
    ``restore(x, aligned)``, calling ``self.fuse(name, feat, aligned)`` at each fusion point.
    """

    multiple: int = 1  # input sides are padded to a multiple of this

    def _attach_aggregation(self, guided: bool, config: AggregationConfig | None, levels: int,
                            points: Mapping[str, tuple[int, int]], block: BlockFactory, width: int) -> None:
        config = config or AggregationConfig()
        self.multiple = max(self.multiple, 2 ** levels)
        self.agg = (DynamicAggregation(levels, points, block, fuse=config.fuse, config=config, width=width)
                    if guided else None)

    @property
    def guided(self) -> bool:
        return self.agg is not None

    def restore(self, x: torch.Tensor, aligned: list | None) -> torch.Tensor:
        """(B,3,Hp,Wp) padded input → (B,3,Hp,Wp) restored; ``aligned`` from ``DynamicAggregation.prepare``."""
        raise NotImplementedError

    def fuse(self, name: str, feat: torch.Tensor, aligned: list | None) -> torch.Tensor:
        return feat if aligned is None else self.agg.fuse(name, feat, aligned)

    def forward(self, degraded: torch.Tensor, guidance: torch.Tensor | None = None, *,
                box: torch.Tensor | None = None, context: Context | None = None) -> torch.Tensor:
        """degraded (B,3,H,W) float in [0,1], any H, W; guidance (B,3,Hg,Wg) in [0,1], any size (ignored
        when unguided); box (B,4) (top, left, height, width) in degraded's pixels that the guidance shows
        (default from the aggregation's layout); context: the degraded frame around a training crop, for
        the global search (:class:`~tdr.guided.aggregation.Context`). Returns (B,3,H,W); clamped to [0,1]
        in eval mode."""
        h, w = degraded.shape[-2:]
        x = pad_to_multiple(degraded, self.multiple)
        aligned = None
        if self.agg is not None:
            if guidance is None:
                raise ConfigError("This backbone is guided: pass guidance, or build it with guided=False.")
            aligned = self.agg.prepare(x, guidance, (h, w), box, context)
        out = self.restore(x, aligned)[..., :h, :w]
        return out if self.training else out.clamp(0, 1)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict without the aggregation: the official checkpoint's keys."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(AGG_PREFIX)}

    def aggregation_parameters(self) -> list[nn.Parameter]:
        """Parameters of the aggregation (shared encoder, fusion blocks, α): trained with their own lr."""
        return [] if self.agg is None else list(self.agg.parameters())

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith(AGG_PREFIX)]


_WRAPPER_KEYS = ("params", "params_ema", "state_dict", "model", "net")
_PREFIXES = ("module.", "net.", "model.", "backbone.")


def _unwrap(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Official formats: {"params": sd} (BasicSR: NAFNet, Restormer, DRSformer), {"params_ema": sd},
    {"state_dict": sd} (Lightning: PromptIR; tdr's own checkpoints), {"model": sd}, or a plain sd."""
    sd = checkpoint
    while isinstance(sd, Mapping) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        key = next((k for k in _WRAPPER_KEYS if isinstance(sd.get(k), Mapping)), None)
        if key is None:
            raise CheckpointMismatchError(
                f"checkpoint holds no state dict (top-level keys: {', '.join(map(str, list(sd)[:8]))}); "
                f"expected one of {', '.join(_WRAPPER_KEYS)} or a plain state dict")
        sd = sd[key]
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    changed = True
    while changed and sd:
        changed = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def load_backbone_checkpoint(model: Restorer, checkpoint: Mapping[str, Any]) -> None:
    """Load an official (or tdr) checkpoint strictly into the backbone part of ``model``.

    The aggregation (``agg.*``) keeps its current (fresh) weights; ``agg.*`` keys in the checkpoint are
    ignored. Any missing, unexpected or differently shaped backbone key raises CheckpointMismatchError.
    """
    sd = {k: v for k, v in _unwrap(checkpoint).items() if not k.startswith(AGG_PREFIX)}
    expected = model.backbone_state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing (e.g. {', '.join(missing[:3])})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})" if unexpected else "",
                 f"{len(shapes)} of other shape (e.g. {'; '.join(shapes[:2])})" if shapes else ""]
        raise CheckpointMismatchError(
            f"checkpoint does not fit {type(model).__name__}: keys "
            f"{', '.join(p for p in parts if p)}; was it made for another backbone or size?")
    result = model.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys and all(k.startswith(AGG_PREFIX) for k in result.missing_keys)
