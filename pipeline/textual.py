"""Training the image-to-words mapper (stage 1) and the degradation cleaner (stage 2) of Lin et al.,
"Improving Image Restoration through Removing Degradations in Textual Representations", CVPR 2024, §3.2–3.3.

Both stages minimise the latent-diffusion loss (Rombach et al., CVPR 2022, eq. 2)

    E_{z, c, eps ~ N(0, I), t ~ U[0, T)} || eps - eps_theta(z_t, t, c) ||^2,   z = VAE(target) * scaling_factor

with the UNet, VAE, text encoder and CLIP image encoder frozen:

- stage 1 (:func:`train_mapper`): c = inject(mapper(CLIP(X))), target X, for clean and degraded images
  alike; trainable: the mapper's MLPs and its copies of the UNet's cross-attention k/v projections;
- stage 2 (:func:`train_cleaner`): c = inject(cleaner(mapper(CLIP(LQ)))), target HQ; the mapper (with its
  k/v copies) is frozen, only the cleaner trains.

Paper settings: lr 1e-6 scaled by the total batch (4 per GPU x 4 accumulation x 4 GPUs -> 6.4e-5), constant;
512² crops; up to 200k steps. Mixed precision on GPU keeps fp32 master weights of the trainable module
(frozen models in fp16, autocast); ``torchrun`` runs data-parallel (gradients all-reduced, rank 0 writes).

Run folder ``DIR``: ``config.json``, ``last.pt`` and ``step_N.pt`` (schema-1 mapper/cleaner checkpoints that
:func:`~tdr.pipeline.loading.load_components` reads, plus a ``train`` entry with the step, optimiser,
grad-scaler and RNG states and the training config, all loadable with ``torch.load(weights_only=True)``),
``pretrained/`` (the finished module as ``config.json`` + ``model.safetensors``, :mod:`tdr.pipeline.pretrained`:
what ``--mapper`` / ``--cleaner`` and the Hub take), and ``val_N.png`` grids (input | guidance). Sample k is a pure function of (seed, k)
(:mod:`tdr.pipeline.textual_data`), so ``resume=True`` continues exactly as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import TdrError
from ..runs.checkpoint import load, rng_state, save, set_rng_state
from ..runs.config import ConfigError, check_resume, from_dict, layered, to_dict
from ..runs.launch import Launch, launch
from .attention import install_mapper_kv
from .clip import encode_image, preprocess
from .injection import encode_injected
from .checkpoint import module_checkpoint
from .loading import GuidanceModels, load_components
from .pretrained import save_pretrained
from .sampler import latent_scale, make_scheduler
from .settings import CLIP_MODEL, SD_MODEL
from .textual_data import Item, apply_crop, cleaner_items, mapper_items, parse_source, sample, sample_seed, to_float

ProgressFn = Callable[[dict], None]
STAGES = ("mapper", "cleaner")
PRECISIONS = ("auto", "fp16", "bf16", "fp32")
# settings that may change when a run is resumed; every other one must match the saved run
RESUME_FREE = frozenset({"steps", "resume", "out", "device", "workers", "save_every", "val_every", "val_images",
                         "val_steps", "val_scale", "grad_checkpointing", "attention"})


@dataclass(frozen=True)
class TextualConfig:
    """Everything that defines a mapper or cleaner training run (``tdr train-mapper`` / ``train-cleaner``)."""

    data: tuple[str, ...] = ()  # sources, each "NAME[:ROOT]" or "store:URL"
    out: str = ""  # run folder
    noise_data: tuple[str, ...] = ()  # stage 2: clean images that get sigma ~ U(0, 50)/255 noise on the fly
    mapper: str | None = None  # stage 2: the trained mapper checkpoint (frozen)
    split: str = "train"
    sd_model: str = SD_MODEL
    clip_model: str = CLIP_MODEL
    preset: str = "full"  # "full" (real models) or "tiny" (tests)
    steps: int = 200_000  # optimiser steps (paper: up to 200k)
    batch_size: int = 4  # per process and micro-step (paper: 4)
    accum: int = 4  # gradient accumulation (paper: 4)
    base_lr: float = 1e-6  # lr = base_lr * batch_size * accum * world size (paper: 6.4e-5 on 4 GPUs)
    lr: float | None = None  # an absolute lr instead of the scaled one
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    size: int = 512  # training crop side (SD-2.1-base: 512)
    seed: int = 0
    precision: str = "auto"  # "auto" (fp16 on GPU, fp32 on CPU), "fp16", "bf16", "fp32"
    grad_checkpointing: bool = False
    attention: str = "auto"
    device: str | None = None  # default: cuda if available
    workers: int = 2  # threads that load and crop images
    save_every: int = 5000  # step_N.pt every N steps (0: only last.pt)
    val_every: int = 1000  # validation grid every N steps (0: never)
    val_images: int = 4
    val_steps: int = 20  # DDIM steps of the validation guidance
    val_scale: float = 5.0
    resume: bool = False

    def __post_init__(self) -> None:
        checks = [
            (bool(self.data) or bool(self.noise_data), "no training data given; set data to NAME[:ROOT] sources"),
            (bool(self.out), "no run folder given; set out to a folder"),
            (self.preset in ("full", "tiny"), f"preset must be 'full' or 'tiny', not {self.preset!r}"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}"),
            (self.steps >= 1 and self.batch_size >= 1 and self.accum >= 1, "steps, batch size and accum must be >= 1"),
            (self.size >= 8, f"crop size {self.size} is too small"),
            (self.save_every >= 0 and self.val_every >= 0, "save_every and val_every must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message[0].upper() + message[1:] + ".")

    def learning_rate(self, world_size: int = 1) -> float:
        """The paper's rule: base lr x total batch (per-GPU batch x accumulation x GPUs), unless ``lr`` is set."""
        return self.lr if self.lr is not None else self.base_lr * self.batch_size * self.accum * world_size

    def to_dict(self) -> dict:
        return to_dict(self)


