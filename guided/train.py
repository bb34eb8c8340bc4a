"""Training a (guided) restorer: ``train(config, progress) -> TrainResult``.

L1 loss, AdamW with a separate (lower) learning rate for the aggregation, cosine annealing, gradient
clipping, bf16 autocast on GPU, optional EMA of the weights, validation on the held-out split, and
checkpoints that resume *exactly*: sample ``k`` of the run is a pure function of (seed, k)
(``TripleDataset``), iteration ``t`` of rank ``r`` reads samples ``(t·world + r)·B … +B-1``, and the
model, optimiser, scheduler, EMA and RNG states are all restored — so a resumed run computes the same
losses as an uninterrupted one. Multi-GPU: start with ``torchrun``; the global sample sequence is split
by rank, gradients are averaged by DDP, and only rank 0 validates and writes.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler

from ..cache import open_store
from ..errors import DataIntegrityError, StoreError, TdrError
from ..cache.ingest import min_side
from ..runs.checkpoint import load, rng_state, save, set_rng_state
from ..runs.config import ConfigError, check_resume, from_dict
from ..runs.launch import Launch, launch
from .aggregation import Context, guidance_box
from .backbones import backbone_factory, build_backbone
from .backbones.common import load_backbone_checkpoint
from .checkpoint import SCHEMA, is_run_checkpoint, run_config
from .config import TrainConfig, resolve_search
from .data import TripleDataset
from .evaluate import GuidanceSource, check_output_dir, metric_convention, restore, to_tensor
from .metrics import MetricAverager

Progress = Callable[[dict], None]

# settings that may differ between a run and its resumption (they do not change the computed losses;
# the search is compared as resolved, the layout follows the store)
RESUME_FREE = frozenset({"store", "out", "resume", "workers", "val_every", "val_images", "val_crop",
                         "save_every", "device", "init", "dataset", "auto_search", "aggregation.layout"})


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    start_step: int  # 0, or the step resumed from
    step: int  # steps done in total
    losses: list[float] = field(default_factory=list)  # loss of each step of this call (rank 0's batch)
    val: list[dict] = field(default_factory=list)  # {"step", "psnr", "ssim", "n"}
    seconds: float = 0.0


class RankSamples(Sampler[int]):
    """Global sample numbers of one rank: iteration t uses ``(t·world + rank)·B + j``, j < B."""

    def __init__(self, start_step: int, stop_step: int, batch: int, rank: int = 0, world: int = 1):
        self.start, self.stop, self.batch, self.rank, self.world = start_step, stop_step, batch, rank, world

    def __iter__(self):
        for t in range(self.start, self.stop):
            base = (t * self.world + self.rank) * self.batch
            yield from range(base, base + self.batch)

    def __len__(self) -> int:
        return (self.stop - self.start) * self.batch


def crop_boxes(layout: str, batch: dict, device) -> torch.Tensor:
    """(B,4) guidance boxes of a batch of training crops (their places in the turned full frames)."""
    boxes = [guidance_box(layout, tuple(int(v) for v in fs), crop_yx=(int(b[0]), int(b[1])))
             for fs, b in zip(batch["full_size"], batch["box"])]
    return torch.cat(boxes).to(device)


class EMA:
    """Exponential moving average of every floating tensor of a state dict (integer buffers copied)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.state = {k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
                      for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.state[k].mul_(self.decay).add_(v.detach().float(), alpha=1.0 - self.decay)
            else:
                self.state[k].copy_(v)


def _validation_set(store, config: TrainConfig, guidance: str, group: str | None):
    """(GuidanceSource, image rows) of the held-out split, or (None, []) when the store has none;
    ``guidance`` is the run's guidance mode ("cache", "degraded", "none")."""
    if config.val_every == 0 or config.val_split not in store.splits or not store[config.val_split].has_gt:
        return None, []
    source = GuidanceSource(store, config.val_split, guidance, group)
    sp = store[config.val_split]
    rows = list(range(min(len(sp), config.val_images) if config.val_images else len(sp)))
    need, c = min_side(store.metric), config.val_crop
    for i in rows:  # the metrics run after training steps: refuse what they cannot score before the first
        h, w = sp.lq_size(i)
        side = min(h, w, c) if c else min(h, w)
        if side < need:
            raise StoreError(f"Validation image '{sp.ids[i]}' of split '{config.val_split}' gives a {side}-pixel "
                             f"side, but SSIM and the border crop need at least {need}; re-ingest without images "
                             f"under {need}×{need} pixels, or set val_every 0.")
    return source, rows


@torch.no_grad()
def validate(model, store, config: TrainConfig, source: GuidanceSource, rows: list[int], device) -> dict:
    """Mean PSNR/SSIM (store convention) on the centre crops (or full images) of the held-out split."""
    was_training = model.training
    model.eval()
    sp = store[config.val_split]
    conv = metric_convention(store.metric)
    data_range = 65535 if sp.dtype == np.uint16 else None
    avg = MetricAverager()
    for i in rows:
        lq_full = sp.read_lq(i)
        H, W = lq_full.shape[:2]
        c = config.val_crop
        top, left, h, w = (0, 0, H, W) if not c else ((H - min(c, H)) // 2, (W - min(c, W)) // 2, min(c, H), min(c, W))
        lq, gt = lq_full[top:top + h, left:left + w], sp.read_gt(i, (top, left, h, w))
        guide = source.read(i, lq_full)
        g = to_tensor(guide, device) if guide is not None else None
        pred = restore(model, to_tensor(lq, device), g, layout=source.layout, frame_hw=(H, W),
                       crop_yx=(top, left))[0].cpu()
        avg.add(sp.ids[i], conv.compute(pred, torch.from_numpy(np.ascontiguousarray(gt.transpose(2, 0, 1))),
                                        data_range=data_range))
    model.train(was_training)
    return {**avg.mean(), "n": len(avg)}


def train(config: TrainConfig, progress: Progress | None = None, *,
          model: torch.nn.Module | None = None) -> TrainResult:
    """Train on ``config.store`` (see the module docstring) and return a TrainResult.

    ``model``: a backbone built in Python (``build_backbone(name, guided=…, aggregation=…)``) to train
    instead of building ``config.backbone`` from the config; ``config.backbone`` still names its registry
    entry (what ``tdr eval`` rebuilds), and a guided model's own aggregation settings are the run's.
    """
    config = config.require()
    if model is None:
        backbone_factory(config.backbone)  # an unknown name fails before any work
    t_start = time.perf_counter()
    with launch(config.device) as proc:
        return _train(config, progress, model, proc, t_start)


def _train(config: TrainConfig, progress: Progress | None, model: torch.nn.Module | None, proc: Launch,
           t_start: float) -> TrainResult:
    # 1. processes and device
    rank, world, device, main = proc.rank, proc.world, proc.device, proc.main
    emit = progress if (progress and main) else (lambda event: None)
    run_dir = Path(config.out)
    last = run_dir / "last.pt"
    check_output_dir(run_dir, "out")  # before anything runs
    # 2. the run folder: new, or resumed from last.pt
    resume_ckpt = None
    if config.resume:
        if not last.is_file():
            raise TdrError(f"resume: {last} does not exist; start the run without resume.")
        resume_ckpt = load(last)
        if not is_run_checkpoint(resume_ckpt):
            raise TdrError(f"resume: {last} is not a tdr training checkpoint; use the run's folder as out.")
    elif last.is_file():
        raise TdrError(f"{run_dir} already holds a run (last.pt); set resume to continue it or use a new out folder.")

    # 3. data: the training sample sequence, split by rank
    store = open_store(config.store)
    if config.dataset and store.dataset != config.dataset:
        raise StoreError(f"Store {config.store} holds dataset '{store.dataset}', not '{config.dataset}'.")
    if "train" not in store.splits:
        raise StoreError(f"Store {config.store} has no 'train' split (it has: {', '.join(store.splits)}).")
    ds = TripleDataset(config.store, "train", patch=config.patch, guidance=config.guidance,
                       group=config.group, seed=config.seed, swap=config.swap, context=config.context)
    if config.guidance == "cache":
        config = replace(config, group=ds.group)
    config = _resolved_aggregation(config, model, ds)
    if config.aggregation.search != "global":
        ds.context = 0  # only the global search reads the frame around a crop
    if resume_ckpt is not None:
        saved = from_dict(TrainConfig, run_config(resume_ckpt, str(last)), source=str(last))
        check_resume(saved, config, RESUME_FREE)
    layout = ds.layout
    val_source, val_rows = _validation_set(store, config, config.guidance, config.group) if main else (None, [])

    # 4. model (seeded; the backbone is built before the aggregation, so guided and plain models
    # made under one seed share backbone weights), optional init weights, optimiser, schedule, EMA
    torch.manual_seed(config.seed)
    if model is None:
        model = build_backbone(config.backbone, guided=config.guidance != "none", aggregation=config.aggregation)
    if config.init and resume_ckpt is None:
        load_backbone_checkpoint(model, load(config.init))
    model.to(device).train()
    lr, agg_lr = config.lrs
    groups = [{"params": model.backbone_parameters(), "lr": lr}]
    # α of eq. 4 starts at 0 and gates everything the guidance contributes; Adam moves a parameter by
    # about its lr per step, so α gets its own lr (else a short run never opens the gate)
    gates = [p for n, p in model.named_parameters() if n.startswith("agg.") and n.endswith(".alpha")]
    rest = [p for p in model.aggregation_parameters() if all(p is not g for g in gates)]
    if rest:
        groups.append({"params": rest, "lr": agg_lr})
    if gates:
        groups.append({"params": gates, "lr": agg_lr if config.alpha_lr is None else config.alpha_lr})
    opt = torch.optim.AdamW(groups, betas=config.betas, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.iters, eta_min=config.eta_min)
    ema = EMA(model, config.ema) if config.ema else None
    start = 0
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["model"])
        opt.load_state_dict(resume_ckpt["optimizer"])
        sched.load_state_dict(resume_ckpt["scheduler"])
        if ema is not None and resume_ckpt.get("ema"):
            ema.state = {k: v.to(device) for k, v in resume_ckpt["ema"].items()}
        set_rng_state(resume_ckpt["rng"])
        start = int(resume_ckpt["step"])
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
        emit = _logged(emit, run_dir / "log.jsonl")

    def checkpoint(step: int, path: Path) -> None:
        save(path, {"schema": SCHEMA, "config": config.to_dict(), "step": step, "model": model.state_dict(),
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng_state(),
                    "ema": ema.state if ema is not None else None})
        emit({"event": "checkpoint", "step": step, "path": str(path)})

    # 5. the loop
    result = TrainResult(run_dir, last, start, start)
    loader = DataLoader(ds, batch_size=config.batch_size, num_workers=config.workers,
                        sampler=RankSamples(start, config.iters, config.batch_size, rank, world),
                        pin_memory=device.type == "cuda", persistent_workers=False)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=config.amp and device.type == "cuda")
    guided = config.guidance != "none"
    emit({"event": "start", "step": start, "iters": config.iters, "device": str(device), "world": world,
          "params": sum(p.numel() for p in model.parameters()), "lr": lr, "agg_lr": agg_lr})
    t_loop = time.perf_counter()
    step = start
    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            break
        except (DataIntegrityError, RuntimeError) as exc:  # a damaged chunk, maybe raised in a loader worker
            error = _data_error(exc)
            if error is None:
                raise
            raise _stopped(error, step, start, main, checkpoint, last) from None
        lq = batch["lq"].to(device, non_blocking=True)
        gt = batch["gt"].to(device, non_blocking=True)
        with autocast:
            if guided:
                guide = batch["guidance"].to(device, non_blocking=True)
                context = (Context(batch["context"].to(device, non_blocking=True), batch["context_yx"].to(device))
                           if "context" in batch else None)
                out = net(lq, guide, box=crop_boxes(layout, batch, device), context=context)
            else:
                out = net(lq)
        loss = F.l1_loss(out.float(), gt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update(model)
        step += 1
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TdrError(f"The loss became {value} at step {step}; lower lr or check the data.")
        result.losses.append(value)
        emit({"event": "step", "step": step, "iters": config.iters, "loss": value,
              "lr": opt.param_groups[0]["lr"], "it_s": (step - start) / (time.perf_counter() - t_loop)})
        if main and val_source is not None and (step % config.val_every == 0 or step == config.iters):
            val_model = model
            if ema is not None:
                val_model = new_model()
                val_model.load_state_dict(ema.state)
                val_model.to(device)
            try:
                metrics = validate(val_model, store, config, val_source, val_rows, device)
            except DataIntegrityError as exc:
                raise _stopped(exc, step, start, main, checkpoint, last) from None
            result.val.append({"step": step, **metrics})
            emit({"event": "val", "step": step, **metrics})
        periodic = bool(config.save_every) and step % config.save_every == 0
        if main and periodic:
            checkpoint(step, run_dir / f"step_{step}.pt")
        if main and (periodic or step == config.iters or (config.val_every and step % config.val_every == 0)):
            checkpoint(step, last)
    if main and not last.is_file():  # nothing was left to do: still leave a checkpoint behind
        checkpoint(step, last)
    result.step = step
    result.seconds = time.perf_counter() - t_start
    return result


def _resolved_aggregation(config: TrainConfig, model: torch.nn.Module | None, ds: TripleDataset) -> TrainConfig:
    """The run's aggregation settings: a given guided model's own, else the config's with the layout of the
    store's guidance and, with ``auto_search``, the search its provenance calls for (``resolve_search``)."""
    if model is not None:
        if config.guidance != "none" and not getattr(model, "guided", False):
            raise ConfigError(f"model: a plain backbone cannot use guidance '{config.guidance}'; build it with "
                              "guided=True or set guidance 'none'.")
        if getattr(model, "guided", False):
            agg = model.agg.config
            resolve_search(agg.search, ds.provenance, config.group)  # refuses prior on guidance not aligned
            return replace(config, aggregation=agg, auto_search=False)
    agg = replace(config.aggregation, layout=ds.layout)
    search = resolve_search("auto" if config.auto_search else agg.search, ds.provenance, config.group)
    return replace(config, aggregation=replace(agg, search=search))


def _stopped(error: DataIntegrityError, step: int, start: int, main: bool, save, last: Path) -> DataIntegrityError:
    """Save the finished steps to ``last`` and return the one-line error saying how to continue."""
    if main and step > start:
        save(step, last)
        return DataIntegrityError(f"{error} Training stopped after step {step}, saved in {last}; once the store is "
                                  "repaired, resume the run (resume) to continue.")
    return error


def _data_error(exc: BaseException) -> DataIntegrityError | None:
    """The store's one-line error, also when a DataLoader worker re-raised it with its traceback text."""
    if isinstance(exc, DataIntegrityError) and "Original Traceback" not in str(exc):
        return exc
    text = str(exc)
    marker = "DataIntegrityError: "
    if marker not in text:
        return None
    line = text[text.rindex(marker) + len(marker):].strip().splitlines()[0]
    return DataIntegrityError(line)


def _logged(emit, path: Path, every: int = 10):
    """``emit`` that also appends the run's events to ``path`` (JSON lines; steps every ``every``)."""
    def log(event: dict) -> None:
        if event["event"] != "step" or event["step"] % every == 0 or event["step"] == event["iters"]:
            with open(path, "a") as f:
                f.write(json.dumps(event) + "\n")
        emit(event)
    return log
