"""The guidance store: layout, crops, shared clean images, guidance done-ness, fingerprints, verify."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tdr.cache import FingerprintMismatch, StoreError, create_store, open_store
from tdr.errors import DatasetError, StoreNotFoundError
from tdr.cache.ingest import ingest_split
from tdr.cache.report import info, verify
from tdr.cache.transfer import export_guidance, import_guidance
from helpers import ArrayRef, FakePair


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
    with pytest.raises(FingerprintMismatch, match=r"steps 4 → 200.*pass force") as refused:
        st.guidance_for({"steps": 200, "seed": 0})
    assert refused.value.param == "force"  # the CLI names its option from it
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
    with pytest.raises(StoreNotFoundError, match="No tdr store"):
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


# -- issue 14: exact-id import, damaged chunks, re-ingest, concurrency, sizes --------------------------
def _folder_dataset(root: Path, n: int = 3, size=(40, 48), dtype=np.uint8, seed=0) -> Path:
    """A `folder` dataset: root/{train,test}/{lq,gt}/imK.png of random pixels."""
    from tdr.cache.images import write_png

    rng = np.random.default_rng(seed)
    top = 65535 if dtype == np.uint16 else 255
    for split in ("train", "test"):
        for k in range(n):
            for side in ("lq", "gt"):
                write_png(root / split / side / f"im{k}.png", rng.integers(0, top, (*size, 3)).astype(dtype))
    return root


def test_import_matches_exact_ids_only_and_reports_unused(store_url, tmp_path):
    from PIL import Image

    folder = tmp_path / "guid"
    (folder / "scene1").mkdir(parents=True)
    rng = np.random.default_rng(4)
    a, b, c = (rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3))
    Image.fromarray(a).save(folder / "img0.png")             # bare name of 'scene0/img0': must not match it
    Image.fromarray(b).save(folder / "scene1" / "img1.png")  # nested id
    Image.fromarray(c).save(folder / "scene2_img2.png")      # flat id
    Image.fromarray(c).save(folder / "notes.png")            # matches nothing
    summary = import_guidance(open_store(store_url, "a"), "train", folder)
    assert summary.written == 2
    assert summary.missing == ["scene0/img0", "scene0/img3", "scene1/img4", "scene2/img5"]
    assert summary.unused == ["img0.png", "notes.png"]
    assert open_store(store_url).guidance().done("train").tolist() == [False, True, True, False, False, False]


def test_import_refuses_ambiguous_files(store_url, tmp_path):
    from PIL import Image

    folder = tmp_path / "guid"
    (folder / "scene1").mkdir(parents=True)
    img = np.zeros((8, 8, 3), np.uint8)
    Image.fromarray(img).save(folder / "scene1" / "img1.png")
    Image.fromarray(img).save(folder / "scene1_img1.jpg")
    with pytest.raises(StoreError, match="'scene1/img1' matches several files"):
        import_guidance(open_store(store_url, "a"), "train", folder)
    assert open_store(store_url).guidance_ids() == []  # nothing written


@pytest.mark.parametrize("damage", ["delete", "corrupt"])
@pytest.mark.parametrize("part", ["lq", "gt"])
def test_damaged_image_chunk_is_an_error_not_zeros(store_url, part, damage):
    from tdr.cache import DataIntegrityError

    shard = Path(store_url, "train", part, "c", "1", "0", "0", "0")
    if damage == "delete":
        shard.unlink()
    else:
        _flip_byte(shard, shard.stat().st_size // 3)
    sp = open_store(store_url)["train"]
    for read in (lambda: sp.read_lq(1) if part == "lq" else sp.read_gt(1),
                 lambda: sp.read_lq(1, (0, 0, 16, 16)) if part == "lq" else sp.read_gt(1, (0, 0, 16, 16))):
        with pytest.raises(DataIntegrityError) as exc:
            read()
        text = str(exc.value)
        assert "'scene1/img1'" in text and "split 'train'" in text and "tdr cache ingest --repair" in text
        assert "\n" not in text and "b'" not in text
    sp.read_lq(0)  # the others still read


def test_all_black_image_is_not_missing(tmp_path):
    url = str(tmp_path / "s.zarr")
    st = create_store(url, dataset="fake", metric={})
    black = np.zeros((20, 30, 3), np.uint8)
    ingest_split(st, "train", [FakePair("black", ArrayRef("b", black), None, "")])
    np.testing.assert_array_equal(open_store(url)["train"].read_lq(0), black)


def test_reingest_detects_changed_pixels_and_repairs_damage(tmp_path):
    from tdr.cache import DataIntegrityError
    from tdr.cache.images import read_image, write_png
    from tdr.cache.ingest import ingest

    root = _folder_dataset(tmp_path / "data")
    url = str(tmp_path / "s.zarr")
    ingest("folder", str(root), url)
    assert [s.status for s in ingest("folder", str(root), url).splits] == ["present", "present"]
    shard = Path(url, "test", "lq", "c", "1", "0", "0", "0")
    shard.unlink()
    with pytest.raises(DataIntegrityError, match="again with repair"):
        ingest("folder", str(root), url)
    summary = ingest("folder", str(root), url, repair=True)
    assert {s.split: (s.status, s.repaired) for s in summary.splits} == {"train": ("present", 0),
                                                                         "test": ("repaired", 1)}
    np.testing.assert_array_equal(open_store(url)["test"].read_lq(1), read_image(root / "test" / "lq" / "im1.png"))
    assert verify(open_store(url)).ok
    changed = read_image(root / "train" / "gt" / "im2.png").copy()
    changed[0, 0] ^= 1
    write_png(root / "train" / "gt" / "im2.png", changed)
    before = {p: p.read_bytes() for p in Path(url).rglob("*") if p.is_file()}
    with pytest.raises(StoreError, match="clean image 'im2' of split 'train' has other pixels"):
        ingest("folder", str(root), url, repair=True)
    assert {p: p.read_bytes() for p in Path(url).rglob("*") if p.is_file()} == before


def test_ingest_refuses_images_too_small_for_the_metrics(tmp_path):
    from tdr.cache.ingest import ingest

    root = _folder_dataset(tmp_path / "data", size=(10, 40))
    with pytest.raises(DatasetError, match=r"40×10 pixels.*at least 11×11"):
        ingest("folder", str(root), str(tmp_path / "s.zarr"))


def test_mixed_bit_depths_are_reported_in_words(tmp_path):
    from tdr.cache.images import write_png
    from tdr.cache.ingest import ingest

    root = _folder_dataset(tmp_path / "data")
    for side in ("lq", "gt"):
        write_png(root / "train" / side / "im2.png", np.full((40, 48, 3), 300, np.uint16))
    with pytest.raises(DatasetError) as exc:
        ingest("folder", str(root), str(tmp_path / "s.zarr"), splits=["train"])
    assert "is 16-bit but the first image of split 'train' is 8-bit" in str(exc.value)
    assert "np." not in str(exc.value) and "uint" not in str(exc.value)


def test_unfinished_split_is_named_by_info_and_verify(store_url):
    pairs, _ = make_pairs()

    class Broken:
        calls = 0

        def load(self):  # the size probe reads it; the write then stops like a kill mid-split
            Broken.calls += 1
            if Broken.calls > 1:
                raise KeyboardInterrupt
            return pairs[4].lq.array

    bad = list(pairs)
    bad[4] = FakePair(pairs[4].id, Broken(), pairs[4].gt, pairs[4].gt_key)
    with pytest.raises(KeyboardInterrupt):
        ingest_split(open_store(store_url, "a"), "test", bad)
    st = open_store(store_url)
    assert st.splits == ["train"] and info(st)["unfinished_splits"] == ["test"]
    report = verify(st)
    assert [(p.split, p.part) for p in report.problems] == [("test", "split")]
    assert "never finished" in str(report.problems[0])
    ingest_split(open_store(store_url, "a"), "test", pairs)  # the next ingest finishes it
    assert open_store(store_url).splits == ["test", "train"] and verify(open_store(store_url)).ok


def test_losing_a_create_race_opens_the_winners_store(tmp_path, monkeypatch):
    import tdr.cache.store as store_mod

    url = str(tmp_path / "s.zarr")
    first = create_store(url, dataset="fake", metric={})
    real, calls = store_mod.open_store, []

    def checked_too_early(*args, **kw):  # the loser looked before the winner had created the store
        calls.append(args)
        if len(calls) == 1:
            raise StoreNotFoundError(f"No tdr store at {url}.")
        return real(*args, **kw)

    monkeypatch.setattr(store_mod, "open_store", checked_too_early)
    second = create_store(url, dataset="fake", metric={})
    assert len(calls) == 2 and second.dataset == first.dataset == "fake"
    pairs, _ = make_pairs()
    ingest_split(first, "train", pairs)
    ingest_split(second, "train", pairs)  # a concurrent ingest of the same split finds it complete
    assert open_store(url)["train"].ids == [p.id for p in pairs] and verify(open_store(url)).ok


def test_captions_are_listed_and_edited_through_the_library(store_url, tmp_path):
    from tdr.cache import captions

    st = open_store(store_url, "a")
    gs = st.guidance_for({"source": "caption"})
    with pytest.raises(StoreError, match="has no captions") as none_yet:
        captions.list_captions(st)
    assert none_yet.value.param == "group"
    for i in range(2):
        captions.write(gs, "train", i, {"raw": f"raw {i}", "prompt": f"prompt {i}", "edited": False})
        gs.write("train", i, np.full((512, 512, 3), i, np.uint8))
    listed = captions.list_captions(st, gs.id, ["train"])
    assert [(r["id"], r["prompt"]) for r in listed] == [(st["train"].ids[0], "prompt 0"), (st["train"].ids[1], "prompt 1")]
    edits = tmp_path / "captions.jsonl"
    captions.write_jsonl([dict(listed[0], prompt="a new prompt"), listed[1]], edits)
    summary = captions.import_edits(st, [edits], splits=["test"])  # no record of that split: nothing changes
    assert (summary.changed, summary.unchanged, summary.group) == ([], 0, gs.id)
    summary = captions.import_edits(st, [edits], group=gs.id)
    assert summary.changed == [f"train/{st['train'].ids[0]}"] and summary.unchanged == 1
    assert captions.read(gs, "train", 0)["prompt"] == "a new prompt" and not gs.done("train")[0]