def load_run_config(out: str | os.PathLike) -> dict | None:
    """The ``config.json`` of a run folder (to resume with the same settings), or None."""
    path = Path(out) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def merged_config(given: Mapping, *, config_file: str | os.PathLike | None = None) -> TextualConfig:
    """The config of a run: defaults < the run's saved ``config.json`` (when ``resume`` and ``out`` are given,
    so resuming with ``out`` alone continues a run as it was) < ``config_file``'s ``[train]`` table (or its
    top level) < ``given`` (``None`` or an empty list: not given)."""
    given = {k: v for k, v in given.items() if v is not None and v != () and v != []}
    saved = load_run_config(given["out"]) if given.get("resume") and given.get("out") else None
    return layered(TextualConfig, saved=saved, file=config_file, table="train", given=given,
                   source="training config")


@dataclass
class TextualResult:
    """What a training run returns."""

    stage: str
    run_dir: Path
    step: int  # optimiser steps done in total
    start_step: int  # 0, or the step resumed from
    losses: list[float] = field(default_factory=list)  # one per optimiser step of this call
    checkpoint: Path | None = None  # DIR/last.pt
    validations: list[Path] = field(default_factory=list)  # DIR/val_N.png grids
    val_losses: list[float] = field(default_factory=list)  # loss on fixed samples at each validation
    lr: float = 0.0
    seconds: float = 0.0


def train_mapper(config: TextualConfig, progress: ProgressFn | None = None, *,
                 models: GuidanceModels | None = None) -> TextualResult:
    """Stage 1: train the mapper (MLPs + k/v copies) on every image of ``config.data`` (each its own target).

    ``models`` (optional) are used instead of loading them (their mapper is trained in place).
    ``progress`` receives dicts: ``start`` (step, steps, lr, device, images), ``step`` (step, steps, loss,
    its), ``checkpoint`` (step, path), ``validation`` (step, path).
    """
    return _train("mapper", config, progress, models)


def train_cleaner(config: TextualConfig, progress: ProgressFn | None = None, *,
                  models: GuidanceModels | None = None) -> TextualResult:
    """Stage 2: train the cleaner on degraded -> clean pairs with the mapper ``config.mapper`` frozen.

    ``models`` (optional) are used instead of loading them (their cleaner is trained in place, everything
    else is left bit-identical). Progress events as :func:`train_mapper`.
    """
    if models is None and not config.mapper:
        raise ConfigError("The cleaner is trained on a trained mapper; set mapper to the mapper run's DIR/last.pt.")
    return _train("cleaner", config, progress, models)


# ----------------------------------------------------------------------------------------------------------
# the loop


