"""(degraded, guidance, clean) training triples read from a guidance store.

Each sample is a random ``patch``² crop of the degraded and clean images (reading only the tiles it
covers) with a random flip/rotation, plus the whole guidance image of that degraded image, plus the
crop's geometry (where the crop lies in the full image) so the aggregation can use the known layout of
guidance. Sample ``k`` of a run is a pure function of (seed, k): crops do not depend on worker count,
and a resumed run sees exactly the samples the uninterrupted run would have seen. With ``context`` a
sample also holds the degraded frame around its crop (the same flip/rotation applied), for the global
search's coarse stage (:class:`~tdr.guided.aggregation.Context`).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..cache import open_store
from ..cache.images import resize_square, to_float_chw, to_uint8
from ..cache.layout import layout_region
from ..errors import ConfigError, StoreError

GUIDANCE_MODES = ("cache", "none", "degraded")


def layout_square(img: np.ndarray, size: int, layout: str) -> np.ndarray:
    """What the generation half feeds Stable Diffusion: the centre square ("center") or the whole frame
    ("full") as 8-bit, resized to ``size``² — used to make degraded-image guidance comparable to real
    guidance. (H,W,3) uint8/uint16 → (size,size,3) uint8."""
    return resize_square(to_uint8(layout_region(img, layout)), size)


def augment_ops(rng: np.random.Generator) -> tuple[bool, int]:
    """(horizontal flip, number of 90° rotations) — the 8 dihedral transforms, uniformly."""
    return bool(rng.integers(2)), int(rng.integers(4))


def _apply(t: torch.Tensor, flip: bool, rot: int) -> torch.Tensor:
    if flip:
        t = t.flip(-1)
    return torch.rot90(t, rot, dims=(-2, -1)) if rot else t


def transform_box(box: tuple[int, int, int, int], full: tuple[int, int], flip: bool, rot: int):
    """Where crop ``box`` (top, left, h, w) of a ``full`` (H, W) image lies after the same flip/rotation
    is applied to the whole image (as :func:`_apply` does): returns (box, full) in the new frame."""
    top, left, bh, bw = box
    fh, fw = full
    if flip:
        left = fw - left - bw
    for _ in range(rot % 4):  # torch.rot90 k=1: (y, x) → (W-1-x, y)
        top, left, bh, bw, fh, fw = fw - left - bw, top, bw, bh, fw, fh
    return (top, left, bh, bw), (fh, fw)


class TripleDataset(Dataset):
    """Random crops of (degraded, clean) with the whole guidance, from split ``split`` of a store.

    ``guidance``: "cache" (the store's guidance group ``group``), "none" (no guidance: the baseline),
    "degraded" (the degraded image laid out as guidance would be: the paper's "Degr." ablation).
    ``context``: side of the square window of the degraded frame around each crop that items also
    carry ("context", and the crop's top-left inside it, "context_yx"); the window is centred on the
    crop where the frame allows, and no larger than the split's smallest image side; 0 (or ≤ ``patch``):
    none. The crops themselves do not depend on it.
    Items are indexed by a global sample number (see :class:`SampleSequence`); the store is opened
    lazily in each DataLoader worker.
    """

    def __init__(self, url: str, split: str, *, patch: int, guidance: str = "cache", group: str | None = None,
                 augment: bool = True, seed: int = 0, swap: float = 0.0, context: int = 0,
                 storage_options: Mapping[str, Any] | None = None):
        if guidance not in GUIDANCE_MODES:
            raise ConfigError(f"guidance must be one of {', '.join(GUIDANCE_MODES)}, not {guidance!r}.",
                              param="guidance")
        if not 0.0 <= swap <= 1.0:
            raise ConfigError(f"swap must be a probability in [0, 1], not {swap}.", param="swap")
        self.url, self.split, self.patch, self.guidance_mode = url, split, int(patch), guidance
        self.group, self.augment, self.seed, self.swap = group, augment, int(seed), float(swap)
        self.storage_options = dict(storage_options) if storage_options else None
        store = open_store(url, storage_options=self.storage_options)
        sp = store[split]
        self.n = len(sp)
        if context < 0:
            raise ConfigError(f"context must be a window side in pixels (0: none), not {context}.", param="context")
        sides = [min(sp.lq_size(i)) for i in range(self.n)]
        small = [sp.ids[i] for i in range(self.n) if sides[i] < self.patch]
        if small:
            raise StoreError(f"Image '{small[0]}' of split '{split}' is smaller than patch {self.patch}; "
                             "use a smaller patch.", param="patch")
        side = min([int(context)] + sides)
        self.context = side if side > self.patch and guidance != "none" else 0
        if guidance == "cache":
            gs = store.guidance(group)
            done = gs.done(split, check=False)
            if not done.all():
                missing = sp.ids[int(np.flatnonzero(~done)[0])]
                raise StoreError(f"{int((~done).sum())} image(s) of split '{split}' have no guidance yet "
                                 f"(first: '{missing}'); finish 'tdr generate-guidance' or use guidance 'none'.",
                                 param="guidance")
            self.group = gs.id
            self.guidance_size = gs.size
            self.layout = gs.layout
            self.provenance: str | None = gs.provenance
        else:
            self.guidance_size = 512 if guidance == "degraded" else 0
            self.layout = "center"
            # the degraded image laid out as guidance is the input itself: its geometry follows the input
            self.provenance = "aligned" if guidance == "degraded" else None
        self._store = None

    def _open(self):
        if self._store is None:
            store = open_store(self.url, storage_options=self.storage_options)
            self._split = store[self.split]
            self._guid = store.guidance(self.group) if self.guidance_mode == "cache" else None
            self._store = store
        return self._split

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_store"] = None
        state.pop("_split", None)
        state.pop("_guid", None)
        return state

    def __len__(self) -> int:
        return self.n

    def image_for(self, k: int) -> int:
        """Image row of global sample ``k``: epochs of ``n`` samples, each a fresh permutation."""
        epoch, pos = divmod(int(k), self.n)
        return int(np.random.default_rng([self.seed, epoch, 0x7D2]).permutation(self.n)[pos])

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        sp = self._open()
        i = self.image_for(k)
        rng = np.random.default_rng([self.seed, int(k)])
        h, w = sp.lq_size(i)
        top = int(rng.integers(0, h - self.patch + 1))
        left = int(rng.integers(0, w - self.patch + 1))
        box = (top, left, self.patch, self.patch)
        flip, rot = augment_ops(rng) if self.augment else (False, 0)
        if self.context:  # the window around the crop, read once; the crop is cut from it
            c, p = self.context, self.patch
            ctop = min(max(top + p // 2 - c // 2, 0), h - c)
            cleft = min(max(left + p // 2 - c // 2, 0), w - c)
            window = sp.read_lq(i, (ctop, cleft, c, c))
            lq = window[top - ctop:top - ctop + p, left - cleft:left - cleft + p]
        else:
            lq = sp.read_lq(i, box)
        lq = _apply(to_float_chw(lq), flip, rot)
        gt = _apply(to_float_chw(sp.read_gt(i, box)), flip, rot)
        # the guidance turns with the crop, so the crop's place in the (turned) full frame stays known
        tbox, tfull = transform_box(box, (h, w), flip, rot)
        item = {"lq": lq, "gt": gt, "index": torch.tensor(i), "box": torch.tensor(tbox),
                "full_size": torch.tensor(tfull)}
        if self.context:
            inner, _ = transform_box((top - ctop, left - cleft, p, p), (c, c), flip, rot)
            item["context"] = _apply(to_float_chw(window), flip, rot)
            item["context_yx"] = torch.tensor(inner[:2])
        j = self.guidance_image(k, i)
        if self.guidance_mode == "cache":
            item["guidance"] = _apply(to_float_chw(self._guid.read(self.split, j)), flip, rot)
        elif self.guidance_mode == "degraded":
            guide = layout_square(sp.read_lq(j), self.guidance_size, self.layout)
            item["guidance"] = _apply(to_float_chw(guide), flip, rot)
        return item

    def guidance_image(self, k: int, i: int) -> int:
        """Image row whose guidance sample ``k`` (of image ``i``) gets: with probability ``swap`` another
        image's, drawn from its own stream so crops and flips do not change with ``swap``. A guidance
        image is a fixed signature of its input, so a network can memorise training images through it
        even when it shows nothing useful; pairing a share of crops with another image's guidance makes
        that pay nothing, and teaches the fusion gates to stay shut where the guidance does not match."""
        if self.swap <= 0.0 or self.n < 2:
            return i
        rng = np.random.default_rng([self.seed, int(k), 0x5A9])
        if rng.random() >= self.swap:
            return i
        j = int(rng.integers(self.n - 1))
        return j + (j >= i)


class SampleSequence(Sampler[int]):
    """Global sample numbers ``start, start+1, …, stop-1``: iteration ``t`` with batch ``B`` uses
    samples ``t·B … t·B+B-1``, so resuming at iteration ``t`` is ``SampleSequence(t·B, iters·B)``."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = int(start), int(stop)

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start
