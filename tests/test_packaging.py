"""Project structure: import rules between the halves, the Dockerfile, every command's help."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tdr.cli import app

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(folder: Path) -> dict[str, set[str]]:
    """Module names each file of ``folder`` imports (absolute, or relative resolved against tdr)."""
    found = {}
    for path in folder.rglob("*.py"):
        names = set()
        package = ["tdr", *path.relative_to(ROOT).with_suffix("").parts[:-1]]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    names.add(".".join(base + ([node.module] if node.module else [])))
                else:
                    names.add(node.module or "")
        found[str(path.relative_to(ROOT))] = names
    return found


def test_guided_never_imports_diffusers_or_pipeline():
    for path, names in imported_modules(ROOT / "guided").items():
        bad = {n for n in names if n.split(".")[0] == "diffusers" or n.startswith("tdr.pipeline")}
        assert not bad, f"{path} imports {bad}"


def test_pipeline_never_imports_guided():
    for path, names in imported_modules(ROOT / "pipeline").items():
        assert not {n for n in names if n.startswith("tdr.guided")}, path


def test_runs_imports_neither_half_nor_the_cli_libraries():
    """tdr.runs is shared by both trainers: it imports neither half, nor diffusers, typer or rich."""
    for path, names in imported_modules(ROOT / "runs").items():
        bad = {n for n in names if n.split(".")[0] in ("diffusers", "typer", "rich")
               or n.startswith(("tdr.pipeline", "tdr.guided", "tdr.cli"))}
        assert not bad, f"{path} imports {bad}"
    code = ("import sys, tdr.runs; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('diffusers', 'typer', 'rich') or m.startswith(('tdr.pipeline', 'tdr.guided'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_training_process_never_loads_diffusers():
    code = ("import sys, tdr.guided.train, tdr.guided.evaluate, tdr.guided.data, tdr.cache.ingest;"
            "print('diffusers' in sys.modules, 'tdr.pipeline' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_dockerfile_structure():
    text = (ROOT / "Dockerfile").read_text()
    lines = [l for l in text.splitlines() if l.strip() and not l.lstrip().startswith("#")]
    assert re.match(r"FROM nvidia/cuda:[\w.\-]+-runtime", lines[0])
    assert any("download.pytorch.org/whl/cu" in l for l in lines), "CUDA build of torch"
    assert re.search(r'pip install "\.\[gpu,remote\]"', text)
    assert 'ENTRYPOINT ["tdr"]' in lines
    root_modules = sorted(p.name for p in ROOT.glob("*.py"))  # the tdr package's own modules (errors.py, …)
    for copied in ("pyproject.toml", *root_modules, "cache", "pipeline", "guided", "runs"):
        assert any(l.startswith("COPY") and copied in l for l in lines), copied


def _commands(group, prefix=()):
    import typer.main

    click_group = typer.main.get_command(group)
    for name, cmd in click_group.commands.items():
        if hasattr(cmd, "commands"):
            for sub in cmd.commands:
                yield (*prefix, name, sub)
        else:
            yield (*prefix, name)


@pytest.mark.parametrize("command", list(_commands(app)), ids=" ".join)
def test_every_command_help_has_summary_and_example(command):
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Example: tdr " in result.output


def test_test_extra_pins_the_aws_stack_together_and_ci_installs_like_the_readme():
    """A bare boto3 beside s3fs made pip 23.2 (Python 3.11's) backtrack for 15 minutes: the newest boto3
    needs a botocore newer than aiobotocore allows. The three are bounded together; CI installs with the
    venv's own pip, exactly the README's second command."""
    import tomllib

    from packaging.requirements import Requirement

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    reqs = {Requirement(r).name: Requirement(r) for r in extra}
    for name in ("boto3", "aiobotocore", "s3fs"):
        assert name in reqs and any(s.operator == "<" for s in reqs[name].specifier), reqs.get(name)
    readme = (ROOT / "README.md").read_text()
    command = 'pip install torch==2.13.0 -e ".[test]" && python -m pytest'
    ci = (ROOT / ".ci" / "run").read_text()
    assert command in readme and command in ci.replace("pip install -q ", "pip install ")
    assert "--upgrade pip" not in ci
