"""Degradation cleaner of Lin et al., "Improving Image Restoration through Removing Degradations in
Textual Representations", CVPR 2024, §3.3.

N = 20 independent per-word MLPs (no mixing across words), each
Linear(D->H) LN LeakyReLU, Linear(H->H) LN LeakyReLU, Linear(H->H) LN LeakyReLU, Linear(H->D),
with D = 1024 (text-encoder width) and H = 1280 in the paper (~118M parameters). Grouped weights: one batched
matmul per layer for all words.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .mapper import GroupedMLP


@dataclass(frozen=True)
class CleanerConfig:
    """Shape of a cleaner; saved in its checkpoint."""

    word_dim: int = 1024  # D
    hidden_dim: int = 1280  # H
    num_words: int = 20  # N

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CleanerConfig:
        return cls(**d)


class Cleaner(nn.Module):
    """Degraded words (B, N, D) -> clean words (B, N, D), each word by its own MLP."""

    def __init__(self, config: CleanerConfig):
        super().__init__()
        self.config = config
        d, h = config.word_dim, config.hidden_dim
        self.mlp = GroupedMLP(config.num_words, (d, h, h, h, d))

    def forward(self, words: torch.Tensor) -> torch.Tensor:
        # (B, N, D) -> (N, B, D) so that word i meets MLP i, and back
        return self.mlp(words.transpose(0, 1)).transpose(0, 1)
