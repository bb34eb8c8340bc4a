"""Plain helpers shared by the test folders (fixtures live in conftest.py); pytest puts this folder on the
import path (``pythonpath`` in pyproject.toml), so a test file says ``from helpers import run``."""

from __future__ import annotations

from typer.testing import CliRunner

from tdr.cli import app

runner = CliRunner()


def run(*args: str, code: int = 0):
    """Invoke ``tdr ARGS`` in-process and check its exit code; the result (output, exception)."""
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    return result
