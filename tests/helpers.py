"""Plain helpers shared by the test folders (fixtures live in conftest.py); pytest puts this folder on the
import path (``pythonpath`` in pyproject.toml), so a test file says ``from helpers import run``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from typer.testing import CliRunner

from tdr.cli import app

runner = CliRunner()


def run(*args: str, code: int = 0):
    """Invoke ``tdr ARGS`` in-process and check its exit code; the result (output, exception)."""
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    return result


@dataclass(frozen=True)
class ArrayRef:
    """An in-memory image where a dataset pair holds a file reference: ``key`` and ``load()``."""

    key: str
    array: np.ndarray

    def load(self) -> np.ndarray:
        return self.array


@dataclass(frozen=True)
class FakePair:
    """A dataset pair (id, degraded, clean or None, clean's key) made of in-memory images."""

    id: str
    lq: ArrayRef
    gt: ArrayRef | None
    gt_key: str
