"""The textual stages through the CLI: train-mapper → train-cleaner → generate-guidance → cache info."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from tdr.cli import app
from tdr.pipeline.fingerprints import file_sha256

runner = CliRunner()
FAST = ["--preset", "tiny", "--size", "64", "--batch-size", "2", "--accum", "1", "--lr", "1e-3",
        "--val-every", "5", "--val-steps", "2", "--save-every", "0", "--workers", "1"]


def test_mapper_then_cleaner_then_guidance_names_both_checkpoints(tmp_path):
    m, c, s = tmp_path / "M", tmp_path / "C", str(tmp_path / "S.zarr")
    r = runner.invoke(app, ["train-mapper", "--dataset", "demo", "--steps", "10", "--out", str(m), *FAST])
    assert r.exit_code == 0, r.output
    assert (m / "last.pt").is_file() and (m / "val_10.png").is_file()
    assert (m / "pretrained" / "config.json").is_file() and (m / "pretrained" / "model.safetensors").is_file()
    # the cleaner's frozen mapper from the shareable folder layout (same weights as last.pt)
    r = runner.invoke(app, ["train-cleaner", "--dataset", "demo", "--mapper", str(m / "pretrained"), "--steps", "10",
                            "--out", str(c), *FAST])
    assert r.exit_code == 0, r.output
    assert (c / "pretrained" / "model.safetensors").is_file()
    r = runner.invoke(app, ["generate-guidance", "--dataset", "demo", "--preset", "tiny", "--mapper", str(m / "last.pt"),
                            "--cleaner", str(c / "last.pt"), "--store", s, "--steps", "2", "--size", "64",
                            "--split", "test", "--limit", "3"])
    assert r.exit_code == 0, r.output
    facts = json.loads(runner.invoke(app, ["cache", "info", s, "--json"]).output)
    (group,) = facts["guidance"].values()
    assert group["fingerprint"]["mapper"] == file_sha256(m / "last.pt")
    assert group["fingerprint"]["cleaner"] == file_sha256(c / "last.pt")
    text = runner.invoke(app, ["cache", "info", s]).output
    assert file_sha256(m / "last.pt")[:12] in text and file_sha256(c / "last.pt")[:12] in text


def test_cleaner_requires_mapper_and_mapper_refuses_cleaner_options(tmp_path):
    r = runner.invoke(app, ["train-cleaner", "--dataset", "demo", "--steps", "1", "--out", str(tmp_path / "C"), *FAST])
    assert r.exit_code == 1 and "mapper" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["train-mapper", "--dataset", "demo", "--mapper", "x.pt", "--out", str(tmp_path / "M"), *FAST])
    assert r.exit_code == 2
