"""Content addressing: equal degraded pixels are sampled once per fingerprint, across splits and stores;
``tdr cache merge``; claims between concurrent writers; storage options. A fake pipeline keeps it fast."""

from __future__ import annotations


import numpy as np
import pytest
from typer.testing import CliRunner

from tdr.cache import FingerprintMismatch, TdrError, create_store, open_store
from tdr.cache import claims
from tdr.cache.ingest import ingest_split
from tdr.cache.merge import merge
from tdr.cache.options import parse_storage_options
from tdr.cache.report import verify
from tdr.cli import app
from tdr.pipeline.generate import SamplingSettings, generate, guidance_fingerprint
from helpers import ArrayRef, FakePair

SETTINGS = SamplingSettings(steps=2, size=64)
MODEL_FP = {"preset": "fake", "seed": 0}


class FakePipe:
    """Guidance = a function of (seed, noise id) only, like the real pipeline; records every id sampled."""

    attention_backend = "fake"

    def __init__(self):
        self.sampled: list[str] = []

    def __call__(self, images, ids, *, steps, scale, seed, layout, size):
        self.sampled += list(ids)
        return np.stack([np.random.default_rng([seed, int(i[:12], 16)]).integers(0, 256, (size, size, 3), dtype=np.uint8)
                         for i in ids])


def image(k: int) -> np.ndarray:
    return np.random.default_rng(k).integers(0, 256, (40, 48, 3), dtype=np.uint8)


def make_store(path, split_contents: dict[str, list[int]], dataset="fake"):
    st = create_store(str(path), dataset=dataset, metric={"y_channel": False})
    for split, ks in split_contents.items():
        ingest_split(st, split, [FakePair(f"{split}-{n}", ArrayRef(f"{split}-{n}", image(k)), None, "") for n, k in enumerate(ks)])
    return open_store(str(path), "a")


def test_equal_pixels_sampled_once_across_splits(tmp_path):
    st = make_store(tmp_path / "s.zarr", {"a": [1, 2, 2, 3], "b": [3, 4, 1]})
    pipe = FakePipe()
    first = generate(st, ["a"], pipe, SETTINGS, MODEL_FP, batch_size=2)
    assert (first.done, first.sampled, first.copied) == (4, 3, 0)  # 2 appears twice: sampled once
    second = generate(st, ["b"], pipe, SETTINGS, MODEL_FP, batch_size=2)
    assert (second.done, second.sampled, second.copied) == (3, 1, 2)  # 3 and 1 known from split a
    assert len(pipe.sampled) == len(set(pipe.sampled)) == 4
    gs = st.guidance()
    np.testing.assert_array_equal(gs.read("a", 0), gs.read("b", 2))
    np.testing.assert_array_equal(gs.read("a", 1), gs.read("a", 2))
    assert not np.array_equal(gs.read("a", 0), gs.read("a", 1))
    assert gs.fingerprint["noise"] == "content-sha256"
    assert verify(open_store(str(tmp_path / "s.zarr"))).ok


def test_merge_copies_by_content_and_refuses_other_settings(tmp_path):
    src = make_store(tmp_path / "src.zarr", {"train": [1, 2, 3]}, dataset="one")
    dst = make_store(tmp_path / "dst.zarr", {"test": [3, 9, 1]}, dataset="two")
    generate(src, ["train"], FakePipe(), SETTINGS, MODEL_FP)
    summary = merge(src, dst)
    assert (summary.copied, summary.already, summary.missing) == (2, 0, 1)
    gs_src, gs_dst = src.guidance(), dst.guidance()
    assert gs_src.id == gs_dst.id
    np.testing.assert_array_equal(gs_src.read("train", 2), gs_dst.read("test", 0))
    # what merge left missing is generated, and equals what the source would have made for those pixels
    rest = generate(dst, ["test"], FakePipe(), SETTINGS, MODEL_FP)
    assert (rest.done, rest.sampled) == (1, 1)
    other = make_store(tmp_path / "other.zarr", {"test": [1]})
    generate(other, ["test"], FakePipe(), SamplingSettings(steps=3, size=64), MODEL_FP)
    with pytest.raises(FingerprintMismatch, match="steps 2 → 3|steps 3 → 2"):
        merge(src, other)
    result = CliRunner().invoke(app, ["cache", "merge", str(tmp_path / "src.zarr"), str(tmp_path / "other.zarr")])
    assert result.exit_code == 1 and "only stores with equal fingerprints" in result.output
    assert "Traceback" not in result.output
    ok = CliRunner().invoke(app, ["cache", "merge", str(tmp_path / "src.zarr"), str(tmp_path / "dst.zarr")])
    assert ok.exit_code == 0 and "already present 3" in ok.output


def test_claims_defer_but_never_lose_work(tmp_path):
    st = make_store(tmp_path / "s.zarr", {"a": [1, 2, 3, 4]})
    gs = st.guidance_for(guidance_fingerprint(MODEL_FP, SETTINGS), size=64)
    gs.array("a", create=True)
    claims.claim(gs, [("a", 1), ("a", 2)], "a-dead-writer")  # left behind by a killed process
    assert claims.claimed_by_others(gs, [("a", 0), ("a", 1)], "me") == [False, True]
    pipe = FakePipe()
    summary = generate(st, ["a"], pipe, SETTINGS, MODEL_FP, batch_size=1)
    assert summary.done == 4 and len(pipe.sampled) == 4
    shas = st["a"].lq_sha()
    assert set(pipe.sampled[-2:]) == {bytes(shas[1]).hex(), bytes(shas[2]).hex()}  # the claimed ones came last
    assert gs.done("a").all() and claims.exists(gs, [("a", 3)]) == [True]
    assert verify(open_store(str(tmp_path / "s.zarr"))).ok


def test_storage_options_from_cli_and_env():
    env = {"TDR_STORAGE_OPTIONS": '{"anon": false, "client_kwargs": {"region_name": "x"}}'}
    opts = parse_storage_options(["endpoint_url=http://127.0.0.1:9", "client_kwargs.verify=false", "retries=3"], env)
    assert opts == {"anon": False, "endpoint_url": "http://127.0.0.1:9", "retries": 3,
                    "client_kwargs": {"region_name": "x", "verify": False}}
    assert parse_storage_options([], {}) is None
    with pytest.raises(TdrError, match="KEY=VALUE"):
        parse_storage_options(["novalue"], {})
    with pytest.raises(TdrError, match="JSON object"):
        parse_storage_options([], {"TDR_STORAGE_OPTIONS": "[1]"})
