"""The ``tdr`` command line: the only place that prints or draws progress.

Library code reports through callbacks and returns values; here they become rich tables and bars.
A user error (:class:`tdr.errors.TdrError`) is one line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__
from .demo import DemoSettings
from .errors import TdrError
from .pipeline.settings import BATCH_SIZE, CAPTION_MODEL, PRESETS, ModelSpec, SamplingSettings

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

app = typer.Typer(
    name="tdr",
    help="Image restoration guided by degradation-free textual representations (CVPR 2024).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
cache_app = typer.Typer(help="Create, inspect, verify and move guidance caches (Zarr stores).", no_args_is_help=True)
class _DatasetsGroup(typer.core.TyperGroup):
    """``tdr datasets NAME`` shows one dataset: a first word that is no subcommand is a dataset name."""

    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            return "show", self.commands["show"], args
        return super().resolve_command(ctx, args)


datasets_app = typer.Typer(help="List supported datasets (one line each), show one (tdr datasets NAME), check a "
                                "downloaded copy.", invoke_without_command=True, cls=_DatasetsGroup)
app.add_typer(cache_app, name="cache")
app.add_typer(datasets_app, name="datasets")


def user_errors(fn: Callable | None = None, *,
                interrupted: str = "what was written is valid; run the same command again to continue.") -> Callable:
    """Turn TdrError into one line on stderr + exit 1, Ctrl-C into a short note + exit 130.

    ``interrupted`` is what that note says is true for the command (training runs continue with --resume).
    """
    if fn is None:
        return functools.partial(user_errors, interrupted=interrupted)
    options = command_options(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TdrError as exc:
            err.print(f"[bold red]error:[/] {escape(error_line(exc, options))}", highlight=False, markup=True)
            # a failed remote call leaves coroutines that zarr's event loop drops at exit; their
            # "Exception ignored" tracebacks would bury the one line that says what went wrong
            sys.unraisablehook = lambda _: None
            raise typer.Exit(exc.exit_code)
        except KeyboardInterrupt:
            err.print(interrupted if interrupted.startswith("interrupted:") else f"interrupted: {interrupted}",
                      highlight=False)
            raise typer.Exit(130)

    return wrapper


def command_options(fn: Callable) -> dict[str, str]:
    """A command's options by the parameter they set: ``{"batch_size": "--batch-size", "json_path": "--json",
    "json": "--json", …}`` (keyed by the function's parameter name and by the option's own name)."""
    options: dict[str, str] = {}
    for p in inspect.signature(fn).parameters.values():
        flags = [d.split("/")[0] for d in getattr(p.default, "param_decls", None) or () if d.startswith("--")]
        if flags:
            options.setdefault(p.name, flags[0])
            for flag in flags:
                options.setdefault(flag[2:].replace("-", "_"), flag)
    return options


def error_line(exc: TdrError, options: dict[str, str]) -> str:
    """The error's sentence, plus the command's option for the parameter it names (library errors name
    parameters, e.g. ``patch``; ``tdr train`` sets it with ``--patch``), where the command has one and the
    sentence does not name it already."""
    text = str(exc)
    flag = options.get(getattr(exc, "param", None) or "")
    return f"{text} (option {flag})" if flag and flag not in text else text


RESUMABLE = ("interrupted: continue with the same command plus --resume, from the last step saved in the run's "
             "last.pt (if none was saved yet, run the command again without --resume).")


@contextmanager
def progress_bar(description: str, *, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """A rich progress bar on stderr, drawn from its first update; yields ``update(done, total[, description])``."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    bar = Progress(*columns, console=err, disable=not enabled)
    task = bar.add_task(description, total=None, rate="")

    def update(done: int, total: int, description: str | None = None) -> None:
        if not bar.live.is_started:
            bar.start()
        speed = bar.tasks[0].speed
        bar.update(task, completed=done, total=total, rate=f"{speed:.2f} it/s" if speed else "",
                   **({"description": description} if description else {}))

    try:
        yield update
    finally:
        if bar.live.is_started:
            bar.stop()


def version_callback(value: bool) -> None:
    if value:
        out.print(f"tdr {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", help="Print the version and exit.",
                                      callback=version_callback, is_eager=True)) -> None:
    """Image restoration guided by degradation-free textual representations (CVPR 2024).

    Example: tdr demo --out demo-run
    """


# --------------------------------------------------------------------------------------------- datasets
@datasets_app.callback()
def datasets_list(ctx: typer.Context) -> None:
    """List every supported dataset, one line each; 'tdr datasets NAME' shows its expected layout.

    Example: tdr datasets gopro
    """
    if ctx.invoked_subcommand is not None:
        return
    from .cache.datasets import list_datasets

    rows = [(ds.name, ds.title, ", ".join(ds.splits), _metric_text(ds.metric)) for ds in list_datasets()]
    for line in _columns([("name", "dataset", "splits", "metric"), *rows], width=80):
        out.print(line, highlight=False, markup=False)
    out.print("Layout of one: tdr datasets NAME", highlight=False, markup=False)


def _metric_text(metric: dict) -> str:
    return ("Y" if metric.get("y_channel") else "RGB") + f", SSIM {metric.get('ssim', 'basicsr')}"


