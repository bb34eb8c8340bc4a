"""Guidance ablation on the demo dataset (paper Table 11 in miniature, on stand-ins with known truth), CPU.

Generated guidance keeps the input's content, not its pixel geometry (Stable Diffusion renders it from words). This ladder measures
guidance in that regime, in one run:

1. ingest ``demo`` and import three stand-ins for every image (``tdr.guided.synthetic``), each its own
   guidance group: *content views* (the clean content moved 15–35 % of the frame, rescaled 0.7–1.4×,
   mirrored half the time, colour-jittered; imported as of unknown geometry, like generated guidance),
   *unrelated* (another image's content view) and *aligned-content* (the clean image shifted ≤ 12 px;
   imported ``--aligned``: the upper bound, never evidence for generated guidance) and *placed views*
   (the content views put back in the input's geometry by their truth, the degraded input where a view
   does not show the frame; imported ``--aligned``: what content views carry if every match were right,
   the ceiling of matching on them);
2. train the unguided baseline (``nafnet-small``) for ``--base-iters``;
3. continue from it (``--init``) for ``--iters`` more, six ways with the trainer's defaults
   (``--search auto``: prior search for the aligned groups, global otherwise): none, degraded image as
   guidance, aligned-content, placed views, content views, unrelated — once per seed in ``--seeds`` (the
   seed draws the crops and the aggregation's initial weights; the two upper bounds, aligned-content and
   placed views, on the first ``--bound-seeds`` of them: aligned-content's goal, +2.0 dB, lies far beyond
   a seed's noise). On 48 training images
   the seed alone moves a continuation's test PSNR by a few tenths of a dB, so each guided run is
   compared with ``none`` of the same seed and the ladder reports the mean of those differences and
   their range;
4. score each on the test split (full images); for the two stand-ins with known truth, the share of
   input positions whose true source lies inside G that are matched within 4 / 8 px, at initialisation
   and after training, and on training crops searched alone and within the frame window around them
   (``TrainConfig.context``); seconds per training step guided / plain at 128² and 256² crops.

Goals: views ≥ none + 1.0 dB; unrelated ≥ none − 0.1 dB; degraded within ±0.2 dB of none; aligned ≥
none + 2.0 dB; views matched ≥ 60 % within 8 px at the end.

    python bench/guidance_ablation.py [--base-iters 300] [--iters 1500] [--patch 64] [--batch-size 4]
                                      [--seeds 0,1,2,3,4] [--bound-seeds 3]
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tdr.cache import open_store
from tdr.cache.ingest import ingest
from tdr.guided.aggregation import AggregationConfig, Context, guidance_box
from tdr.guided.backbones import build_backbone, load_backbone_checkpoint
from tdr.guided.config import EvalConfig, TrainConfig, resolve_search
from tdr.guided.evaluate import evaluate, load_run, restore, to_tensor
from tdr.guided.synthetic import make_guidance, match_hits
from tdr.guided.data import TripleDataset
from tdr.guided.train import train
from tdr.runs.checkpoint import load as load_checkpoint

SECTION = "## Guidance ablation (demo, CPU)"
STAND_INS = {"aligned": "aligned-content", "placed": "placed views", "views": "content views",
             "unrelated": "unrelated"}
BOUNDS = ("aligned", "placed")  # upper bounds: checked on fewer seeds than the differences the goals hinge on
#                        (degraded guidance's goal, within ±0.2 dB of none, is one of those)


def groups_by_kind(url: str) -> dict[str, str]:
    """Guidance group id of each stand-in (by the label it was imported under)."""
    store = open_store(url)
    return {store.guidance(g).fingerprint.get("label", "").split(":")[-1]: g for g in store.guidance_ids()}


def match_accuracy(model, url: str, group: str, truth: dict, limit: int, tolerances=(4, 8)) -> dict:
    """Share of input positions (match cells of the first ``limit`` full test images) whose true source
    lies inside G that are matched within each tolerance (input pixels at the content's scale)."""
    store = open_store(url)
    sp, gs = store["test"], store.guidance(group)
    hits, scored = np.zeros(len(tolerances)), 0
    for i in range(min(limit, len(sp))):
        with torch.no_grad():
            restore(model, to_tensor(sp.read_lq(i)), to_tensor(gs.read("test", i)), layout=gs.layout)
        h, n = match_hits(model.agg.last_matches, truth["test"][sp.ids[i]]["A"], tolerances)
        hits, scored = hits + h, scored + n
    return {f"within_{t}px": float(hv / max(scored, 1)) for t, hv in zip(tolerances, hits)} | {"scored": scored}


def crop_match_accuracy(model, url: str, group: str, truth: dict, patch: int, context: int, crops: int,
                        tolerances=(4, 8)) -> dict:
    """As :func:`match_accuracy`, on ``crops`` random ``patch``² crops of the test images as training reads
    them (``TripleDataset``, no flips), each searched with the frame window of side ``context`` around it
    (0: the crop alone)."""
    ds = TripleDataset(url, "test", patch=patch, group=group, augment=False, seed=0, context=context)
    hits, scored = np.zeros(len(tolerances)), 0
    for k in range(crops):
        item = ds[k]
        yx = tuple(int(v) for v in item["box"][:2])
        box = guidance_box(ds.layout, tuple(int(v) for v in item["full_size"]), crop_yx=yx)
        ctx = Context(item["context"][None], item["context_yx"][None]) if "context" in item else None
        with torch.no_grad():
            model(item["lq"][None], item["guidance"][None], box=box, context=ctx)
        A = truth["test"][ds._split.ids[ds.image_for(k)]]["A"]
        h, n = match_hits(model.agg.last_matches, A, tolerances, crop_yx=yx)
        hits, scored = hits + h, scored + n
    return {f"within_{t}px": float(hv / max(scored, 1)) for t, hv in zip(tolerances, hits)} | {"scored": scored}


def step_seconds(backbone: str, patch: int, batch: int, guided: bool, context: int = TrainConfig.context,
                 steps: int = 4) -> float:
    """Seconds per training step (forward, L1 backward, AdamW) on ``patch``² crops of a frame twice their
    side with its 512² "center" guidance, as training sees them (default aggregation: the global
    search, with the frame window of side ``context`` around each crop when that is larger than the
    crop), median of ``steps`` after one warm-up step."""
    torch.manual_seed(0)
    model = build_backbone(backbone, guided=guided).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, gt, g = torch.rand(batch, 3, patch, patch), torch.rand(batch, 3, patch, patch), torch.rand(batch, 3, 512, 512)
    box = guidance_box("center", (2 * patch, 5 * patch // 2), crop_yx=(patch // 2, patch // 2), batch=batch)
    c = min(context, 2 * patch)
    ctx = None
    if c > patch:
        window = torch.rand(batch, 3, c, c)
        window[..., (c - patch) // 2:(c + patch) // 2, (c - patch) // 2:(c + patch) // 2] = x
        ctx = Context(window, torch.tensor([[(c - patch) // 2] * 2] * batch))
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        out = model(x, g, box=box, context=ctx) if guided else model(x)
        (out - gt).abs().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return float(np.median(times[1:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tdr-guidance-ablation")
    ap.add_argument("--backbone", default="nafnet-small")
    ap.add_argument("--base-iters", type=int, default=300)
    ap.add_argument("--iters", type=int, default=1500)
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--agg-lr", type=float, default=5e-4)
    ap.add_argument("--alpha-lr", type=float, default=1e-2, help="lr of the fusion gates α")
    ap.add_argument("--seeds", default="0,1,2,3,4", help="continuation seeds (the first also trains the baseline)")
    ap.add_argument("--bound-seeds", type=int, default=3,
                    help="the upper bounds (aligned-content, placed views) run on this many of the first seeds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-images", type=int, default=12, help="test images scored (demo has 12)")
    ap.add_argument("--crops", type=int, default=48, help="test crops scored for training-crop matching")
    ap.add_argument("--runs", default="none,degraded,aligned,placed,views,unrelated", help="continuations to run")
    ap.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    args = ap.parse_args()
    args.seed_list = [int(v) for v in args.seeds.split(",")]
    args.seed = args.seed_list[0]
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    url = str(work / "demo.zarr")
    if not (work / "truth.json").is_file():
        ingest("demo", None, url)
        truth = {kind: make_guidance(url, work / "guidance" / kind, kind, seed=args.seed, force=True)
                 for kind in STAND_INS}
        (work / "truth.json").write_text(json.dumps(truth))
    truth = json.loads((work / "truth.json").read_text())
    groups = groups_by_kind(url)

    common = dict(backbone=args.backbone, store=url, patch=args.patch, batch_size=args.batch_size, lr=args.lr,
                  agg_lr=args.agg_lr, alpha_lr=args.alpha_lr, val_every=0)  # seed: per run

    def run(name: str, seed: int, **kw) -> dict:
        name = name if seed == args.seed else f"{name}-s{seed}"
        out = work / "runs" / name
        last = out / "last.pt"
        secs = float("nan")
        if not last.is_file():
            t = time.perf_counter()
            train(TrainConfig(out=str(out), **{**common, "seed": seed, **kw}))
            secs = time.perf_counter() - t
        res = evaluate(EvalConfig(checkpoint=str(last), store=url, split="test", limit=args.eval_images))
        search = json.loads((out / "config.json").read_text())["aggregation"]["search"] \
            if kw.get("guidance") != "none" else "—"
        print(f"{name:>10}: {res.psnr:.2f} dB (input {res.input_psnr:.2f}), {kw.get('iters')} iters, search {search}, "
              f"{secs:.0f} s", flush=True)
        return {"psnr": res.psnr, "ssim": res.ssim, "input": res.input_psnr, "iters": kw.get("iters"), "s": secs,
                "search": search, "seed": seed}

    results = {"baseline": [run("baseline", args.seed, guidance="none", iters=args.base_iters)]}
    init = str(work / "runs" / "baseline" / "last.pt")
    matches = {}
    for kind in ("aligned", "views"):  # matching at initialisation: the model the trainer builds under --init
        provenance = open_store(url).guidance(groups[kind]).provenance
        torch.manual_seed(args.seed)
        fresh = build_backbone(args.backbone, aggregation=AggregationConfig(search=resolve_search("auto", provenance)))
        load_backbone_checkpoint(fresh, load_checkpoint(init))
        matches[kind] = {"init": match_accuracy(fresh.eval(), url, groups[kind], truth[kind], args.eval_images)}
        print(f"matches at init, {kind}: {matches[kind]['init']}", flush=True)
        if kind == "views":  # training crops, searched alone and within the frame window around them
            matches["crops"] = {c: crop_match_accuracy(fresh, url, groups[kind], truth[kind], args.patch, c,
                                                       args.crops) for c in (0, TrainConfig.context)}
            print(f"matches at init, {args.crops} test crops of views, by context: {matches['crops']}", flush=True)
    plan = {"none": dict(guidance="none"), "degraded": dict(guidance="degraded")}
    plan |= {kind: dict(guidance="cache", group=groups[kind]) for kind in STAND_INS}
    for name in args.runs.split(","):
        seeds = args.seed_list[:args.bound_seeds] if name in BOUNDS else args.seed_list
        results[name] = [run(name, seed, iters=args.iters, init=init, **plan[name]) for seed in seeds]
    alphas = {}
    for kind in ("aligned", "views", "unrelated"):
        path = work / "runs" / kind / "last.pt"
        if not path.is_file():
            continue
        trained, _ = load_run(path)
        alphas[kind] = float(np.mean([float(p.detach().abs().mean()) for n, p in trained.named_parameters()
                                      if n.endswith("alpha")]))
        if kind in matches:
            matches[kind]["end"] = match_accuracy(trained, url, groups[kind], truth[kind], args.eval_images)
            print(f"matches after training, {kind}: {matches[kind]['end']}", flush=True)
    speed = {patch: {mode: step_seconds(args.backbone, patch, args.batch_size, mode == "guided")
                     for mode in ("plain", "guided")} for patch in (args.patch, 128, 256)}
    print("seconds per step:", speed, flush=True)
    (work / "results.json").write_text(json.dumps({"results": results, "matches": matches, "alphas": alphas,
                                                   "speed": speed}, indent=1))
    report = render(args, results, matches, alphas, speed, time.perf_counter() - t0)
    print(report)
    if not args.no_write:
        write_section(Path("BENCHMARKS.md"), report)


def render(args, results, matches, alphas, speed, total) -> str:
    """The BENCHMARKS.md section: per run its test PSNR for every seed, and the mean (range) over seeds of
    its difference from ``none`` of the same seed."""
    label = {"baseline": "baseline", "none": "none", "degraded": "degraded image as guidance"}
    label |= {k: v for k, v in STAND_INS.items()}
    label["aligned"] = "aligned-content (upper bound)"
    label["placed"] = "placed views (ceiling of matching on content views)"
    nones = {r.get("seed"): r["psnr"] for r in results.get("none", [])}

    def vs_none(name, runs):
        d = [r["psnr"] - nones[r.get("seed")] for r in runs if r.get("seed") in nones]
        if name in ("baseline", "none") or not d:
            return ""
        return f"{np.mean(d):+.2f}" + (f" ({min(d):+.2f} … {max(d):+.2f})" if len(d) > 1 else "")

    def psnrs(runs):
        got = {r.get("seed"): r["psnr"] for r in runs}
        return " / ".join(f"{got[v]:.2f}" if v in got else "—" for v in args.seed_list) if len(runs) > 1 \
            else f"{runs[0]['psnr']:.2f}"

    rows = "\n".join(f"| {label[name]} | {runs[0]['search']} | {runs[0]['iters']} | {psnrs(runs)} | {vs_none(name, runs)} | "
                     f"{np.mean([r['ssim'] for r in runs]):.4f} |" for name, runs in results.items())
    seeds = " / ".join(str(v) for v in args.seed_list)

    def ceiling() -> str:
        """Content views' gain as a share of the placed views' (the ceiling), on the seeds both ran."""
        placed = {r["seed"]: r["psnr"] for r in results.get("placed", [])}
        views = {r["seed"]: r["psnr"] for r in results.get("views", [])}
        both = [v for v in placed if v in views and v in nones]
        if not both:
            return ""
        gain = np.mean([views[v] - nones[v] for v in both])
        top = np.mean([placed[v] - nones[v] for v in both])
        return (f"On the seeds the ceiling ran ({', '.join(map(str, both))}), content views gain {gain:+.2f} dB, "
                f"placed views {top:+.2f}: with today's matching, content views get {gain / top:.0%} of what they carry.\n\n")

    def acc(kind, when):
        m = matches.get(kind, {}).get(when)
        return f"{m['within_4px']:.0%} / {m['within_8px']:.0%}" if m else "—"

    crops = ", ".join(f"{'searched alone' if int(c) == 0 else f'within the {c}² frame window around them'} "
                      f"{m['within_4px']:.0%} / {m['within_8px']:.0%}" for c, m in matches.get("crops", {}).items())
    speed_rows = "\n".join(f"| {p}² | {s['plain']:.3f} | {s['guided']:.3f} | {s['guided'] / s['plain']:.2f}× |"
                           for p, s in speed.items())
    return f"""{SECTION}

`python bench/guidance_ablation.py --base-iters {args.base_iters} --iters {args.iters} --patch {args.patch} \
--batch-size {args.batch_size} --seeds {args.seeds} --bound-seeds {args.bound_seeds} --threads {args.threads}` ({args.backbone}, lr {args.lr:g} / aggregation {args.agg_lr:g} / gates α \
{args.alpha_lr:g}, {args.threads} thread{'s' if args.threads != 1 else ''}; {total / 60:.1f} min for this invocation, runs already in
`--work` are reused). Demo set: 48 train / 12 test images. Stand-ins (`tdr.guided.synthetic`, 512² "center"
guidance): *content views* (the clean content moved 15–35 % of the frame, rescaled 0.7–1.4×, mirrored half
the time, colour-jittered; imported without `--aligned`, like generated guidance), *unrelated* (another
image's content view), *aligned-content* (the clean image shifted ≤ 12 px, ±4 %; imported `--aligned`: an
upper bound, not evidence for generated guidance), *placed views* (the content views put back in the
input's geometry by their truth, the degraded input where a view does not show the frame; imported
`--aligned`, whole frame: what content views carry if every match were right, the ceiling of matching on
them). Every continuation starts from the baseline (`--init`)
with the same budget and the trainer's defaults (`--search auto`), once per seed (seeds {seeds}: crops and
the aggregation's initial weights; the upper bounds, aligned-content and placed views, on the first {args.bound_seeds});
"vs none" is the mean over seeds of the difference from `none` of the same seed, with its range. Test PSNR on the first {args.eval_images} full test images; the degraded inputs
score {results['baseline'][0]['input']:.2f} dB.

| run | search | iterations | PSNR (dB), seed {seeds} | vs none, mean (range) | SSIM (mean) |
|---|---|---|---|---|---|
{rows}

{ceiling()}Matching (share of input positions whose true source lies inside G that are matched within 4 / 8 px,
input pixels at the content's scale, first {args.eval_images} full test images): content views
{acc('views', 'init')} at initialisation, {acc('views', 'end')} after training (seed {args.seed}); aligned-content (prior search)
{acc('aligned', 'init')} / {acc('aligned', 'end')}. Image features are fixed, so only the scores that weight
the transfer learn. Training crops ({args.crops} random {args.patch}² crops of the test images as the trainer reads
them, content views, at initialisation): {crops}.
Mean |α| after training (seed {args.seed}): {', '.join(f'{STAND_INS[k]} {v:.4f}' for k, v in alphas.items())}.

Seconds per training step (batch {args.batch_size}, forward + L1 backward + AdamW, random crops with 512²
guidance of a frame twice the crop's side, default aggregation with the training default's frame window around
each crop, `context` {TrainConfig.context} px, where that is larger than the crop; same run; the first row is the ladder's crop):

| crop | plain | guided | guided / plain |
|---|---|---|---|
{speed_rows}
"""


def write_section(path: Path, report: str) -> None:
    """Replace this benchmark's section of BENCHMARKS.md (or append it); other sections stay."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    pattern = re.compile(rf"{re.escape(SECTION)}\n.*?(?=\n## |\Z)", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: report.rstrip("\n") + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + report
    path.write_text(text)


if __name__ == "__main__":
    main()
