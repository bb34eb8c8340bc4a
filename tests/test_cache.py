"""The guidance store: layout, crops, shared clean images, guidance done-ness, fingerprints, verify."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tdr.cache import FingerprintMismatch, StoreError, create_store, open_store
from tdr.cache.errors import DatasetError
from tdr.cache.ingest import ingest_split
from tdr.cache.report import info, verify
from tdr.cache.transfer import export_guidance, import_guidance


@dataclass(frozen=True)
class ArrayRef:
    key: str
    array: np.ndarray

    def load(self) -> np.ndarray:
        return self.array


@dataclass(frozen=True)
class FakePair:
    id: str
    lq: ArrayRef
    gt: ArrayRef | None
    gt_key: str


def make_pairs(n=6, shared=3, seed=0):
    """n degraded images of varied sizes, sharing ``shared`` clean images (like SOTS/DDN)."""
    rng = np.random.default_rng(seed)
    clean = [rng.integers(0, 256, (150 + 37 * k, 290 - 41 * k, 3), dtype=np.uint8) for k in range(shared)]
    pairs = []
    for i in range(n):
        g = clean[i % shared]
        lq = np.clip(g.astype(int) + rng.integers(-20, 20, g.shape), 0, 255).astype(np.uint8)
        pairs.append(FakePair(f"scene{i % shared}/img{i}", ArrayRef(f"lq{i}", lq), ArrayRef(f"gt{i % shared}", g), f"gt{i % shared}"))
    return pairs, clean


@pytest.fixture
def store_url(tmp_path):
    pairs, _ = make_pairs()
    st = create_store(str(tmp_path / "s.zarr"), dataset="fake", metric={"y_channel": False})
    ingest_split(st, "train", pairs)
    return str(tmp_path / "s.zarr")


def test_roundtrip_crops_and_shared_clean(store_url):
    pairs, clean = make_pairs()
    sp = open_store(store_url)["train"]
    assert sp.ids == [p.id for p in pairs]
    assert len(sp.gt_keys) == 3 and list(sp.gt_index) == [0, 1, 2, 0, 1, 2]
    for i, p in enumerate(pairs):
        assert sp.lq_size(i) == p.lq.array.shape[:2]
        np.testing.assert_array_equal(sp.read_lq(i), p.lq.array)
        np.testing.assert_array_equal(sp.read_gt(i), clean[i % 3])
    np.testing.assert_array_equal(sp.read_lq(4, (17, 33, 64, 80)), pairs[4].lq.array[17:81, 33:113])
    with pytest.raises(ValueError):
        sp.read_lq(0, (100, 0, 100, 10))


def test_clean_image_stored_once(store_url):
    files = sorted(p.relative_to(store_url).as_posix() for p in Path(store_url, "train", "gt", "c").rglob("*") if p.is_file())
    assert len(files) == 3  # one shard per unique clean image


def test_guidance_done_is_chunk_existence_plus_checksum(store_url):
    st = open_store(store_url, "a")
    gs = st.guidance_for({"steps": 4, "seed": 0})
    assert not gs.done("train").any()
    gs.write("train", 1, np.full((512, 512, 3), 9, np.uint8))
    gs.write("train", 4, np.zeros((512, 512, 3), np.uint8))  # an all-fill image still counts as done
    assert list(np.flatnonzero(gs.done("train"))) == [1, 4]
    np.testing.assert_array_equal(open_store(store_url).guidance().read("train", 1), np.full((512, 512, 3), 9, np.uint8))
    with pytest.raises(StoreError, match="missing"):
        open_store(store_url).guidance().read("train", 0)
    with pytest.raises(ValueError):
        gs.write("train", 0, np.zeros((256, 256, 3), np.uint8))


def test_fingerprint_mismatch_refused_unless_forced(store_url):
    st = open_store(store_url, "a")
    first = st.guidance_for({"steps": 4, "seed": 0})
    first.write("train", 0, np.ones((512, 512, 3), np.uint8))
    with pytest.raises(FingerprintMismatch, match=r"steps 4 → 200.*--force"):
        st.guidance_for({"steps": 200, "seed": 0})
    assert st.guidance_ids() == [first.id]
    second = st.guidance_for({"steps": 200, "seed": 0}, force=True)
    assert second.id != first.id and sorted(st.guidance_ids()) == sorted([first.id, second.id])
    assert open_store(store_url).guidance().id == second.id
    assert open_store(store_url).guidance(first.id).done("train")[0]
    assert st.guidance_for({"steps": 4, "seed": 0}).id == first.id  # same settings → same group


def test_info_counts(store_url):
    st = open_store(store_url, "a")
    gs = st.guidance_for({"steps": 4})
    for i in (0, 2, 5):
        gs.write("train", i, np.zeros((512, 512, 3), np.uint8))
    facts = info(open_store(store_url))
    assert facts["splits"]["train"]["images"] == 6 and facts["splits"]["train"]["clean_images"] == 3
    assert facts["guidance"][gs.id]["splits"]["train"] == {"done": 3, "missing": 3}
    assert facts["guidance"][gs.id]["fingerprint"]["steps"] == 4
    assert facts["bytes"] > facts["splits"]["train"]["bytes"] > 0


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("part", ["lq", "gt", "guidance"])
def test_verify_names_the_corrupted_image(store_url, part):
    st = open_store(store_url, "a")
    gs = st.guidance_for({"steps": 4})
    rng = np.random.default_rng(1)
    for i in range(6):
        gs.write("train", i, rng.integers(0, 256, (512, 512, 3), dtype=np.uint8))
    assert verify(open_store(store_url)).ok
    if part == "guidance":
        chunk = Path(store_url, "guidance", gs.id, "train", "c", "3", "0", "0", "0")
        expect = "scene0/img3"
    else:
        chunk = Path(store_url, "train", part, "c", "2", "0", "0", "0")
        expect = "scene2/img2"
    _flip_byte(chunk, chunk.stat().st_size // 3)
    report = verify(open_store(store_url))
    assert not report.ok
    assert [p.image_id for p in report.problems] == [expect]
    assert "corrupt" in report.problems[0].what
    if part == "guidance":  # a corrupt chunk is not done, so generation redoes it
        assert not open_store(store_url).guidance().done("train")[3]


def test_lost_tile_detected(store_url):
    chunk = Path(store_url, "train", "lq", "c", "1", "0", "0", "0")
    chunk.unlink()
    report = verify(open_store(store_url))
    assert [p.image_id for p in report.problems] == ["scene1/img1"]


def test_failed_ingest_leaves_store_unchanged(tmp_path):
    url = str(tmp_path / "s.zarr")
    pairs, _ = make_pairs()
    st = create_store(url, dataset="fake", metric={})
    ingest_split(st, "train", pairs)
    before = {p: p.read_bytes() for p in Path(url).rglob("*") if p.is_file()}
    bad = list(pairs)
    bad[3] = FakePair("bad", ArrayRef("x", np.zeros((10, 10, 3), np.uint8)), pairs[0].gt, "gt0")
    with pytest.raises(DatasetError, match="Size mismatch for 'bad'"):
        ingest_split(open_store(url, "a"), "test", bad)
    after = {p: p.read_bytes() for p in Path(url).rglob("*") if p.is_file()}
    assert after == before
    assert open_store(url).splits == ["train"]


def test_open_errors(tmp_path):
    with pytest.raises(StoreError, match="No tdr store"):
        open_store(str(tmp_path / "nothing.zarr"))
    import zarr

    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["tdr_schema"] = 99
    with pytest.raises(StoreError, match="schema 99"):
        open_store(str(tmp_path / "other.zarr"))


def test_import_and_export_guidance(store_url, tmp_path):
    from PIL import Image

    folder = tmp_path / "paper_results"
    (folder / "scene1").mkdir(parents=True)
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    Image.fromarray(img).save(folder / "scene1" / "img1.png")          # nested id
    Image.fromarray(img[:256, :256]).save(folder / "scene2_img2.png")  # flattened id, resized on import
    st = open_store(store_url, "a")
    summary = import_guidance(st, "train", folder)
    assert summary.written == 2 and len(summary.missing) == 4
    gs = open_store(store_url).guidance()
    assert gs.fingerprint["kind"] == "imported"
    np.testing.assert_array_equal(gs.read("train", 1), img)
    assert gs.read("train", 2).shape == (512, 512, 3)
    out = export_guidance(open_store(store_url), tmp_path / "exported")
    assert out.written == 2
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "exported" / "train" / "scene1" / "img1.png")), img)