def _precision(config: TextualConfig, device: torch.device) -> tuple[torch.dtype, bool]:
    """(dtype of the frozen models and of autocast, autocast on?). CPU always runs fp32."""
    if device.type != "cuda" or config.precision == "fp32":
        return torch.float32, False
    return (torch.bfloat16 if config.precision == "bf16" else torch.float16), True


def save_training_checkpoint(module: nn.Module, path: Path, *, stage: str, step: int, config: TextualConfig,
                             optimizer: torch.optim.Optimizer, scaler, losses: list[float]) -> None:
    """The schema-1 mapper/cleaner checkpoint of :mod:`tdr.pipeline.checkpoint` plus a ``train`` entry, written
    atomically (a killed run never leaves a half-written ``last.pt``)."""
    payload = {
        **module_checkpoint(module, meta={"stage": stage, "step": step, "training": config.to_dict()}),
        "train": {
            "step": step,
            "config": config.to_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng_state(),
            "losses": torch.tensor(losses, dtype=torch.float64),
        },
    }
    save(path, payload)


def _train(stage: str, config: TextualConfig, progress: ProgressFn | None, models: GuidanceModels | None) -> TextualResult:
    report = progress or (lambda event: None)
    with launch(config.device) as dist:
        return _run(stage, config, report, models, dist)


