"""Fingerprints: a canonical, hashable description of everything that determines guidance.

A fingerprint is a flat JSON-able dict (model ids and weight hashes, mapper/cleaner checkpoint hashes,
steps, scale, seed, layout, preset, size). Two runs with equal fingerprints produce the same guidance
for the same degraded pixels, so their outputs may share one guidance group.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal dicts give equal strings."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint_id(fingerprint: Mapping[str, Any]) -> str:
    """Short content id of a fingerprint: the first 12 hex digits of sha256(canonical JSON)."""
    return hashlib.sha256(canonical_json(dict(fingerprint)).encode()).hexdigest()[:12]


def describe_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """One line naming the fields that differ, e.g. ``steps 200 → 50, seed 0 → 1``."""
    parts = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "∅"), new.get(key, "∅")
        if a != b:
            a_s, b_s = _short(a), _short(b)
            parts.append(f"{key} {a_s} → {b_s}")
    return ", ".join(parts) if parts else "no difference"


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else canonical_json(value)
    return text if len(text) <= 24 else text[:12] + "…"
