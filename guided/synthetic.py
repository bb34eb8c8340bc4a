"""Stand-ins for generated guidance whose relation to the input is known.

Guidance that Stable Diffusion renders keeps the input's content and textures, not its pixel geometry:
the mapper averages CLIP's patch tokens, SD is conditioned by 20 words, and composition follows the
initial noise. Claims about guidance therefore rest on stand-ins that re-compose the content, with the
true correspondence kept so that matching can be scored:

- ``content_view`` (the default stand-in for generated guidance): the clean image's content moved by a good
  fraction of the frame, rescaled, mirrored half the time, colour-jittered, rendered at the guidance size;
- ``unrelated``: another image's content view — guidance that carries nothing; it must never hurt;
- ``aligned_content``: the clean image shifted a few pixels and rescaled ±4 % in the input's own
  geometry (registered reference photos behave like this). An *upper bound*: never evidence that
  generated guidance helps;
- ``placed_view``: a content view put back in the input's geometry by its truth, the degraded input where
  the view does not show the frame — what content views carry when every match is right: the ceiling of
  matching on content views, an upper bound as well.

Every stand-in comes with its truth as an affine map ``T(y, x) = A·(y, x) + b`` from input pixel centres
(the full degraded frame) to guidance pixel centres, stored as ``{"A": [[a_yy, a_yx, b_y], [a_xy, a_xx,
b_x]]}`` (``None`` for unrelated guidance). Input positions whose true source ``T(p)`` falls outside the
guidance have no correct match and are not scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from ..cache import open_store
from ..cache.images import to_uint8
from ..cache.layout import layout_box
from ..cache.transfer import import_guidance
from ..errors import ConfigError

GUIDANCE_SIZE = 512
STAND_INS = ("views", "unrelated", "aligned", "placed")
ALIGNED = ("aligned", "placed")  # stand-ins imported --aligned (the prior search reads them where they lie)


@dataclass(frozen=True)
class ViewRanges:
    """How far a content view re-composes the content (uniform draws; the defaults are the issue's regime)."""

    shift: tuple[float, float] = (0.15, 0.35)  # translation, as a fraction of the centre square's side
    scale: tuple[float, float] = (0.7, 1.4)  # content scale (drawn log-uniformly)
    mirror: float = 0.5  # probability of a left-right mirror
    gain: tuple[float, float] = (0.85, 1.15)  # per-channel colour gain
    bias: float = 12.0  # per-channel colour offset, ± grey levels


def _render(img: np.ndarray, A: np.ndarray, size: int, rng: np.random.Generator, gain, bias) -> np.ndarray:
    """Guidance pixel g shows input pixel A⁻¹(g − b) (bilinear, mirrored at the image's edges so the whole
    canvas has content, as a generated image does), colour-jittered; (size, size, 3) uint8."""
    lin, off = A[:, :2], A[:, 2]
    inv = np.linalg.inv(lin)
    zoom = np.abs(np.diag(lin))  # guidance pixels per input pixel, per axis
    out = []
    for k in range(3):
        ch = img[..., k].astype(np.float32)
        if zoom.min() < 1.0:  # shrinking: low-pass first so the resample does not alias
            ch = ndimage.gaussian_filter(ch, sigma=[max(0.0, 0.5 / z - 0.5) for z in zoom])
        out.append(ndimage.affine_transform(ch, inv, offset=-inv @ off, output_shape=(size, size), order=1,
                                            mode="mirror"))
    moved = np.stack(out, -1) * rng.uniform(*gain, 3) + rng.uniform(-bias, bias, 3)
    return np.clip(moved, 0, 255).round().astype(np.uint8)


def content_view(gt: np.ndarray, rng: np.random.Generator, ranges: ViewRanges = ViewRanges(),
                 size: int = GUIDANCE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The clean image's content re-composed, as generated guidance would show it: its centre square
    rescaled by s, moved by t (a fraction of the side, any direction), mirrored half the time, about the
    guidance's centre. Returns (guidance (size,size,3) uint8, A (2,3): input pixel → guidance pixel)."""
    h, w = gt.shape[:2]
    top, left, side, _ = layout_box("center", h, w)  # what "center" guidance is about
    k = size / side  # guidance pixels per input pixel of the centre square
    s = float(np.exp(rng.uniform(*np.log(ranges.scale))))
    flip = -1.0 if rng.random() < ranges.mirror else 1.0
    angle = rng.uniform(0, 2 * np.pi)
    t = rng.uniform(*ranges.shift) * side * np.array([np.sin(angle), np.cos(angle)])
    lin = np.diag([k * s, k * s * flip])
    centre = np.array([top + side / 2, left + side / 2])  # continuous coords of the square's centre
    # g + ½ = k·(s·F·(p + ½ − centre) + t) + size/2
    off = k * t + size / 2 - 0.5 + lin @ (0.5 - centre)
    A = np.concatenate([lin, off[:, None]], 1)
    return _render(gt, A, size, rng, ranges.gain, ranges.bias), A


def aligned_content(gt: np.ndarray, rng: np.random.Generator, shift: float = 12.0,
                    size: int = GUIDANCE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The clean frame moved by p ↦ s·(p − c) + c + d (shift ≤ ``shift`` px, s = 1 ± 4 %), colour-jittered,
    then laid out as "center" guidance (centre square resized to ``size``²). Returns (guidance, A)."""
    h, w = gt.shape[:2]
    top, left, side, _ = layout_box("center", h, w)
    s = float(rng.uniform(0.96, 1.04))
    d = rng.uniform(-shift, shift, 2)
    c = np.array([(h - 1) / 2, (w - 1) / 2])
    k = size / side
    lin = np.diag([k * s, k * s])
    # moved pixel m = s·(p − c) + c + d; guidance g + ½ = k·(m + ½ − (top, left))
    off = k * ((1 - s) * c + d + 0.5 - np.array([top, left])) - 0.5
    A = np.concatenate([lin, off[:, None]], 1)
    return _render(gt, A, size, rng, (0.9, 1.1), 8.0), A


def placed_view(view: np.ndarray, A: np.ndarray, lq: np.ndarray) -> np.ndarray:
    """The content view ``view`` (its truth ``A``) put back in the geometry of the degraded frame ``lq``
    (H,W,3): input pixel p shows view(T(p)) (bilinear) where T(p) lies inside the view, ``lq`` elsewhere,
    where the view has nothing to show. What content views carry if every match were right; (H,W,3) uint8."""
    h, w = lq.shape[:2]
    yx = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).astype(np.float64)
    src = true_source(A, yx)
    inside = inside_guidance(src, view.shape[:2])
    got = np.stack([ndimage.map_coordinates(view[..., k].astype(np.float32), [src[..., 0], src[..., 1]], order=1,
                                            mode="nearest") for k in range(3)], -1)
    out = np.where(inside[..., None], np.clip(got, 0, 255).round(), to_uint8(lq)[..., :3])
    return out.astype(np.uint8)


def inside_guidance(yx: np.ndarray, size) -> np.ndarray:
    """Whether guidance pixel coords ``yx`` (…,2) lie inside a guidance image of ``size`` (h, w) (pixel
    centres at integers, so its area runs from −½ to size − ½)."""
    lim = np.asarray(size, dtype=np.float64) - 0.5
    return (yx >= -0.5).all(-1) & (yx <= lim).all(-1)


def true_source(A: np.ndarray | list, yx: np.ndarray) -> np.ndarray:
    """Guidance pixel coords (…,2) of input pixel coords ``yx`` (…,2) under truth ``A`` (2,3)."""
    A = np.asarray(A, dtype=np.float64)
    return yx @ A[:, :2].T + A[:, 2]


def make_guidance(url: str, folder: Path, kind: str = "views", *, seed: int = 0, shift: float = 12.0,
                  ranges: ViewRanges = ViewRanges(), label: str | None = None, force: bool = False) -> dict:
    """Write stand-in guidance ``kind`` ("views", "unrelated", "aligned" or "placed") for every image of every
    split into the store at ``url`` through PNG files in ``folder`` (as a user's imported guidance would
    come). Aligned-content and placed views are imported as ``aligned`` (their geometry follows the input;
    placed views show the whole frame: layout "full"); the others as unknown, like guidance of unknown
    geometry. Placed views are the content views of the same ``seed`` and ``ranges``, put back by their
    truth (:func:`placed_view`). Returns each image's truth {"A": …} (None: unrelated; for placed views the
    content view's) by split and id (``truth[split][image_id]``: splits may share ids)."""
    if kind not in STAND_INS:
        raise ConfigError(f"kind must be one of {', '.join(STAND_INS)}, not {kind!r}.")
    store = open_store(url, "a")
    truth: dict[str, dict[str, dict | None]] = {}
    for split in store.splits:
        sp = store[split]
        drawn = "views" if kind == "placed" else kind  # placed views: the same draws as the content views
        rng = np.random.default_rng([seed, STAND_INS.index(drawn), store.splits.index(split)])
        out = folder / split
        out.mkdir(parents=True, exist_ok=True)
        n = len(sp)
        for i, image_id in enumerate(sp.ids):
            if kind == "aligned":
                guide, A = aligned_content(sp.read_gt(i), rng, shift)
            elif kind in ("views", "placed"):
                guide, A = content_view(sp.read_gt(i), rng, ranges)
                if kind == "placed":
                    guide = placed_view(guide, A, sp.read_lq(i))
            else:  # another image's content view: half the split away
                guide, A = content_view(sp.read_gt((i + n // 2) % n), rng, ranges)
                A = None
            path = out / f"{image_id}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(guide).save(path)
            truth.setdefault(split, {})[image_id] = None if A is None else {"A": A.tolist()}
        import_guidance(store, split, out, aligned=kind in ALIGNED, layout="full" if kind == "placed" else
                        "center", label=label or f"stand-in:{kind}", force=force)
    return truth


def match_hits(matches, A, tolerances=(4, 8), crop_yx: tuple[float, float] = (0, 0)) -> tuple[np.ndarray, int]:
    """Score one image's matches against its truth ``A``: among valid match cells whose true source
    ``T(p)`` lies inside the guidance, how many are matched within each tolerance, in input pixels at
    the content's scale (guidance-pixel error / |A|'s scale). ``matches``: ``Matches`` of a batch of 1;
    ``crop_yx``: the input's top-left corner in the frame ``A`` refers to. Returns (hits per tolerance, scored)."""
    A = np.asarray(A, dtype=np.float64)
    yx = matches.x_yx[0].permute(1, 2, 0).double().numpy() + np.asarray(crop_yx, dtype=np.float64)
    true = true_source(A, yx)  # (h,w,2)
    size = matches.g_size if hasattr(matches, "g_size") else None
    got = matches.g_yx[0].permute(1, 2, 0).double().numpy()
    inside = inside_guidance(true, size if size is not None else (GUIDANCE_SIZE, GUIDANCE_SIZE))
    inside &= matches.valid[0, 0].numpy()
    scale = np.abs(np.diag(A[:, :2]))  # guidance pixels per input pixel of the content
    err = (np.abs(got - true) / scale).max(-1)
    return np.array([int((inside & (err <= t)).sum()) for t in tolerances]), int(inside.sum())
