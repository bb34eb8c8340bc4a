"""Images for training the mapper and the cleaner (Lin et al., CVPR 2024, §3.2-3.3).

A *source* is written ``NAME[:ROOT]`` (a dataset of ``tdr datasets``, its folder when it needs one) or
``store:URL`` (a tdr guidance store, local or remote). From the sources:

- stage 1 (mapper, unpaired) uses every image, degraded and clean alike, each its own target:
  :func:`mapper_items` lists each pair's degraded image and each distinct clean image once;
- stage 2 (cleaner, paired) uses degraded -> clean pairs: :func:`cleaner_items`. Clean-only denoising
  data (the Gaussian-noise sets, whose degraded images are one fixed noise draw, and every ``--noise-data``
  source) instead gets Gaussian noise of sigma ~ U(0, 50)/255 on the fly.

Sample ``k`` of a run is a pure function of (seed, k) (:func:`sample`): which item (a fresh permutation of
the items per epoch), the crop (the paper's: a random ``size``² crop of a large image, else the centre
square resized to ``size``), the denoising sigma and noise, and the diffusion draws (timestep, latent noise,
VAE posterior noise). So a resumed or re-sharded run sees exactly the samples of an uninterrupted one.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from ..cache.images import to_float_chw
from ..cache.layout import layout_box
from ..errors import DatasetError, StoreError

MAX_NOISE_SIGMA = 50.0  # 0..255 scale: the cleaner stage trains on Gaussian noise of sigma ~ U(0, 50)


@dataclass(frozen=True)
class Source:
    """One ``--data`` / ``--noise-data`` value: a dataset (``name``, optional ``root``) or a store URL."""

    text: str
    name: str = ""
    root: str | None = None
    store: str | None = None


def parse_source(text: str) -> Source:
    """``NAME[:ROOT]`` or ``store:URL`` -> :class:`Source` (the dataset name is checked here)."""
    text = text.strip()
    if text.startswith("store:"):
        url = text[len("store:") :]
        if not url:
            raise StoreError(f"Data source '{text}' names no store; write store:PATH_OR_URL.")
        return Source(text, store=url)
    from ..cache.datasets import get_dataset

    name, _, root = text.partition(":")
    get_dataset(name)  # an unknown name lists the valid ones
    return Source(text, name=name.strip().lower(), root=root or None)


@dataclass(frozen=True)
class Item:
    """One training example: ``load_input()`` -> the image CLIP sees, ``load_target()`` -> the image the UNet
    learns to make (None: the input itself, as in stage 1), both (H,W,3) uint8/uint16; ``noise``: add
    on-the-fly Gaussian noise to the (cropped) input."""

    key: str
    load_input: Callable[[], np.ndarray]
    load_target: Callable[[], np.ndarray] | None = None
    noise: bool = False


def _dataset_pairs(source: Source, split: str):
    from ..cache.datasets import get_dataset

    dataset = get_dataset(source.name)
    if split not in dataset.splits:
        raise DatasetError(
            f"Data source '{source.text}' has no '{split}' split (it has {', '.join(dataset.splits)}); "
            "train on a dataset's training split."
        )
    return dataset, dataset.pairs(source.root, split)


def _is_clean_only(dataset) -> bool:
    """Gaussian-noise sets: the degraded image is one fixed noise draw over a clean image."""
    from ..cache.datasets.denoise import GaussianSet

    return isinstance(dataset, GaussianSet)


def _store_split(source: Source, split: str):
    """The split of a store-backed source; a clear error if the store lacks it."""
    from ..cache import open_store

    store = open_store(source.store)
    if split not in store:
        raise StoreError(f"Store {source.store} has no '{split}' split.")
    return store[split]


def mapper_items(sources: Sequence[Source], split: str = "train") -> list[Item]:
    """Stage 1: every degraded image and every distinct clean image of the sources, each its own target."""
    items: list[Item] = []
    for source in sources:
        if source.store is not None:
            view = _store_split(source, split)
            seen: set[int] = set()
            for i, image_id in enumerate(view.ids):
                items.append(Item(f"{source.text}/lq/{image_id}", functools.partial(view.read_lq, i)))
                j = int(view.gt_index[i])
                if j >= 0 and j not in seen:
                    seen.add(j)
                    items.append(Item(f"{source.text}/gt/{j}", functools.partial(view.read_gt, i)))
            continue
        _, pairs = _dataset_pairs(source, split)
        seen_keys: set[str] = set()
        for pair in pairs:
            items.append(Item(f"{source.text}/lq/{pair.lq.key}", pair.lq.load))
            if pair.gt is not None and pair.gt.key not in seen_keys:
                seen_keys.add(pair.gt.key)
                items.append(Item(f"{source.text}/gt/{pair.gt.key}", pair.gt.load))
    if not items:
        raise DatasetError("The training data holds no images; pass data NAME[:ROOT] with a non-empty dataset.",
                           param="data")
    return items


def cleaner_items(sources: Sequence[Source], noise_sources: Sequence[Source] = (), split: str = "train") -> list[Item]:
    """Stage 2: degraded -> clean pairs, plus clean images that get on-the-fly noise (see the module doc)."""
    items: list[Item] = []
    for source in sources:
        if source.store is not None:
            view = _store_split(source, split)
            rows = [i for i in range(len(view)) if view.gt_index[i] >= 0]
            if not rows:
                raise DatasetError(
                    f"Store {source.store} holds no clean images in '{split}'; the cleaner needs degraded/clean pairs."
                )
            items += [
                Item(f"{source.text}/{view.ids[i]}", functools.partial(view.read_lq, i), functools.partial(view.read_gt, i))
                for i in rows
            ]
            continue
        dataset, pairs = _dataset_pairs(source, split)
        if any(p.gt is None for p in pairs):
            raise DatasetError(
                f"Data source '{source.text}' has images without clean counterparts; the cleaner needs pairs "
                "(pass clean-only images as noise data to train denoising on them).", param="noise_data"
            )
        if _is_clean_only(dataset):
            items += [Item(f"{source.text}/{p.gt.key}", p.gt.load, noise=True) for p in _distinct_gt(pairs)]
        else:
            items += [Item(f"{source.text}/{p.id}", p.lq.load, p.gt.load) for p in pairs]
    for source in noise_sources:
        items += [Item(key, load, noise=True) for key, load in clean_images(source, split)]
    if not items:
        raise DatasetError("The training data holds no pairs; pass data NAME[:ROOT] with a paired dataset.",
                           param="data")
    return items


def _distinct_gt(pairs):
    seen: set[str] = set()
    for p in pairs:
        if p.gt.key not in seen:
            seen.add(p.gt.key)
            yield p


def clean_images(source: Source, split: str = "train") -> list[tuple[str, Callable[[], np.ndarray]]]:
    """(key, loader) of a source's distinct clean images; a source without any (a folder of clean photos in
    ``lq/`` only, a store without clean images) gives its plain images."""
    if source.store is not None:
        view = _store_split(source, split)
        rows: dict[int, int] = {}
        for i in range(len(view)):
            rows.setdefault(int(view.gt_index[i]), i)
        rows.pop(-1, None)
        if rows:
            return [(f"{source.text}/gt/{j}", functools.partial(view.read_gt, i)) for j, i in rows.items()]
        return [(f"{source.text}/{image_id}", functools.partial(view.read_lq, i)) for i, image_id in enumerate(view.ids)]
    _, pairs = _dataset_pairs(source, split)
    if any(p.gt is not None for p in pairs):
        return [(f"{source.text}/{p.gt.key}", p.gt.load) for p in _distinct_gt([p for p in pairs if p.gt is not None])]
    return [(f"{source.text}/{p.lq.key}", p.lq.load) for p in pairs]


# ----------------------------------------------------------------------------------------------------------
# samples as pure functions of (seed, k)


def sample_seed(seed: int, k: int, stream: str) -> int:
    """A 63-bit generator seed from (run seed, sample index, stream name): sha256 of ``"seed:k:stream"``."""
    digest = hashlib.sha256(f"{seed}:{k}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def item_index(seed: int, k: int, n: int) -> int:
    """Which of ``n`` items sample ``k`` is: epoch ``k // n`` walks its own permutation of the items."""
    epoch, offset = divmod(k, n)
    perm = np.random.default_rng(sample_seed(seed, epoch, "epoch")).permutation(n)
    return int(perm[offset])


