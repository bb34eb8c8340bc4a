"""Process start-up of a training run: torchrun's environment → process group, rank and device.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; with both ``RANK`` and ``WORLD_SIZE`` set the
process joins the group (NCCL on GPU, gloo on CPU), else it is a plain run of world size 1.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .config import ConfigError


@dataclass(frozen=True)
class Launch:
    """Where this process stands: its rank of ``world`` processes and the device it computes on."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0: the process that validates and writes."""
        return self.rank == 0


def pick_device(device: str | None, local_rank: int = 0) -> torch.device:
    """``device`` ("cuda", "cuda:1", "cpu"; None: cuda if available), one GPU per local rank under torchrun."""
    if device:
        chosen = torch.device(device)
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device '{device}' was asked for but no CUDA GPU is visible; use device 'cpu'.")
    else:
        chosen = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if chosen.type == "cuda" and chosen.index is None:
        chosen = torch.device("cuda", local_rank)
    return chosen


@contextmanager
def launch(device: str | None = None) -> Iterator[Launch]:
    """Join torchrun's process group (left again on exit if this call created it) and pick the device."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    created = False
    rank, world, local_rank = 0, 1, 0
    if distributed:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            created = True
        rank, world, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    try:
        chosen = pick_device(device, local_rank)
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        yield Launch(rank, world, local_rank, chosen)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
