"""Training and evaluation settings as frozen dataclasses; an optional TOML file loads into them.

Precedence when the CLI builds a config: dataclass defaults < the run's saved config (``--resume``) < the
``--config`` TOML file < options given on the command line. Unknown keys are an error, so a typo in a
config file never silently does nothing. The merged config is saved as ``RUN_DIR/config.json`` and
inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from ..cache.errors import TdrError
from .aggregation.config import FUSE_MODES, MATCH_FEATURES, SEARCHES, TRANSFERS

GUIDANCE_MODES = ("cache", "none", "degraded")
SEARCH_CHOICES = ("auto",) + SEARCHES  # auto: "prior" for aligned guidance, else "global"

# (backbone lr, aggregation lr) of the paper's supplement (SPEC §6), by backbone family (name prefix)
PAPER_LR = {
    "nafnet": (1e-4, 5e-5),
    "restormer": (3e-4, 1e-4),
    "promptir": (2e-4, 1e-4),
    "sfnet": (1e-4, 5e-5),
    "drsformer": (1e-4, 5e-5),
}
TEST_LR = (1e-3, 5e-4)  # tiny ``-test`` backbones: learn something in a handful of steps


class ConfigError(TdrError, ValueError):
    """A config file or option that is unknown, of the wrong type or out of range."""


def resolve_search(search: str, provenance: str | None, group: str | None = None) -> str:
    """The search a run uses, from its ``search`` setting and the guidance's provenance ("generated",
    "aligned", "unknown"; None: no guidance). "auto" is "prior" for aligned guidance (its geometry follows
    the input) and "global" otherwise; "prior" on guidance that is not aligned is refused, since generated
    guidance shares content, not pixel geometry, with its input (SPEC §7)."""
    if search == "auto":
        return "prior" if provenance == "aligned" else "global"
    if search == "prior" and provenance not in ("aligned", None):
        where = f"guidance group {group}" if group else "this guidance"
        raise ConfigError(f"search 'prior' looks only where the layout box puts the content, which holds only for "
                          f"guidance whose geometry follows the input (provenance 'aligned'); {where} is "
                          f"'{provenance}': use search 'auto' or 'global', or re-import it with --aligned if it is "
                          "registered to the input.")
    return search


def paper_lr(backbone: str) -> tuple[float, float]:
    """Default (backbone lr, aggregation lr) for a backbone name such as ``nafnet-w32`` or ``restormer``."""
    if backbone.endswith("-test"):
        return TEST_LR
    family = backbone.split("-")[0]
    return PAPER_LR.get(family, (1e-4, 5e-5))


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (``tdr train``)."""

    backbone: str = ""  # registry name, e.g. "nafnet", "nafnet-w32", "restormer", "nafnet-test"
    store: str = ""  # guidance store (local path or fsspec URL)
    out: str = ""  # run folder: config.json, last.pt, step_N.pt
    dataset: str | None = None  # if set, the store must hold this dataset
    guidance: str = "cache"  # "cache" (generated/imported guidance), "none" (plain backbone), "degraded"
    group: str | None = None  # guidance group id in the store (default: the store's default group)
    fuse: str = "enc+dec"  # where guidance is fused (paper Table 10)
    search: str = "auto"  # matching: auto (prior if the guidance is aligned, else global), global, prior, masa
    match: str = "image"  # features matched: "image" (fixed, degradation-robust) or "encoder" (paper: learned)
    transfer: str = "bilinear"  # "bilinear" (sub-cell displacement) or "patch" (paper: whole-cell patches)
    swap: float = 0.0  # share of training crops given another image's guidance (see TripleDataset.guidance_image)
    iters: int = 1000
    patch: int = 128  # training crop side
    batch_size: int = 4  # per process (global batch = batch_size · world size)
    lr: float | None = None  # backbone lr; None: the paper's for this backbone (SPEC §6)
    agg_lr: float | None = None  # aggregation lr; None: the paper's (about half the backbone's)
    alpha_lr: float | None = None  # lr of the fusion gates α (eq. 4, init 0); None: the aggregation lr
    weight_decay: float = 1e-4  # AdamW
    betas: tuple[float, float] = (0.9, 0.999)
    eta_min: float = 1e-7  # cosine schedule floor
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    ema: float | None = None  # EMA decay of the weights (e.g. 0.999); None: no EMA
    amp: bool = True  # bf16 autocast on GPU (ignored on CPU)
    seed: int = 0  # model init and the sample sequence
    init: str | None = None  # official or tdr checkpoint for the backbone (strict); aggregation fresh
    resume: bool = False  # continue RUN_DIR/last.pt exactly
    workers: int = 0  # DataLoader worker processes
    val_every: int = 500  # validate (and update last.pt) every N iterations and at the end; 0: never
    val_split: str = "test"
    val_crop: int = 256  # validate on the centre crop of this side of each image; 0: full images
    val_images: int = 0  # validate on the first N images of val_split; 0: all
    save_every: int = 0  # every N iterations: update last.pt and keep step_N.pt; 0: off
    device: str | None = None  # "cuda", "cpu" (default: cuda if available)

    def __post_init__(self) -> None:
        if self.guidance not in GUIDANCE_MODES:
            raise ConfigError(f"guidance must be one of {', '.join(GUIDANCE_MODES)}, not '{self.guidance}'.")
        if self.fuse not in FUSE_MODES:
            raise ConfigError(f"fuse must be one of {', '.join(FUSE_MODES)}, not '{self.fuse}'.")
        for name, choices in (("search", SEARCH_CHOICES), ("match", MATCH_FEATURES), ("transfer", TRANSFERS)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}, not '{getattr(self, name)}'.")
        for name in ("iters", "patch", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("workers", "val_every", "val_crop", "val_images", "save_every", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}.")
        if not 0.0 <= self.swap <= 1.0:
            raise ConfigError(f"swap must be a share between 0 and 1, got {self.swap}.")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise ConfigError(f"ema must be a decay between 0 and 1 (e.g. 0.999), got {self.ema}.")

    @property
    def lrs(self) -> tuple[float, float]:
        """(backbone lr, aggregation lr) with the paper's defaults filled in."""
        base, agg = paper_lr(self.backbone)
        lr = base if self.lr is None else self.lr
        return lr, (agg * lr / base if self.agg_lr is None else self.agg_lr)

    def require(self) -> "TrainConfig":
        """Check that the fields without a usable default were given."""
        missing = [f"--{n}" for n in ("backbone", "store", "out") if not getattr(self, n)]
        if missing:
            raise ConfigError(f"missing {', '.join(missing)} (give it on the command line or in --config).")
        return self

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)


