"""Cheap per-image checks and claims for writers sharing one guidance group.

Not a lock: a claim only tells other writers "someone is sampling this image now, do something else
first". A writer that finds an image claimed by another defers it and, after its own work, rechecks it
and generates it if it is still missing. So a claim left behind by a killed process delays nothing for
long and never loses an image; the most work done twice is the batches in flight when writers meet.

Claims are small objects ``guidance/<gid>/<split>/claims/<row>`` beside the array's chunks (zarr ignores
them) holding the writer's token; the writer deletes them once the chunk is written.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from typing import Iterable, Sequence

from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from .store import GuidanceSet

Row = tuple[str, int]  # (split, row)


def new_token() -> str:
    """A writer's claim token: host, pid and a random part (no user or credential data)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def _chunk_keys(gs: GuidanceSet, rows: Sequence[Row]) -> list[str | None]:
    """Store key of each row's chunk; None where the split has no guidance array yet."""
    arrays = {s: gs.group[s] for s in {s for s, _ in rows} if s in gs.group}
    return [f"{arrays[s].path}/{arrays[s].metadata.encode_chunk_key((i, 0, 0, 0))}" if s in arrays else None
            for s, i in rows]


def _claim_key(gs: GuidanceSet, split: str, row: int) -> str:
    return f"{gs.group.path}/{split}/claims/{row}"


def exists(gs: GuidanceSet, rows: Sequence[Row]) -> list[bool]:
    """Whether each (split, row) has a guidance chunk (one existence check per row, no listing)."""
    store = gs.group.store
    keys = _chunk_keys(gs, rows)

    async def _all() -> list[bool]:
        async def one(key: str | None) -> bool:
            return key is not None and await store.exists(key)
        return list(await asyncio.gather(*(one(k) for k in keys)))

    return sync(_all())


def claimed_by_others(gs: GuidanceSet, rows: Sequence[Row], token: str) -> list[bool]:
    """Whether each (split, row) carries another writer's claim."""
    store = gs.group.store
    proto = default_buffer_prototype()

    async def _all() -> list[bool]:
        async def one(s: str, i: int) -> bool:
            buf = await store.get(_claim_key(gs, s, i), prototype=proto)
            return buf is not None and buf.to_bytes().decode(errors="replace") != token
        return list(await asyncio.gather(*(one(s, i) for s, i in rows)))

    return sync(_all())


def claim(gs: GuidanceSet, rows: Iterable[Row], token: str) -> None:
    """Mark ``rows`` as being sampled by the writer ``token``."""
    store = gs.group.store
    data = default_buffer_prototype().buffer.from_bytes(token.encode())

    async def _all() -> None:
        await asyncio.gather(*(store.set(_claim_key(gs, s, i), data) for s, i in rows))

    sync(_all())


def release(gs: GuidanceSet, rows: Iterable[Row]) -> None:
    """Remove the claims on ``rows`` (best effort: a leftover claim only delays, never blocks)."""
    store = gs.group.store

    async def _all() -> None:
        await asyncio.gather(*(store.delete(_claim_key(gs, s, i)) for s, i in rows), return_exceptions=True)

    try:
        sync(_all())
    except Exception:
        pass
