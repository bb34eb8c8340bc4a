"""Fingerprints: everything about the loaded models that determines guidance, as JSON.

A store's guidance group is keyed by the models' fingerprint plus the sampling settings
(:func:`tdr.pipeline.generate.guidance_fingerprint`): model names, the sha256 of every weight file read,
the mapper's and cleaner's content hashes, the DDIM schedule, dtype and device type.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .loading import GuidanceModels
from .pretrained import CONFIG, WEIGHTS


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_HASHES: dict[tuple[str, int, int], str] = {}


def weight_sha256(path: Path) -> str:
    """sha256 of a weight file; free for HF-cache files (the blob's name is its sha256), else hashed once."""
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and len(real.name) == 64 and all(c in "0123456789abcdef" for c in real.name):
        return real.name
    st = real.stat()
    key = (str(real), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = file_sha256(real)
    return _HASHES[key]


def fingerprint(models: GuidanceModels) -> dict:
    """Everything about the models that determines guidance (JSON-able).

    Model names, sha256 of every weight file loaded (or the tiny preset and its seed), mapper and cleaner
    checkpoint sha256 (``"untrained"`` when random; a folder's: :func:`textual_sha256`),
    DDIM schedule, dtype and device type; parts loaded ``without`` are left out. Sampling settings (steps,
    scale, seed, layout, size) and the guidance source's entries are the caller's to add.
    """
    s = models.sources
    without = set(s.get("without", ()))
    fp: dict = {"preset": s["preset"], "sd_model": s.get("sd_model"), "clip_model": s.get("clip_model")}
    if "clip" in without:
        del fp["clip_model"]
    if s["preset"] == "tiny":
        fp["seed"] = s["seed"]
    else:
        fp["weights"] = {
            part: {p.name: weight_sha256(p) for p in files} for part, files in s["weight_files"].items()
        }
    for kind in ("mapper", "cleaner"):
        if kind not in without:
            fp[kind] = textual_sha256(s.get(kind + "_path") or s[kind]) if s.get(kind) else "untrained"
    fp["scheduler"] = dict(models.scheduler_config)
    fp["dtype"] = str(models.dtype).removeprefix("torch.")
    fp["device_type"] = models.device.type
    return fp


def textual_sha256(path: str | os.PathLike) -> str:
    """Content hash of a mapper/cleaner: the ``.pt`` file's sha256, or for a folder sha256 of its two files'."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    parts = {CONFIG: file_sha256(path / CONFIG), WEIGHTS: weight_sha256(path / WEIGHTS)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def source_fingerprint(models: GuidanceModels, source=None) -> dict:
    """The models' :func:`fingerprint` plus the source's entries (none for ``textual``)."""
    return {**fingerprint(models), **(source.fingerprint() if source is not None else {})}