def _columns(rows: list[tuple[str, ...]], width: int) -> list[str]:
    """Rows as space-separated columns in ``width`` characters; the second column is shortened to fit."""
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    spare = width - (sum(widths) + 2 * (len(widths) - 1))
    if spare < 0:
        widths[1] = max(8, widths[1] + spare)

    def cell(text: str, w: int) -> str:
        return (text if len(text) <= w else text[:w - 1] + "…").ljust(w)

    return ["  ".join(cell(t, w) for t, w in zip(r, widths)).rstrip() for r in rows]


@datasets_app.command("show", hidden=True)
@user_errors
def datasets_show(name: str = typer.Argument(..., help="Dataset name.")) -> None:
    """One dataset: task, splits, metric convention and the expected on-disk layout.

    Example: tdr datasets gopro
    """
    from .cache.datasets import get_dataset

    ds = get_dataset(name)
    out.print(f"{ds.name}: {ds.title}\nsplits: {', '.join(ds.splits)}\nmetric: {_metric_text(ds.metric)}"
              f"\nexpected layout:\n{ds.layout.strip()}", highlight=False, markup=False)


@datasets_app.command("check")
@user_errors
def datasets_check(name: str = typer.Argument(..., help="Dataset name (see 'tdr datasets')."),
                   root: Path = typer.Option(..., "--root", help="The dataset folder as downloaded.")) -> None:
    """Count the pairs of a downloaded dataset and list every pairing problem.

    Example: tdr datasets check gopro --root ~/data/GOPRO_Large
    """
    from .cache.datasets import get_dataset

    report = get_dataset(name).check(root)
    table = Table(title=f"{name} at {root}")
    for col in ("split", "pairs", "expected"):
        table.add_column(col)
    for split, count in report.counts.items():
        expected = report.expected.get(split)
        table.add_row(split, str(count), "" if expected is None else str(expected))
    out.print(table)
    for note in report.notes:
        out.print(f"note: {note}", highlight=False)
    if report.problems:
        for problem in report.problems:
            err.print(f"problem: {problem}", highlight=False, markup=False)
        err.print(f"{len(report.problems)} problem(s) found.")
        raise typer.Exit(1)
    out.print("No pairing problems.")


# ------------------------------------------------------------------------------------------------ cache
def _storage_option():
    return typer.Option([], "--storage-option", help="fsspec option KEY=VALUE for remote stores, repeatable "
                        "(also: $TDR_STORAGE_OPTIONS as JSON).")


def _options(pairs: list[str]):
    """--storage-option pairs (and $TDR_STORAGE_OPTIONS) as fsspec storage options."""
    from .cache.options import parse_storage_options

    return parse_storage_options(pairs)


@cache_app.command("ingest")
@user_errors
def cache_ingest(dataset: str = typer.Option(..., "--dataset", help="Dataset name (see 'tdr datasets')."),
                 store: str = typer.Option(..., "--store", help="Store location: a local path or an fsspec URL."),
                 root: Optional[Path] = typer.Option(None, "--root", help="Dataset folder (not needed for demo)."),
                 split: Optional[str] = typer.Option(None, "--split", help="Comma-separated splits (default: all found)."),
                 workers: int = typer.Option(2, "--workers", min=1, help="Decoding threads."),
                 sigma: Optional[float] = typer.Option(None, "--sigma", help="Gaussian denoising sets: noise level on 0..255 (default 25)."),
                 noise: Optional[str] = typer.Option(None, "--noise", help="Gaussian denoising sets: promptir (clip, truncate) or round."),
                 repair: bool = typer.Option(False, "--repair", help="Rewrite stored images that are missing or corrupt from the dataset folder."),
                 storage_option: list[str] = _storage_option()) -> None:
    """Copy a dataset's degraded and clean images into a guidance store.

    Splits already in the store are compared with the folder image by image: changed pixels are refused,
    and damaged stored images are reported (or rewritten with --repair).

    Example: tdr cache ingest --dataset gopro --root ~/data/GOPRO_Large --store gopro.zarr
    """
    from .cache.ingest import ingest

    options = {k: v for k, v in {"sigma": sigma, "noise": noise}.items() if v is not None}
    with progress_bar("ingest") as update:
        summary = ingest(dataset, str(root) if root else None, store, splits=_split_list(split), workers=workers,
                         options=options, storage_options=_options(storage_option), repair=repair,
                         progress=lambda s, d, t: update(d, t, f"ingest {s}"))
    _print_ingest(summary)


def _split_list(text: Optional[str]) -> Optional[list[str]]:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def _print_ingest(summary) -> None:
    table = Table(title=f"{summary.dataset} → {summary.store}")
    for col in ("split", "degraded", "clean", "status"):
        table.add_column(col)
    for s in summary.splits:
        status = f"repaired {s.repaired} image(s)" if s.repaired else s.status
        table.add_row(s.split, str(s.images), str(s.clean_images), status)
    out.print(table)


def _human(n: int) -> str:
    if n < 0:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@cache_app.command("info")
@user_errors
def cache_info(store: str = typer.Argument(..., help="Store location."),
               as_json: bool = typer.Option(False, "--json", help="Print the facts as JSON."),
               storage_option: list[str] = _storage_option()) -> None:
    """Per split: image counts, guidance done/missing, fingerprint, bytes on disk.

    Example: tdr cache info gopro.zarr
    """
    from .cache import open_store
    from .cache.report import info

    facts = info(open_store(store, storage_options=_options(storage_option)))
    if as_json:
        out.print_json(json.dumps(facts))
    else:
        _print_info(facts, store)