@dataclass(frozen=True)
class EvalConfig:
    """Everything that defines an evaluation (``tdr eval``)."""

    checkpoint: str = ""  # a tdr run checkpoint, or official plain weights with ``backbone``
    store: str = ""
    dataset: str | None = None
    backbone: str | None = None  # for official weights (e.g. NAFNet-GoPro-width64.pth): the plain backbone
    split: str = "test"
    group: str | None = None  # guidance group (default: the training run's, else the store's default)
    tile: int = 0  # tile side for large images; 0: whole images
    overlap: int = 32  # tile overlap in pixels (averaged)
    grids: int = 0  # side-by-side PNGs for the first N images
    out: str | None = None  # folder for grids (default: beside the checkpoint)
    json: str | None = None  # write results as JSON here
    limit: int = 0  # evaluate only the first N images; 0: all
    device: str | None = None
    use_ema: bool = True  # evaluate the EMA weights when the checkpoint has them

    def __post_init__(self) -> None:
        for name in ("tile", "overlap", "grids", "limit"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}.")
        if self.tile and self.overlap >= self.tile:
            raise ConfigError(f"overlap ({self.overlap}) must be smaller than tile ({self.tile}).")

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)


def to_plain(cfg) -> dict[str, Any]:
    """Dataclass → JSON-able dict (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}


def from_mapping(cls, data: Mapping[str, Any], *, source: str = "config"):
    """Build ``cls`` from a mapping; unknown keys and wrongly typed values are a ConfigError."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}.")
    values = {}
    for key, value in data.items():
        values[key] = _coerce(key, value, known[key].type, source)
    return cls(**values)


def _coerce(key: str, value: Any, annotation: str, source: str) -> Any:
    """Light type check (TOML already gives typed values): ints for ints, floats accept ints, tuples."""
    ann = str(annotation)
    if value is None:
        if "None" in ann:
            return None
        raise ConfigError(f"{source}: '{key}' must not be empty.")
    if ann.startswith("tuple"):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}.")
        return tuple(float(v) for v in value)
    if ann.startswith("bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}.")
        return value
    if ann.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}.")
        return value
    if ann.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}.")
        return float(value)
    if ann.startswith("str"):
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}.")
        return value
    return value


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file (flat keys, or under a ``[train]`` / ``[eval]`` table)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"Config file {path} does not exist.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Config file {path} is not valid TOML: {exc}.") from None


def merge(cls, *layers: Mapping[str, Any] | None, source: str = "config"):
    """Later layers override earlier ones; ``None`` values in a layer mean "not given"."""
    data: dict[str, Any] = {}
    for layer in layers:
        if layer:
            data.update({k: v for k, v in layer.items() if v is not None})
    return from_mapping(cls, data, source=source)


def section(data: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The ``[name]`` table of a TOML file if it has one, else the file's top level."""
    if name in data and isinstance(data[name], Mapping):
        rest = [k for k in data if k != name]
        if rest:
            raise ConfigError(f"config file: unknown key(s) {', '.join(sorted(rest))} beside the [{name}] table.")
        return dict(data[name])
    return dict(data)


def replace(cfg, **changes):
    return dataclasses.replace(cfg, **changes)