def _run(stage: str, config: TextualConfig, report: ProgressFn, models: GuidanceModels | None, dist: Launch) -> TextualResult:
    # 1. the run folder: new, or resumed from last.pt
    run_dir = Path(config.out)
    last = run_dir / "last.pt"
    resume_ckpt = None
    if config.resume:
        if not last.is_file():
            raise TdrError(f"resume: {last} does not exist; start the run without resume.")
        resume_ckpt = load(last)
        if resume_ckpt.get("kind") != stage or "train" not in resume_ckpt:
            raise TdrError(f"resume: {last} is not a {stage} training checkpoint; use the {stage} run's folder.")
        check_resume(from_dict(TextualConfig, resume_ckpt["train"]["config"], source=str(last)), config, RESUME_FREE)
    elif last.is_file():
        raise TdrError(f"{run_dir} already holds a run (last.pt); set resume to continue it or use a new out folder.")

    # 2. data: every source checked and listed before any model loads
    sources = [parse_source(s) for s in config.data]
    if stage == "mapper":
        if config.noise_data:
            raise ConfigError("Noise data is for the cleaner; give noisy images to the mapper as data.")
        items = mapper_items(sources, config.split)
    else:
        items = cleaner_items(sources, [parse_source(s) for s in config.noise_data], config.split)

    # 3. models: frozen ones in fp16 on GPU; the trainable module in fp32 (master weights)
    device = dist.device
    frozen_dtype, amp = _precision(config, device)
    if models is None:
        models = load_components(config.sd_model, config.clip_model, device=device, dtype=frozen_dtype,
                                 mapper_ckpt=config.mapper if stage == "cleaner" else None,
                                 preset=config.preset, allow_untrained=True)
    device = models.device
    amp = device.type == "cuda" and models.dtype != torch.float32
    frozen_dtype = models.dtype
    trainable: nn.Module = getattr(models, stage)
    trainable.float().requires_grad_(True).train()
    for name in ("unet", "vae", "text_encoder", "clip") + (("mapper",) if stage == "cleaner" else ()):
        getattr(models, name).eval().requires_grad_(False)
    install_mapper_kv(models.unet, models.mapper, config.attention)
    if config.grad_checkpointing:
        models.unet.enable_gradient_checkpointing()
    if resume_ckpt is not None:
        trainable.load_state_dict(resume_ckpt["state_dict"])

    f = latent_scale(models.vae)
    multiple = f * 2 ** (len(models.unet.config.block_out_channels) - 1)
    if config.size % multiple:
        raise ConfigError(f"The crop size must be a multiple of {multiple} for these models, got {config.size}.")
    latent_shape = (models.unet.config.in_channels, config.size // f, config.size // f)
    scheduler = make_scheduler(models.scheduler_config)

    # 4. optimiser: AdamW, constant lr scaled by the total batch
    lr = config.learning_rate(dist.world)
    params = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and frozen_dtype == torch.float16)
    start = 0
    if resume_ckpt is not None:
        train_state = resume_ckpt["train"]
        optimizer.load_state_dict(train_state["optimizer"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        scaler.load_state_dict(train_state["scaler"])
        set_rng_state(train_state["rng"])
        start = int(train_state["step"])
        past_losses = [float(x) for x in train_state["losses"].tolist()]
    else:
        past_losses = []
        if dist.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=1))

    result = TextualResult(stage, run_dir, start, start, lr=lr, checkpoint=last if start else None)
    report({"event": "start", "stage": stage, "step": start, "steps": config.steps, "lr": lr,
            "device": str(device), "images": len(items), "world_size": dist.world})
    val_items = [items[int(i)] for i in np.linspace(0, len(items) - 1, min(config.val_images, len(items)))]

    # 5. the loop: sample k = ((step * accum + micro) * world + rank) * batch + b
    per_step = config.accum * dist.world * config.batch_size

    def batch_samples(step: int, micro: int) -> list:
        first = ((step * config.accum + micro) * dist.world + dist.rank) * config.batch_size
        return [sample(items, config.seed, k, size=config.size, latent_shape=latent_shape,
                       num_timesteps=scheduler.config.num_train_timesteps)
                for k in range(first, first + config.batch_size)]

    tic = time.perf_counter()
    with ThreadPoolExecutor(max(1, config.workers)) as pool:
        plan = [(s, m) for s in range(start, config.steps) for m in range(config.accum)]
        ahead = max(1, config.workers)
        pending = [pool.submit(batch_samples, *plan[i]) for i in range(min(ahead, len(plan)))]
        cursor = len(pending)
        for step in range(start, config.steps):
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for _ in range(config.accum):
                batch = pending.pop(0).result()
                if cursor < len(plan):
                    pending.append(pool.submit(batch_samples, *plan[cursor]))
                    cursor += 1
                loss = _loss(stage, models, scheduler, batch, amp, frozen_dtype) / config.accum
                scaler.scale(loss).backward()
                total += float(loss.detach())
            if dist.world > 1:
                _all_reduce_grads(params, dist.world)
                total = _all_reduce_mean(total, device, dist.world)
            scaler.unscale_(optimizer)
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            result.losses.append(total)
            result.step = step + 1
            elapsed = time.perf_counter() - tic
            report({"event": "step", "step": step + 1, "steps": config.steps, "loss": total,
                    "its": (step + 1 - start) / elapsed if elapsed > 0 else 0.0,
                    "samples_per_step": per_step})
            done = step + 1 == config.steps
            if dist.rank == 0 and (done or (config.save_every and (step + 1) % config.save_every == 0)):
                kwargs = dict(stage=stage, step=step + 1, config=config, optimizer=optimizer, scaler=scaler,
                              losses=past_losses + result.losses)
                if config.save_every and (step + 1) % config.save_every == 0:
                    save_training_checkpoint(trainable, run_dir / f"step_{step + 1}.pt", **kwargs)
                    report({"event": "checkpoint", "step": step + 1, "path": str(run_dir / f"step_{step + 1}.pt")})
                save_training_checkpoint(trainable, last, **kwargs)
                result.checkpoint = last
                if done:  # the shareable layout of tdr.pipeline.pretrained: RUN/pretrained/
                    save_pretrained(trainable, run_dir / "pretrained", meta={"stage": stage, "step": step + 1})
            if dist.rank == 0 and config.val_every and ((step + 1) % config.val_every == 0 or done):
                path = run_dir / f"val_{step + 1}.png"
                validation_grid(stage, models, val_items, config, path, amp=amp, dtype=frozen_dtype)
                val_loss = evaluate_loss(stage, models, items, config, count=max(config.val_images, 1))
                trainable.train()
                result.validations.append(path)
                result.val_losses.append(val_loss)
                report({"event": "validation", "step": step + 1, "path": str(path), "loss": val_loss})
    result.seconds = time.perf_counter() - tic
    return result