def to_float(image: np.ndarray) -> torch.Tensor:
    """(H,W,3) uint8/uint16 -> (3,H,W) float32 in [0,1]."""
    return to_float_chw(image[..., :3])


def crop_box(height: int, width: int, size: int, rng: np.random.Generator) -> tuple[int, int, int, bool]:
    """(top, left, side, resize): a random ``size``² crop when both sides reach ``size`` (no resize), else the
    centre square of side min(H, W) to be resized to ``size`` (the paper's rule)."""
    if min(height, width) >= size:
        return int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1)), size, False
    top, left, side, _ = layout_box("center", height, width)
    return top, left, side, True


def apply_crop(x: torch.Tensor, box: tuple[int, int, int, bool], size: int) -> torch.Tensor:
    """(3,H,W) float -> (3,size,size): the box, resized (antialiased bicubic, clamped to [0,1]) if needed."""
    top, left, side, resize = box
    x = x[:, top : top + side, left : left + side]
    if resize and side != size:
        x = F.interpolate(x[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
        x = x.clamp(0.0, 1.0)
    return x


@dataclass
class Sample:
    """Sample k, ready for the loss: images (3,S,S) float [0,1]; diffusion draws for a (C,h,w) latent."""

    input: torch.Tensor  # what CLIP sees (degraded, or noised clean)
    target: torch.Tensor  # what the UNet learns to make
    timestep: int  # t ~ U[0, T)
    noise: torch.Tensor  # (C,h,w) epsilon of the forward process
    posterior: torch.Tensor  # (C,h,w) standard normal for z = mean + std * posterior (VAE sampling)


def sample(
    items: Sequence[Item],
    seed: int,
    k: int,
    *,
    size: int,
    latent_shape: tuple[int, int, int],
    num_timesteps: int = 1000,
    max_sigma: float = MAX_NOISE_SIGMA,
) -> Sample:
    """Sample ``k`` of a run with ``seed``: a pure function of (items, seed, k, settings)."""
    item = items[item_index(seed, k, len(items))]
    rng = np.random.default_rng(sample_seed(seed, k, "crop"))
    gen = torch.Generator().manual_seed(sample_seed(seed, k, "diffusion"))
    inp = to_float(item.load_input())
    target = inp if item.load_target is None else to_float(item.load_target())
    box = crop_box(target.shape[1], target.shape[2], size, rng)
    target_c = apply_crop(target, box, size)
    if item.load_target is None:
        inp_c = target_c
    elif inp.shape == target.shape:
        inp_c = apply_crop(inp, box, size)
    else:  # sizes differ: each its centre square, resized
        top, left, side, _ = layout_box("center", *inp.shape[1:])
        inp_c = apply_crop(inp, (top, left, side, True), size)
    if item.noise:  # sigma ~ U(0, 50)/255, added to the clean crop, clipped to [0,1]
        sigma = float(rng.uniform(0.0, max_sigma)) / 255.0
        noise = torch.randn(inp_c.shape, generator=torch.Generator().manual_seed(sample_seed(seed, k, "image-noise")))
        inp_c = (inp_c + sigma * noise).clamp(0.0, 1.0)
    timestep = int(torch.randint(0, num_timesteps, (1,), generator=gen))
    eps = torch.randn(latent_shape, generator=gen)
    posterior = torch.randn(latent_shape, generator=gen)
    return Sample(inp_c.contiguous(), target_c.contiguous(), timestep, eps, posterior)
