"""The Python API: what ``tdr.guided`` exports, what importing it loads, and the README's example."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import tdr.guided

ROOT = Path(__file__).resolve().parents[2]


def test_guided_exports_the_notebook_api():
    for name in ("build_backbone", "AggregationConfig", "TripleDataset", "TrainConfig", "train", "EvalConfig",
                 "evaluate", "restore"):
        assert name in tdr.guided.__all__ and callable(getattr(tdr.guided, name)), name
    assert tdr.guided.train.__module__ == "tdr.guided.train"
    assert tdr.guided.evaluate.__module__ == "tdr.guided.evaluate"


def test_importing_guided_loads_no_cli_or_diffusion_libraries():
    code = ("import sys, tdr.guided; print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'typer', 'rich', 'click', 'diffusers', 'transformers'}), 'tdr.pipeline' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["[]", "False"]


def readme_python_api() -> str:
    """The code block of the README's "Python API" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Python API section holds one python block"
    return blocks[0]


def test_readme_python_api_example_runs(tmp_path):
    res = subprocess.run([sys.executable, "-c", readme_python_api()], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert re.fullmatch(r"PSNR \d+\.\d\d dB, SSIM [01]\.\d{4}\n", res.stdout), res.stdout
    scores = json.loads((tmp_path / "runs" / "api" / "test.json").read_text())  # evaluate() wrote it
    assert scores["n"] == 2 and len(scores["rows"]) == 2 and f"PSNR {scores['psnr']:.2f} dB" in res.stdout
