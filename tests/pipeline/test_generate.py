"""Guidance generation end to end with tiny models, through `tdr generate-guidance` and through the library
call it wraps (``tdr.pipeline.generate_guidance``): fill, skip, determinism, kill and resume, errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image
from typer.testing import CliRunner

import pytest

from tdr.cache import open_store
from tdr.errors import ModelNotFoundError
from tdr.cli import app
from tdr.pipeline import GuidancePipeline, ModelSpec, SamplingSettings, generate_guidance, load_components
from tdr.pipeline.settings import SettingsError
from helpers import run

runner = CliRunner()
TINY = ["--preset", "tiny", "--steps", "2", "--size", "64", "--device", "cpu", "--dataset", "demo", "--split", "test"]



def test_fill_then_nothing_to_do(tmp_path):
    store = str(tmp_path / "s.zarr")
    first = run("generate-guidance", *TINY, "--store", store, "--batch-size", "4")
    assert "12" in first.output
    facts = json.loads(run("cache", "info", store, "--json").output)
    (group,) = facts["guidance"].values()
    assert group["splits"]["test"] == {"done": 12, "missing": 0}
    assert group["fingerprint"]["preset"] == "tiny" and group["fingerprint"]["steps"] == 2
    again = run("generate-guidance", *TINY, "--store", store)
    assert "Nothing to do" in again.output
    assert "ok:" in run("cache", "verify", store).output


def test_batch_size_does_not_change_guidance(tmp_path):
    a, b = str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")
    run("generate-guidance", *TINY, "--store", a, "--batch-size", "1")
    run("generate-guidance", *TINY, "--store", b, "--batch-size", "3")
    run("cache", "export", a, "--to", str(tmp_path / "ea"))
    run("cache", "export", b, "--to", str(tmp_path / "eb"))
    files = sorted(p.relative_to(tmp_path / "ea") for p in (tmp_path / "ea").rglob("*.png"))
    assert len(files) == 12
    for rel in files:
        x = np.asarray(Image.open(tmp_path / "ea" / rel))
        y = np.asarray(Image.open(tmp_path / "eb" / rel))
        np.testing.assert_array_equal(x, y)
    # and different images really do get different guidance
    first = np.asarray(Image.open(tmp_path / "ea" / files[0]))
    assert any(not np.array_equal(first, np.asarray(Image.open(tmp_path / "ea" / f))) for f in files[1:])


def test_other_settings_refused_then_forced(tmp_path):
    store = str(tmp_path / "s.zarr")
    run("generate-guidance", *TINY, "--store", store, "--limit", "2")
    result = run("generate-guidance", *TINY, "--store", store, "--seed", "1", "--limit", "2", code=1)
    assert "seed 0 → 1" in result.output and "--force" in result.output
    run("generate-guidance", *TINY, "--store", store, "--seed", "1", "--limit", "2", "--force")
    assert len(open_store(store).guidance_ids()) == 2


def test_sigkill_midway_then_rerun_completes(tmp_path):
    store = str(tmp_path / "s.zarr")
    run("cache", "ingest", "--dataset", "demo", "--split", "test", "--store", store)
    cmd = [sys.executable, "-c", "from tdr.cli import main; main()", "generate-guidance", *TINY,
           "--store", store, "--batch-size", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        gids = open_store(store).guidance_ids()
        if gids:
            done = int(open_store(store).guidance(gids[0]).done("test", check=False).sum())
            if done >= 3:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 3 <= done < 12, f"process finished before it could be killed ({done} done)"
    partial = int(open_store(store).guidance().done("test").sum())
    assert partial < 12
    result = run("generate-guidance", *TINY, "--store", store)
    assert f"{partial}" in result.output  # the finished images were skipped, not redone
    assert "ok:" in run("cache", "verify", store).output


def test_missing_models_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = run("generate-guidance", "--dataset", "demo", "--store", str(tmp_path / "s.zarr"), "--device", "cpu", code=1)
    text = result.output
    assert "stabilityai/stable-diffusion-2-1-base" in text and "--sd-model" in text
    assert "CLIP-ViT-H-14" in text and "--clip-model" in text
    assert "Traceback" not in text
    assert not (tmp_path / "s.zarr").exists()  # nothing was written before the models were found


def test_bad_options_exit_2(tmp_path):
    result = runner.invoke(app, ["generate-guidance", *TINY, "--store", str(tmp_path / "s"), "--layout", "diagonal"])
    assert result.exit_code == 2


def test_tiny_preset_defaults_to_a_small_guidance_side(tmp_path):
    """At 512² the tiny UNet's self-attention over 64² latent tokens cost ~10 s/image on a CPU; without
    --size the tiny preset makes 64² guidance (the real models keep 512²)."""
    store = str(tmp_path / "s.zarr")
    run("generate-guidance", "--preset", "tiny", "--steps", "1", "--device", "cpu", "--dataset", "demo",
        "--split", "test", "--store", store, "--limit", "2")
    gs = open_store(store).guidance()
    assert gs.size == 64 and gs.read("test", 0).shape == (64, 64, 3)


TINY_SPEC = ModelSpec(preset="tiny", device="cpu")


def test_library_call_fills_store_with_what_the_pipeline_makes(tmp_path):
    """One library call ingests, samples and writes; each stored image equals the pipeline's output for that
    image with noise from its content hash, at the tiny preset's own size; progress comes as events."""
    store = str(tmp_path / "s.zarr")
    events: list[dict] = []
    summary = generate_guidance(store, "demo", TINY_SPEC, SamplingSettings(steps=2), splits=["test"], limit=3,
                                batch_size=2, progress=events.append)
    assert (summary.done, summary.sampled, summary.splits, summary.failed) == (3, 3, ["test"], [])
    kinds = [e["event"] for e in events]
    assert kinds[0] == "ingest" and "plan" in kinds and kinds[-1] == "batch"
    assert events[-1]["done"] == events[-1]["total"] == 3
    st = open_store(store)
    gs = st.guidance(summary.group)
    assert gs.size == 64 and gs.fingerprint["steps"] == 2 and list(np.flatnonzero(gs.done("test"))) == [0, 1, 2]
    pipe = GuidancePipeline(load_components(preset="tiny"))
    view = st["test"]
    for i in range(3):
        expected = pipe([view.read_lq(i)], [view.lq_sha(i).tobytes().hex()], steps=2)
        np.testing.assert_array_equal(gs.read("test", i), expected[0])
    again = generate_guidance(store, "demo", TINY_SPEC, SamplingSettings(steps=2), splits=["test"], limit=2)
    assert (again.group, again.done, again.skipped) == (summary.group, 2, 3)  # resumed: the first 3 skipped


def test_library_refuses_bad_settings_before_touching_the_store(tmp_path, monkeypatch):
    store = tmp_path / "s.zarr"
    with pytest.raises(SettingsError, match="cleaner"):
        ModelSpec(preset="tiny", source="mapper-only", cleaner="c.pt")
    with pytest.raises(SettingsError, match="caption_model"):
        ModelSpec(caption_model="x/y")
    with pytest.raises(SettingsError, match="layout"):
        SamplingSettings(layout="diagonal")
    with pytest.raises(SettingsError, match="dtype"):
        ModelSpec(dtype="fp8")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SettingsError, match="device 'cuda'"):
        generate_guidance(str(store), "demo", ModelSpec(preset="tiny", device="cuda"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError, match="stable-diffusion-2-1-base"):
        generate_guidance(str(store), "demo", ModelSpec(device="cpu"))
    assert not store.exists()