def _loss(stage: str, m: GuidanceModels, scheduler, batch: list, amp: bool, dtype: torch.dtype) -> torch.Tensor:
    """The latent-diffusion loss of one micro-batch (fp32 scalar)."""
    device = m.device
    inputs = torch.stack([s.input for s in batch]).to(device)  # (B,3,S,S) float [0,1]
    targets = torch.stack([s.target for s in batch]).to(device)
    t = torch.tensor([s.timestep for s in batch], device=device, dtype=torch.long)
    eps = torch.stack([s.noise for s in batch]).to(device)  # (B,C,h,w)
    posterior = torch.stack([s.posterior for s in batch]).to(device)
    with torch.no_grad():
        # 1. CLIP tokens of the input: (B, 1+P, d), final layer before post-layernorm
        pixels = preprocess(inputs, size=m.clip_size, device=device, mean=m.clip_mean, std=m.clip_std)
        tokens = encode_image(m.clip, pixels)
        # 2. z = VAE(target) * scaling_factor, a posterior sample with our own noise; then z_t (DDPM forward)
        dist = m.vae.encode((targets * 2 - 1).to(dtype)).latent_dist
        z = (dist.mean.float() + dist.std.float() * posterior) * m.vae.config.scaling_factor
        z_t = scheduler.add_noise(z, eps, t)
        goal = eps if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(z, eps, t)
    with torch.autocast(device.type, dtype=dtype, enabled=amp):
        # 3. words: stage 1 maps with gradients; stage 2 maps frozen, then cleans with gradients
        if stage == "mapper":
            words = m.mapper(tokens.float())
        else:
            with torch.no_grad():
                words = m.mapper(tokens)
            words = m.cleaner(words.float())
        # 4. inject into "a photo of a S" -> (B, 77, D); 5. predict the noise
        cond = encode_injected(m.text_encoder, m.tokenizer, words)
        pred = m.unet(z_t.to(dtype), t, encoder_hidden_states=cond.to(dtype), return_dict=False)[0]
    return F.mse_loss(pred.float(), goal.float())


@torch.no_grad()
def evaluate_loss(stage: str, models: GuidanceModels, items: list[Item], config: TextualConfig,
                  count: int = 8) -> float:
    """Mean loss over ``count`` fixed samples (a stream of their own, the same at every call): a validation
    loss that moves only when the weights do."""
    install_mapper_kv(models.unet, models.mapper, config.attention)
    f = latent_scale(models.vae)
    scheduler = make_scheduler(models.scheduler_config)
    latent_shape = (models.unet.config.in_channels, config.size // f, config.size // f)
    seed = sample_seed(config.seed, 0, "validation")
    amp = models.device.type == "cuda" and models.dtype != torch.float32
    samples = [sample(items, seed, k, size=config.size, latent_shape=latent_shape,
                      num_timesteps=scheduler.config.num_train_timesteps) for k in range(count)]
    batches = [samples[i : i + config.batch_size] for i in range(0, count, config.batch_size)]
    losses = [float(_loss(stage, models, scheduler, b, amp, models.dtype)) * len(b) for b in batches]
    return sum(losses) / count


def _all_reduce_grads(params: list[torch.Tensor], world: int) -> None:
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _all_reduce_mean(value: float, device: torch.device, world: int) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / world


# ----------------------------------------------------------------------------------------------------------
# validation


def validation_grid(stage: str, models: GuidanceModels, items: list[Item], config: TextualConfig, path: Path, *,
                    amp: bool = False, dtype: torch.dtype = torch.float32) -> Path:
    """Render guidance for fixed images (few DDIM steps) into a PNG grid: one row per image, input | guidance.

    Stage 1 has no trained cleaner yet: its guidance skips the cleaner (words straight from the mapper).
    """
    from ..cache.images import write_png
    from .guidance import GuidancePipeline

    view = dataclasses.replace(models, cleaner=nn.Identity()) if stage == "mapper" else models
    pipe = GuidancePipeline(view, attention=config.attention)
    rows = []
    for i, item in enumerate(items):
        image = to_float(item.load_input())  # (3,H,W) [0,1]
        h, w = image.shape[1:]
        side = min(h, w)
        shown = apply_crop(image, ((h - side) // 2, (w - side) // 2, side, True), config.size)
        rgb8 = (shown.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        with torch.autocast(models.device.type, dtype=dtype, enabled=amp):
            guidance = pipe([rgb8], [f"val{i}"], steps=config.val_steps, scale=config.val_scale, seed=config.seed,
                            size=config.size)[0]
        rows.append(np.concatenate([rgb8, guidance], axis=1))
    write_png(path, np.concatenate(rows, axis=0))
    return path
