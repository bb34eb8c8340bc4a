"""Training and evaluation settings as frozen dataclasses; an optional TOML file loads into them.

:func:`train_config` layers them: dataclass defaults < the run's saved config (``resume``) < the TOML file's
``[train]`` table (``[train.aggregation]`` for the nested :class:`AggregationConfig`) < settings given
explicitly. Unknown keys are an error, so a typo in a config file never silently does nothing. The merged
config is saved as ``RUN_DIR/config.json`` and inside every checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..runs.config import ConfigError, from_dict, load_toml, merge, section, to_dict
from .aggregation.config import SEARCHES, AggregationConfig

GUIDANCE_MODES = ("cache", "none", "degraded")
AUTO = "auto"  # a search chosen from the guidance's provenance: "prior" for aligned guidance, else "global"
SEARCH_CHOICES = (AUTO,) + SEARCHES

# (backbone lr, aggregation lr) of the paper's supplement, by backbone family (name prefix)
PAPER_LR = {
    "nafnet": (1e-4, 5e-5),
    "restormer": (3e-4, 1e-4),
    "promptir": (2e-4, 1e-4),
    "sfnet": (1e-4, 5e-5),
    "drsformer": (1e-4, 5e-5),
}
TEST_LR = (1e-3, 5e-4)  # tiny ``-test`` backbones: learn something in a handful of steps


def resolve_search(search: str, provenance: str | None, group: str | None = None) -> str:
    """The search a run uses, from its ``search`` setting and the guidance's provenance ("generated",
    "aligned", "unknown"; None: no guidance). "auto" is "prior" for aligned guidance (its geometry follows
    the input) and "global" otherwise; "prior" on guidance that is not aligned is refused, since generated
    guidance shares content, not pixel geometry, with its input: Stable Diffusion renders it from words."""
    if search == AUTO:
        return "prior" if provenance == "aligned" else "global"
    if search == "prior" and provenance not in ("aligned", None):
        where = f"guidance group {group}" if group else "this guidance"
        raise ConfigError(f"search 'prior' looks only where the layout box puts the content, which holds only for "
                          f"guidance whose geometry follows the input (provenance 'aligned'); {where} is "
                          f"'{provenance}': use search 'auto' or 'global', or re-import it with aligned=True if it is "
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
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)  # of the guided model; its
    #   layout always follows the store's guidance
    auto_search: bool = True  # choose aggregation.search from the guidance's provenance (resolve_search);
    #   false: aggregation.search as given. In a config mapping, aggregation.search "auto" sets it
    swap: float = 0.0  # share of training crops given another image's guidance (see TripleDataset.guidance_image)
    iters: int = 1000
    patch: int = 128  # training crop side
    context: int = 128  # global search: side of the degraded frame window around each crop that its coarse
    #   stage sees (TripleDataset, aggregation.Context); ≤ patch: the crop alone
    batch_size: int = 4  # per process (global batch = batch_size · world size)
    lr: float | None = None  # backbone lr; None: the paper's for this backbone (its supplement)
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
        for name in ("iters", "patch", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("workers", "val_every", "val_crop", "val_images", "save_every", "grad_clip", "context"):
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
        missing = [n for n in ("backbone", "store", "out") if not getattr(self, n)]
        if missing:
            raise ConfigError(f"missing setting(s) {', '.join(missing)}: give them explicitly or in the config file.")
        return self

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


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
        return to_dict(self)


def search_choice(layer: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A config layer with ``aggregation.search`` "auto" turned into ``auto_search``: "auto" sets it, a
    concrete search clears it (unless the layer gives ``auto_search`` itself)."""
    if not layer:
        return None
    data = dict(layer)
    agg = data.get("aggregation")
    if isinstance(agg, Mapping) and agg.get("search") is not None:
        agg = dict(agg)
        search = agg.pop("search")
        if search not in SEARCH_CHOICES:
            raise ConfigError(f"aggregation.search must be one of {', '.join(SEARCH_CHOICES)}, not {search!r}.")
        if search != AUTO:
            agg["search"] = search
        if data.get("auto_search") is None:
            data["auto_search"] = search == AUTO
        data["aggregation"] = agg
    return data


def train_config(given: Mapping[str, Any] | None = None, *, config_file: str | Path | None = None) -> TrainConfig:
    """The config of a training run: defaults < the saved run's (when ``resume`` and ``out`` are set: the
    config of ``out/last.pt``, migrated to today's schema) < ``config_file``'s ``[train]`` table (or its top
    level) < ``given`` (``None`` values: not given). Aggregation settings nest under ``aggregation``."""
    from_file = section(load_toml(config_file), "train") if config_file is not None else None
    chosen = merge(from_file, given)
    saved = None
    if chosen.get("resume") and chosen.get("out"):
        from .checkpoint import saved_config

        saved = saved_config(Path(chosen["out"]) / "last.pt")
    layers = [search_choice(layer) for layer in (saved, from_file, given)]
    return from_dict(TrainConfig, merge(*layers), source="train config")