def _print_info(facts: dict, store: str) -> None:
    """``tdr cache info`` as tables: the store, its splits, each guidance group."""
    from .cache.report import UNFINISHED

    out.print(f"store {facts['url']}  dataset {facts['dataset']}  {_human(facts['bytes'])} on disk", highlight=False)
    table = Table(title="splits")
    for col in ("split", "degraded", "clean", "dtype", "size"):
        table.add_column(col)
    for name, s in facts["splits"].items():
        table.add_row(name, str(s["images"]), str(s["clean_images"]), s["dtype"], _human(s["bytes"]))
    out.print(table)
    for name in facts["unfinished_splits"]:
        out.print(f"split '{name}': {UNFINISHED}", highlight=False)
    if not facts["guidance"]:
        out.print("guidance: none yet")
    for gid, g in facts["guidance"].items():
        default = " (default)" if gid == facts["default_guidance"] else ""
        table = Table(title=f"guidance {gid}{default}, {g['size']}², {_human(g['bytes'])}, "
                            f"provenance {g['provenance']}, layout {g['layout']}")
        for col in ("split", "done", "missing"):
            table.add_column(col)
        for name, s in g["splits"].items():
            table.add_row(name, str(s["done"]), str(s["missing"]))
        out.print(table)
        out.print("fingerprint: " + ", ".join(f"{k}={v}" for k, v in sorted(g["fingerprint"].items())), highlight=False)
        if g.get("captions"):
            c = g["captions"]
            out.print(f"captions: {c['count']} ({c['edited']} edited); 'tdr cache captions {store} --group {gid}' "
                      "lists them all", highlight=False)
            for rec in c["sample"]:
                out.print(f"  {rec['split']}/{rec['id']}: {rec['raw']!r} -> {rec['prompt']!r}", highlight=False,
                          markup=False)


@cache_app.command("verify")
@user_errors
def cache_verify(store: str = typer.Argument(..., help="Store location."),
                 storage_option: list[str] = _storage_option()) -> None:
    """Read every chunk and re-hash every image; list corrupt or missing ones (exit 1 if any).

    Example: tdr cache verify gopro.zarr
    """
    from .cache import open_store
    from .cache.report import verify

    st = open_store(store, storage_options=_options(storage_option))
    with progress_bar("verify") as update:
        report = verify(st, progress=update)
    for p in report.problems:
        out.print(str(p), highlight=False, markup=False)
    if report.problems:
        err.print(f"{len(report.problems)} problem(s) in {report.checked} images checked.")
        raise typer.Exit(1)
    out.print(f"ok: {report.checked} images checked, all chunks intact.")


@cache_app.command("import-guidance")
@user_errors
def cache_import(store: str = typer.Argument(..., help="Store location."),
                 split: str = typer.Option(..., "--split", help="Split the guidance belongs to."),
                 source: Path = typer.Option(..., "--from", help="Folder of guidance images named <image id>.png/.jpg (ids with '/' as nested folders, or '_' for each '/')."),
                 aligned: bool = typer.Option(False, "--aligned", help="The images' geometry follows the degraded images (registered reference photos); default: unknown, matched globally like generated guidance."),
                 layout: str = typer.Option("center", "--layout", help="What each image shows: center (the frame's centre square, as the paper's scripts write) or full (the whole frame)."),
                 label: Optional[str] = typer.Option(None, "--label", help="Name of this guidance source: imports with different labels are separate groups."),
                 force: bool = typer.Option(False, "--force", help="Add a new guidance group if the store holds other guidance."),
                 storage_option: list[str] = _storage_option()) -> None:
    """Import guidance images made elsewhere (e.g. by the paper's scripts), resized to the store's size.

    Example: tdr cache import-guidance gopro.zarr --split train --from results/gopro_train
    """
    from .cache import open_store
    from .cache.transfer import import_guidance

    with progress_bar("import") as update:
        summary = import_guidance(open_store(store, "a", _options(storage_option)), split, source, aligned=aligned,
                                  layout=layout, label=label, force=force, progress=update)
    out.print(f"imported {summary.written} guidance images into group {summary.group}")
    if summary.missing:
        out.print(f"{len(summary.missing)} image(s) had no file in {source}, first: {summary.missing[0]}", highlight=False)
    if summary.unused:
        out.print(f"{len(summary.unused)} file(s) in {source} match no image id of split '{split}' and were not "
                  f"imported, first: {summary.unused[0]} (names: <id>.png, nested or with '_' for '/')", highlight=False)


@cache_app.command("export")
@user_errors
def cache_export(store: str = typer.Argument(..., help="Store location."),
                 to: Path = typer.Option(..., "--to", help="Output folder: <to>/<split>/<id>.png."),
                 split: Optional[str] = typer.Option(None, "--split", help="Comma-separated splits (default: all)."),
                 group: Optional[str] = typer.Option(None, "--group", help="Guidance group id (default: the store's)."),
                 storage_option: list[str] = _storage_option()) -> None:
    """Write guidance images as PNG files named by image id.

    Example: tdr cache export gopro.zarr --to guidance-png
    """
    from .cache import open_store
    from .cache.transfer import export_guidance

    with progress_bar("export") as update:
        summary = export_guidance(open_store(store, storage_options=_options(storage_option)), to,
                                  splits=_split_list(split), gid=group, progress=update)
    out.print(f"exported {summary.written} guidance images from group {summary.group} to {to}", highlight=False)
    if summary.missing:
        out.print(f"{len(summary.missing)} image(s) have no guidance yet, first: {summary.missing[0]}", highlight=False)


@cache_app.command("captions")
@user_errors
def cache_captions(store: str = typer.Argument(..., help="Store location."),
                   group: Optional[str] = typer.Option(None, "--group", help="Guidance group id (default: the store's)."),
                   split: Optional[str] = typer.Option(None, "--split", help="Comma-separated splits (default: all)."),
                   edits: Optional[list[Path]] = typer.Option(None, "--from", help="captions.jsonl with edited prompts: store them and remove the guidance made from the old ones (repeatable)."),
                   storage_option: list[str] = _storage_option()) -> None:
    """List the captions of a --source caption group as JSON lines, or store hand-edited prompts.

    Fix captions by hand: list them into a file, edit the "prompt" of some lines, import the file with
    --from, then rerun the same 'tdr generate-guidance --source caption': only the edited images are made again.

    Example: tdr cache captions gopro.zarr > captions.jsonl; tdr cache captions gopro.zarr --from captions.jsonl
    """
    from .cache import open_store
    from .cache.captions import import_edits, list_captions

    options = _options(storage_option)
    if not edits:
        for rec in list_captions(open_store(store, storage_options=options), group, _split_list(split)):
            print(json.dumps(rec, ensure_ascii=False))
        return
    summary = import_edits(open_store(store, "a", options), edits, group=group, splits=_split_list(split))
    out.print(f"{len(summary.changed)} caption(s) changed, {summary.unchanged} unchanged; guidance removed for "
              f"{summary.invalidated} image(s) of group {summary.group}.", highlight=False)
    if summary.changed:
        out.print("Rerun the same 'tdr generate-guidance --source caption …' to make their guidance from the new "
                  "prompts.", highlight=False)


@cache_app.command("merge")
@user_errors
def cache_merge(src: str = typer.Argument(..., help="Store to copy guidance from."),
                dst: str = typer.Argument(..., help="Store to copy guidance into (its images decide what is copied)."),
                storage_option: list[str] = _storage_option()) -> None:
    """Copy guidance made with equal settings into DST for every image whose degraded pixels SRC knows.

    Matching is by content (sha256 of the degraded pixels), across splits and datasets; stores whose
    guidance was made with other settings are refused.

    Example: tdr cache merge alice/gopro.zarr s3://team/gopro.zarr
    """
    from .cache import open_store
    from .cache.merge import merge

    options = _options(storage_option)
    with progress_bar("merge") as update:
        summary = merge(open_store(src, storage_options=options), open_store(dst, "a", options), progress=update)
    out.print(f"merged group(s) {', '.join(summary.groups)}: copied {summary.copied}, already present "
              f"{summary.already}, still missing {summary.missing}", highlight=False)
    if summary.unreadable:
        err.print(f"{summary.unreadable} source chunk(s) failed their checksum and were not copied; "
                  f"run 'tdr cache verify {src}'.", highlight=False)


def _loss_progress(update: Callable[..., None], label: str, *, total: str, val_event: str,
                   val_text: Callable[[dict], str], start_text: Callable[[dict], str]) -> Callable[[dict], None]:
    """A trainer's progress callback for the bar: "start", "step" (loss smoothed over ~10 steps) and the
    trainer's validation event; ``total`` names the event field holding the number of steps."""
    state: dict = {"loss": None, "val": ""}

    def report(event: dict) -> None:
        if event["event"] == "start":
            update(event["step"], event[total], f"{label} {start_text(event)}")
        elif event["event"] == "step":
            loss = event["loss"]
            state["loss"] = loss if state["loss"] is None else 0.9 * state["loss"] + 0.1 * loss
            update(event["step"], event[total], f"{label}  loss {state['loss']:.4f}  {state['val']}".rstrip())
        elif event["event"] == val_event:
            state["val"] = val_text(event)

    return report


# ------------------------------------------------------------------------------ train-mapper / train-cleaner
def _run_textual(stage: str, given: dict, config_file: Optional[Path]) -> None:
    """Shared body of train-mapper / train-cleaner: config, progress bar, summary table."""
    from .pipeline.textual import merged_config, train_cleaner, train_mapper

    config = merged_config(given, config_file=config_file)
    _quiet_model_libraries()
    train = train_mapper if stage == "mapper" else train_cleaner
    with progress_bar(f"train-{stage}") as update:
        report = _loss_progress(update, f"train-{stage}", total="steps", val_event="validation",
                                val_text=lambda e: f"val {e['loss']:.4f}",
                                start_text=lambda e: f"({e['device']}, {e['images']} images, lr {e['lr']:.2e})")
        result = train(config, progress=report)
    table = Table(title=f"{stage} run {result.run_dir}")
    for col in ("steps", "last loss", "val loss", "lr", "time", "checkpoint"):
        table.add_column(col)
    table.add_row(str(result.step), f"{result.losses[-1]:.4f}" if result.losses else "-",
                  f"{result.val_losses[-1]:.4f}" if result.val_losses else "-", f"{result.lr:.2e}",
                  f"{result.seconds:.1f} s", str(result.checkpoint))
    out.print(table)
    if result.validations:
        out.print(f"validation grid (input | guidance) → {result.validations[-1]}", highlight=False)


def _textual_command(stage: str, summary: str, example: str, pairs_help: str):
    """Build the typer command of one textual stage (the two share every option but --mapper/--noise-data)."""

    def command(
        data: Optional[list[str]] = typer.Option(None, "--data", help=pairs_help),
        noise_data: Optional[list[str]] = typer.Option(None, "--noise-data", hidden=stage == "mapper", help="Clean images that get Gaussian noise sigma ~ U(0,50) on the fly: NAME[:ROOT] or store:URL."),
        mapper: Optional[str] = typer.Option(None, "--mapper", hidden=stage == "mapper", help="The trained mapper (train-mapper's DIR/last.pt); it stays frozen."),
        out_dir: Optional[str] = typer.Option(None, "--out", help="Run folder (config.json, last.pt, step_N.pt, val_N.png; pretrained/ when finished: config.json + model.safetensors, what --mapper/--cleaner and the Hub take)."),
        steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Optimiser steps (paper: up to 200000)."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Images per micro-step and GPU (paper: 4)."),
        accum: Optional[int] = typer.Option(None, "--accum", "--grad-accum", min=1, help="Gradient accumulation steps (paper: 4)."),
        lr: Optional[float] = typer.Option(None, "--lr", help="Absolute learning rate (default: --base-lr x total batch)."),
        base_lr: Optional[float] = typer.Option(None, "--base-lr", help="Learning rate per image of the total batch (paper: 1e-6)."),
        size: Optional[int] = typer.Option(None, "--size", min=8, help="Training crop side (SD-2.1-base: 512)."),
        split: Optional[str] = typer.Option(None, "--split", help="Dataset split to train on."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the sample sequence (crops, noise, timesteps)."),
        precision: Optional[str] = typer.Option(None, "--precision", help="auto (fp16 autocast on GPU), fp16, bf16 or fp32."),
        grad_checkpointing: Optional[bool] = typer.Option(None, "--grad-checkpointing/--no-grad-checkpointing", help="Recompute UNet activations in backward (less memory, slower)."),
        save_every: Optional[int] = typer.Option(None, "--save-every", min=0, help="Write step_N.pt every N steps (0: last.pt only)."),
        val_every: Optional[int] = typer.Option(None, "--val-every", min=0, help="Write a validation grid every N steps (0: never)."),
        val_steps: Optional[int] = typer.Option(None, "--val-steps", min=1, help="DDIM steps of the validation guidance."),
        workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Image loading threads."),
        device: Optional[str] = typer.Option(None, "--device", help="cuda or cpu (default: cuda if available; torchrun: one GPU per process)."),
        sd_model: Optional[str] = typer.Option(None, "--sd-model", help="Hub id or local folder (diffusers layout)."),
        clip_model: Optional[str] = typer.Option(None, "--clip-model", help="Hub id or local folder."),
        preset: Optional[str] = typer.Option(None, "--preset", help="full: real models; tiny: tiny random models (tests, demo)."),
        dataset: Optional[list[str]] = typer.Option(None, "--dataset", help="Shorthand for --data NAME (e.g. --dataset demo)."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly where last.pt left it."),
        config_file: Optional[Path] = typer.Option(None, "--config", help="TOML file with any of these settings (flat or under [train])."),
    ) -> None:
        if stage == "mapper" and (mapper or noise_data):
            raise typer.BadParameter("only for train-cleaner", param_hint="--mapper/--noise-data")
        given = dict(data=(list(data or []) + list(dataset or [])) or None, out=out_dir, steps=steps,
                     batch_size=batch_size, accum=accum, lr=lr, base_lr=base_lr, size=size, split=split, seed=seed,
                     precision=precision, grad_checkpointing=grad_checkpointing, save_every=save_every,
                     val_every=val_every, val_steps=val_steps, workers=workers, device=device, sd_model=sd_model,
                     clip_model=clip_model, preset=preset, resume=resume or None)
        if stage == "cleaner":
            given.update(noise_data=noise_data, mapper=mapper)
        _run_textual(stage, given, config_file)

    command.__doc__ = (f"{summary}\n\n    Options not given keep the resumed run's settings, else TextualConfig's "
                       f"defaults (tdr.pipeline.textual).\n\n    Example: {example}\n    ")
    return user_errors(command, interrupted=RESUMABLE)


app.command("train-mapper")(_textual_command(
    "mapper", "Stage 1: train the image-to-words mapper (and its UNet k/v copies) on clean and degraded images.",
    "tdr train-mapper --data gopro:~/data/GOPRO_Large --data rain200h:~/data/Rain200H --out runs/mapper",
    "Training images: NAME[:ROOT] of 'tdr datasets' or store:URL; repeat for several."))
app.command("train-cleaner")(_textual_command(
    "cleaner", "Stage 2: train the degradation cleaner on degraded -> clean pairs, with the mapper frozen.",
    "tdr train-cleaner --data gopro:~/data/GOPRO_Large --noise-data div2k:~/data/DIV2K --mapper runs/mapper/last.pt --out runs/cleaner",
    "Degraded/clean pairs: NAME[:ROOT] or store:URL; repeat for several."))


# ------------------------------------------------------------------------------------ generate-guidance
def _quiet_model_libraries() -> None:
    """diffusers/transformers log warnings meant for their developers; keep the terminal for ours."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


@app.command("generate-guidance")
@user_errors
def generate_guidance(
    dataset: str = typer.Option(..., "--dataset", help="Dataset name (see 'tdr datasets')."),
    store: str = typer.Option(..., "--store", help="Store location: a local path or an fsspec URL."),
    root: Optional[Path] = typer.Option(None, "--root", help="Dataset folder, to ingest it if the store lacks it."),
    split: Optional[str] = typer.Option(None, "--split", help="Comma-separated splits (default: all)."),
    steps: int = typer.Option(SamplingSettings.steps, "--steps", min=1, help="DDIM steps (default: the paper's)."),
    scale: float = typer.Option(SamplingSettings.scale, "--scale", help="Classifier-free guidance scale (default: the paper's)."),
    batch_size: int = typer.Option(BATCH_SIZE, "--batch-size", min=1, help="Images per batch."),
    seed: int = typer.Option(SamplingSettings.seed, "--seed", help="Run seed; each image's noise comes from (seed, sha256 of its degraded pixels)."),
    layout: str = typer.Option(SamplingSettings.layout, "--layout", help="center: the centre square (paper); full: whole frame."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Generate at most N images in this run."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda or cpu (default: cuda if available)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp16, bf16 or fp32 (default: fp16 on GPU, fp32 on CPU)."),
    compile: bool = typer.Option(ModelSpec.compile, "--compile", help="torch.compile the UNet (pays off for large jobs on GPU)."),
    sd_model: str = typer.Option(ModelSpec.sd_model, "--sd-model", help="Hub id or local folder (diffusers layout)."),
    clip_model: str = typer.Option(ModelSpec.clip_model, "--clip-model", help="Hub id or local folder."),
    source: str = typer.Option(ModelSpec.source, "--source", help="Guidance source: textual (mapper + cleaner, the method), mapper-only (no cleaner) or caption (BLIP-2 caption without degradation words; no training)."),
    caption_model: Optional[str] = typer.Option(None, "--caption-model", help=f"--source caption: image-to-text model, hub id or folder (default {CAPTION_MODEL})."),
    caption_words: Optional[Path] = typer.Option(None, "--caption-words", help="--source caption: file of extra degradation words/phrases, one per line."),
    mapper: Optional[str] = typer.Option(None, "--mapper", help="Mapper: train-mapper's last.pt, its pretrained/ folder, or a Hub id in the HF cache."),
    cleaner: Optional[str] = typer.Option(None, "--cleaner", help="Cleaner: train-cleaner's last.pt, its pretrained/ folder, or a Hub id in the HF cache."),
    preset: str = typer.Option(ModelSpec.preset, "--preset", help="full: real models; tiny: tiny random models (tests, demo)."),
    allow_untrained: bool = typer.Option(ModelSpec.allow_untrained, "--allow-untrained", help="Run real models with a random mapper/cleaner."),
    size: Optional[int] = typer.Option(None, "--size", min=64, help=f"Guidance side in pixels (default: {PRESETS['full']}, SD-2.1-base's; {PRESETS['tiny']} with --preset tiny, whose random models make no pictures worth a {PRESETS['full']}² attention cost)."),
    force: bool = typer.Option(False, "--force", help="Add a new guidance group if the store holds other guidance."),
    workers: int = typer.Option(0, "--workers", min=0, help="Sample on N local dask workers (one per GPU; CPU processes without GPUs); 0: in this process."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Sample on a running dask cluster, e.g. tcp://10.0.0.5:8786 (SLURM: see README)."),
    storage_option: list[str] = typer.Option([], "--storage-option", help="fsspec option KEY=VALUE for remote stores, repeatable (also: $TDR_STORAGE_OPTIONS as JSON)."),
) -> None:
    """Make guidance images for a dataset and write them into its store (resumable).

    Example: tdr generate-guidance --dataset gopro --root ~/data/GOPRO_Large --store gopro.zarr --mapper m.pt --cleaner c.pt

    Each --source writes its own guidance group in the store (pick one with 'tdr train --group');
    --source caption also stores every image's raw and cleaned caption ('tdr cache captions').
    """
    _quiet_model_libraries()
    from .pipeline.degradation_words import load_word_file
    from .pipeline.generate import generate_guidance as generate

    spec = ModelSpec(sd_model=sd_model, clip_model=clip_model, mapper=mapper, cleaner=cleaner, preset=preset,
                     device=device, dtype=dtype, allow_untrained=allow_untrained, compile=compile, source=source,
                     caption_model=caption_model, caption_words=load_word_file(caption_words) if caption_words else ())
    settings = SamplingSettings(steps=steps, scale=scale, seed=seed, layout=layout, size=size)
    with progress_bar("guidance") as update:
        def report(event: dict) -> None:
            if event["event"] == "ingest":
                update(event["done"], event["total"], f"ingest {event['split']}")
            elif event["event"] == "plan":
                update(0, event["todo"], "guidance")
            else:
                update(event["done"], event["total"])

        summary = generate(store, dataset, spec, settings, root=root, splits=_split_list(split), batch_size=batch_size,
                           limit=limit, force=force, workers=workers, scheduler=scheduler,
                           storage_options=_options(storage_option), progress=report)
    if not summary.done and not summary.failed:
        out.print(f"Nothing to do: all {summary.skipped} images of {', '.join(summary.splits)} already have guidance "
                  f"(group {summary.group}).", highlight=False)
        return
    table = Table(title=f"guidance → {store} (group {summary.group}, attention {summary.attention})")
    for col in ("done", "skipped", "failed", "time", "s/image"):
        table.add_column(col)
    table.add_row(str(summary.done), str(summary.skipped), str(len(summary.failed)), f"{summary.seconds:.1f} s",
                  f"{summary.seconds_per_image:.3f}")
    out.print(table)
    if summary.failed:
        for line in summary.failed[:10]:
            err.print(f"failed: {line}", highlight=False, markup=False)
        err.print(f"{len(summary.failed)} image(s) failed; run the same command again to retry them.")
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------------- train / eval
@app.command("train")
@user_errors(interrupted=RESUMABLE)
def train_cmd(
    backbone: Optional[str] = typer.Option(None, "--backbone", help="Backbone name, e.g. nafnet, nafnet-w32, restormer, nafnet-test."),
    store: Optional[str] = typer.Option(None, "--store", help="Store with the training (and test) split."),
    out_dir: Optional[str] = typer.Option(None, "--out", help="Run folder (config.json, last.pt)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Check that the store holds this dataset."),
    guidance: Optional[str] = typer.Option(None, "--guidance", help="cache, none (plain backbone) or degraded."),
    group: Optional[str] = typer.Option(None, "--group", help="Guidance group id in the store (default: the store's default)."),
    fuse: Optional[str] = typer.Option(None, "--fuse", help="Where guidance is fused: enc, dec or enc+dec."),
    search: Optional[str] = typer.Option(None, "--search", help="Matching: auto (prior for guidance imported --aligned, else global), global (content anywhere in G, several scales, mirrored), prior (around the layout's place; aligned guidance only), masa (the paper's search)."),
    match: Optional[str] = typer.Option(None, "--match", help="Features matched: image or encoder (paper: learned)."),
    transfer: Optional[str] = typer.Option(None, "--transfer", help="Feature transfer: bilinear (sub-cell) or patch (paper)."),
    iters: Optional[int] = typer.Option(None, "--iters", help="Training iterations."),
    patch: Optional[int] = typer.Option(None, "--patch", help="Training crop side in pixels."),
    context: Optional[int] = typer.Option(None, "--context", help="Global search: side of the degraded frame window around each crop its coarse stage sees (0: the crop alone)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Crops per iteration and process."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Backbone learning rate (default: the paper's for the backbone)."),
    agg_lr: Optional[float] = typer.Option(None, "--agg-lr", help="Aggregation learning rate (default: about half of --lr)."),
    alpha_lr: Optional[float] = typer.Option(None, "--alpha-lr", help="Learning rate of the fusion gates α (default: --agg-lr)."),
    ema: Optional[float] = typer.Option(None, "--ema", help="EMA decay of the weights, e.g. 0.999 (default: off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the model init and the crop sequence."),
    init: Optional[str] = typer.Option(None, "--init", help="Official or tdr checkpoint for the backbone (aggregation starts fresh)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly where last.pt left it."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Data-loading worker processes."),
    val_every: Optional[int] = typer.Option(None, "--val-every", help="Validate on the test split every N iterations (0: never)."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda or cpu (default: cuda if available)."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="TOML file with any of these settings (flat or under [train]; aggregation settings under [train.aggregation])."),
) -> None:
    """Train a restorer (guided by the store's guidance, or plain) with L1, AdamW and a cosine schedule.

    Options not given keep the resumed run's settings, else TrainConfig's defaults (tdr.guided.config).

    Example: tdr train --backbone nafnet-w32 --store gopro.zarr --iters 30000 --out runs/gopro-guided
    """
    from .guided.config import train_config
    from .guided.train import train

    aggregation = dict(fuse=fuse, search=search, match_features=match, transfer=transfer)
    config = train_config(dict(backbone=backbone, store=store, out=out_dir, dataset=dataset, guidance=guidance,
                               group=group, aggregation=aggregation, iters=iters, patch=patch, batch_size=batch_size,
                               context=context, lr=lr, agg_lr=agg_lr, alpha_lr=alpha_lr, ema=ema, seed=seed, init=init,
                               resume=resume or None, workers=workers, val_every=val_every, device=device),
                          config_file=config_file)
    with progress_bar("train") as update:
        report = _loss_progress(update, "train", total="iters", val_event="val",
                                val_text=lambda e: f"val {e['psnr']:.2f} dB", start_text=lambda e: f"({e['device']})")
        result = train(config, progress=report)
    table = Table(title=f"run {result.run_dir}")
    for col in ("steps", "last loss", "val PSNR", "val SSIM", "time", "checkpoint"):
        table.add_column(col)
    last_val = result.val[-1] if result.val else {}
    table.add_row(str(result.step), f"{result.losses[-1]:.4f}" if result.losses else "-",
                  f"{last_val['psnr']:.2f}" if last_val else "-", f"{last_val['ssim']:.4f}" if last_val else "-",
                  f"{result.seconds:.1f} s", str(result.checkpoint))
    out.print(table)


@app.command("eval")
@user_errors
def eval_cmd(
    checkpoint: str = typer.Option(..., "--checkpoint", help="A tdr run checkpoint (e.g. RUN_DIR/last.pt), or official weights with --backbone."),
    store: str = typer.Option(..., "--store", help="Store holding the split to score."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="Official plain weights (e.g. NAFNet-GoPro-width64.pth): their backbone, e.g. nafnet."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Check that the store holds this dataset."),
    split: str = typer.Option("test", "--split", help="Split to score."),
    group: Optional[str] = typer.Option(None, "--group", help="Guidance group (default: the run's, else the store's default)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write mean and per-image metrics as JSON here."),
    grids: int = typer.Option(0, "--grids", min=0, help="Save degraded | guidance | restored | clean PNGs of the first N images."),
    grid_dir: Optional[str] = typer.Option(None, "--out", help="Folder for the grids (default: beside the checkpoint)."),
    tile: int = typer.Option(0, "--tile", min=0, help="Restore in tiles of this side (0: whole images)."),
    overlap: int = typer.Option(32, "--overlap", min=0, help="Tile overlap in pixels."),
    limit: int = typer.Option(0, "--limit", min=0, help="Score only the first N images (0: all)."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda or cpu (default: cuda if available)."),
) -> None:
    """Restore every image of a split whole and score it by the dataset's metric convention.

    Example: tdr eval --checkpoint runs/gopro-guided/last.pt --store gopro.zarr --json gopro.json --grids 4
    """
    from .guided.config import EvalConfig
    from .guided.evaluate import evaluate

    config = EvalConfig(checkpoint=checkpoint, store=store, dataset=dataset, backbone=backbone, split=split,
                        group=group, tile=tile,
                        overlap=overlap, grids=grids, out=grid_dir, json=str(json_path) if json_path else None,
                        limit=limit, device=device)
    with progress_bar(f"eval {split}") as update:
        result = evaluate(config, progress=lambda e: update(e["done"], e["total"]))
    conv = result.metric
    table = Table(title=f"{result.checkpoint} on {split} ({'Y' if conv['y_channel'] else 'RGB'}, "
                        f"crop {conv['crop_border']}, SSIM {conv['ssim']}, guidance {result.guidance})")
    for col in ("images", "PSNR", "SSIM", "input PSNR", "time"):
        table.add_column(col)
    table.add_row(str(result.n), f"{result.psnr:.2f}", f"{result.ssim:.4f}", f"{result.input_psnr:.2f}",
                  f"{result.seconds:.1f} s")
    out.print(table)
    if json_path is not None:
        out.print(f"metrics → {json_path}", highlight=False)
    if result.grids:
        out.print(f"{len(result.grids)} grid(s) → {Path(result.grids[0]).parent}", highlight=False)


# ------------------------------------------------------------------------------------------------- demo
@app.command("demo")
@user_errors
def demo(out_dir: Path = typer.Option(Path("tdr-demo"), "--out", help="Folder for the demo store, runs and report."),
         iters: Optional[int] = typer.Option(None, "--iters", min=1, help=f"Iterations of each continued run (unguided / guided; default {DemoSettings.iters})."),
         base_iters: Optional[int] = typer.Option(None, "--base-iters", min=1, help=f"Iterations of the unguided baseline (default {DemoSettings.base_iters}).")) -> None:
    """Run the whole flow on the built-in demo dataset with tiny models (no GPU, no weights), about 4 minutes on 2 cores.

    Example: tdr demo --out demo-run
    """
    import torch

    from .demo import RUNS, run_demo

    _quiet_model_libraries()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    with err.status("demo") as status:
        given = {k: v for k, v in (("iters", iters), ("base_iters", base_iters)) if v is not None}
        result = run_demo(out_dir, DemoSettings(**given),
                          progress=lambda message: (status.update(message), err.print(message, highlight=False)))
    took = f"{result.total_seconds / 60:.1f} min in total"
    if result.total_seconds - result.seconds > 1:
        took += f", {result.seconds / 60:.1f} min in this invocation"
    table = Table(title=f"demo: test split, {took}")
    for col in ("model", "PSNR (dB)", "SSIM"):
        table.add_column(col)
    table.add_row("degraded input", f"{result.input_psnr:.2f}", "")
    for name, m in result.metrics.items():
        table.add_row(RUNS[name], f"{m['psnr']:.2f}", f"{m['ssim']:.4f}")
    out.print(table)
    out.print(f"report: {result.report}", highlight=False)


# commands whose CPU work does not promise bit-identical results across thread counts (generation does:
# its pixels depend on torch's thread count, so it keeps torch's default count)
LOAD_AWARE_COMMANDS = {"train", "eval", "demo", "train-mapper", "train-cleaner"}


def busy_cores(interval: float = 0.3) -> int:
    """CPU cores kept busy by other processes, from two reads of /proc/stat ``interval`` s apart (0 where
    there is no /proc/stat). This process sleeps meanwhile, so it does not count itself."""
    import time

    def read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values), idle

    try:
        total0, idle0 = read()
        time.sleep(interval)
        total1, idle1 = read()
    except (OSError, ValueError, IndexError):
        return 0
    if total1 <= total0:
        return 0
    busy_fraction = 1.0 - (idle1 - idle0) / (total1 - total0)
    return int(round(busy_fraction * (os.cpu_count() or 1)))


def cpu_threads(busy: int | None = None) -> int:
    """Intra-op threads for a CPU run: the cores this process may use, less those busy with other work.
    Two threads on two cores beside one busy process ran 13× slower than one thread (BENCHMARKS.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - (busy_cores() if busy is None else busy))


def apply_cpu_policy(argv: list[str]) -> None:
    """Before torch loads: OpenMP threads sleep instead of spinning when they wait (they no longer steal
    the cores they wait for), and heavy CPU commands use only the cores not busy at start. Settings the
    user gave (OMP_WAIT_POLICY, OMP_NUM_THREADS) are kept."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in LOAD_AWARE_COMMANDS and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(cpu_threads())


def main() -> None:
    apply_cpu_policy(sys.argv[1:])
    app(prog_name="tdr")


if __name__ == "__main__":
    main()
