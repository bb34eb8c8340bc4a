"""tdr.cache.datasets: every adapter on a tiny tree in its real layout(s), pairing rules and errors."""

import hashlib

import numpy as np
import pytest
import scipy.io
from PIL import Image

from tdr.cache.datasets import DATASETS, NOISE_CONVENTIONS, CheckReport, Pair, get_dataset, list_datasets
from tdr.cache.datasets import demo as demo_module
from tdr.errors import DatasetError, ImageReadError
from tdr.cache.images import read_image, write_png

# ------------------------------------------------------------------------------------------- helpers


def make_image(path, h=8, w=8, seed=None, dtype=np.uint8):
    """Write a small random image (PNG, JPG, BMP or TIF by suffix) and return its pixels."""
    seed = int.from_bytes(hashlib.md5(str(path).encode()).digest()[:4], "little") if seed is None else seed
    pixels = np.random.default_rng(seed).integers(0, np.iinfo(dtype).max + 1, (h, w, 3), dtype=dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        write_png(path, pixels)
    else:
        Image.fromarray(pixels).save(path)
    return pixels


def rel(ref, root):
    return ref.path.relative_to(root).as_posix()


def lq_gt(pairs, root):
    return [(p.id, rel(p.lq, root), rel(p.gt, root)) for p in pairs]


# ------------------------------------------------------------------------------------------- registry

EXPECTED_NAMES = {
    "gopro", "hide", "realblur-j", "realblur-r", "dpdd", "sots-indoor", "sots-outdoor", "its", "ots",
    "rain100l", "raintrainl", "rain200l", "rain200h", "did", "ddn", "sidd", "bsd400", "wed", "div2k",
    "flickr2k", "cbsd68", "kodak24", "mcmaster", "urban100", "set12", "bsd68", "folder", "demo",
}


def test_registry_holds_every_dataset():
    assert {ds.name for ds in list_datasets()} == EXPECTED_NAMES == set(DATASETS)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_dataset_descriptions(name):
    ds = get_dataset(name)
    assert ds.name == name and ds.title and ds.splits
    assert len(ds.layout.splitlines()) >= 2
    assert set(ds.metric) >= {"y_channel", "crop_border", "ssim"}
    assert ds.metric["ssim"] in ("basicsr", "matlab3d") and ds.metric["crop_border"] == 0
    assert ds.metric["y_channel"] == (name in {"rain100l", "raintrainl", "rain200l", "rain200h", "did", "ddn"})
    assert ds.needs_root == (name != "demo")
    assert set(ds.expected_counts) <= set(ds.splits)


def test_unknown_name_lists_choices():
    with pytest.raises(DatasetError) as info:
        get_dataset("gopr")
    message = str(info.value)
    assert "'gopr'" in message and "gopro" in message and "sots-indoor" in message and "demo" in message


def test_missing_root_and_unknown_split(tmp_path):
    with pytest.raises(DatasetError, match="needs root"):
        get_dataset("gopro").pairs(None, "test")
    with pytest.raises(DatasetError, match="does-not-exist"):
        get_dataset("gopro").pairs(tmp_path / "does-not-exist", "test")
    with pytest.raises(DatasetError, match="choose one of: train, test"):
        get_dataset("gopro").pairs(tmp_path, "val")


# ------------------------------------------------------------------------------------------- deblurring


def gopro_original(root):
    for split, scenes in (("train", ["GOPR0372_07_00", "GOPR0374_11_00"]), ("test", ["GOPR0384_11_00"])):
        for scene in scenes:
            for name in ("000001", "000002", "000010"):
                for folder in ("blur", "blur_gamma", "sharp"):
                    make_image(root / split / scene / folder / f"{name}.png")


def test_gopro_original_layout_uses_blur_not_blur_gamma(tmp_path):
    gopro_original(tmp_path)
    ds = get_dataset("gopro")
    test = ds.pairs(tmp_path, "test")
    assert lq_gt(test, tmp_path) == [
        (f"GOPR0384_11_00/{n}", f"test/GOPR0384_11_00/blur/{n}.png", f"test/GOPR0384_11_00/sharp/{n}.png")
        for n in ("000001", "000002", "000010")
    ]
    train = ds.pairs(tmp_path, "train")
    assert [p.id for p in train][:4] == [
        "GOPR0372_07_00/000001", "GOPR0372_07_00/000002", "GOPR0372_07_00/000010", "GOPR0374_11_00/000001"
    ]
    assert len({p.gt_key for p in train}) == 6 and train[0].degradation == "blur"
    assert train[0].gt_key == "train/GOPR0372_07_00/sharp/000001.png"
    np.testing.assert_array_equal(test[0].lq.load(), read_image(tmp_path / "test/GOPR0384_11_00/blur/000001.png"))
    assert test[0].lq.size() == (8, 8)
    report = ds.check(tmp_path)
    assert report.ok and report.counts == {"train": 6, "test": 3}
    assert report.expected == {"train": 2103, "test": 1111}
    assert any("2,103" in note for note in report.notes)  # count vs the published size is only a note


def test_gopro_repacked_layout(tmp_path):
    for split in ("train", "test"):
        for name in ("GOPR0384_11_00-000001", "GOPR0384_11_00-000002"):
            make_image(tmp_path / split / "input" / f"{name}.png")
            make_image(tmp_path / split / "target" / f"{name}.png")
    pairs = get_dataset("gopro").pairs(tmp_path, "test")
    assert lq_gt(pairs, tmp_path) == [
        ("GOPR0384_11_00-000001", "test/input/GOPR0384_11_00-000001.png", "test/target/GOPR0384_11_00-000001.png"),
        ("GOPR0384_11_00-000002", "test/input/GOPR0384_11_00-000002.png", "test/target/GOPR0384_11_00-000002.png"),
    ]


def test_unpaired_file_is_named_and_check_lists_all(tmp_path):
    gopro_original(tmp_path)
    (tmp_path / "test/GOPR0384_11_00/sharp/000002.png").unlink()
    (tmp_path / "train/GOPR0374_11_00/blur/000010.png").unlink()
    ds = get_dataset("gopro")
    with pytest.raises(DatasetError, match=r"test/GOPR0384_11_00/blur/000002\.png"):
        ds.pairs(tmp_path, "test")
    with pytest.raises(DatasetError, match=r"train/GOPR0374_11_00/sharp/000010\.png' has no matching degraded"):
        ds.pairs(tmp_path, "train")
    report = ds.check(tmp_path)
    assert isinstance(report, CheckReport) and not report.ok
    assert len(report.problems) == 2 and report.counts == {"train": 5, "test": 2}


def test_wrong_layout_names_the_folder(tmp_path):
    (tmp_path / "test" / "something").mkdir(parents=True)
    make_image(tmp_path / "test" / "loose.png")
    with pytest.raises(DatasetError, match=f"'{tmp_path / 'train'}' was not found"):
        get_dataset("gopro").pairs(tmp_path, "train")
    with pytest.raises(DatasetError, match=f"'{tmp_path / 'test'}' does not hold input/ and target/"):
        get_dataset("gopro").pairs(tmp_path, "test")
    make_image(tmp_path / "test/GOPR0384_11_00/blur/000001.png")
    with pytest.raises(DatasetError, match=r"GOPR0384_11_00' has no 'sharp/' folder"):
        get_dataset("gopro").pairs(tmp_path, "test")
    report = get_dataset("gopro").check(tmp_path)
    assert report.problems and any("train" in n for n in report.notes)  # absent split: a note beside test
    empty = tmp_path / "empty"
    empty.mkdir()
    report = get_dataset("gopro").check(empty)
    assert len(report.problems) == 2 and report.counts == {"train": 0, "test": 0}


def test_hide_original_and_repacked(tmp_path):
    orig = tmp_path / "orig"
    for name in ("1fromGOPR0950.png", "2fromGOPR1085.png"):
        make_image(orig / "test/test-close-ups" / name)
    make_image(orig / "test/test-long-shot/10fromGOPR1054.png")
    for name in ("1fromGOPR0950.png", "2fromGOPR1085.png", "10fromGOPR1054.png", "99fromTRAIN.png"):
        make_image(orig / "GT" / name)
    pairs = get_dataset("hide").pairs(orig, "test")
    assert lq_gt(pairs, orig) == [
        ("test-close-ups/1fromGOPR0950", "test/test-close-ups/1fromGOPR0950.png", "GT/1fromGOPR0950.png"),
        ("test-close-ups/2fromGOPR1085", "test/test-close-ups/2fromGOPR1085.png", "GT/2fromGOPR1085.png"),
        ("test-long-shot/10fromGOPR1054", "test/test-long-shot/10fromGOPR1054.png", "GT/10fromGOPR1054.png"),
    ]
    make_image(orig / "test/test-long-shot/11fromGOPR1054.png")
    with pytest.raises(DatasetError, match="11fromGOPR1054.png"):
        get_dataset("hide").pairs(orig, "test")
    repacked = tmp_path / "repacked"
    make_image(repacked / "test/HIDE/input/a.png")
    make_image(repacked / "test/HIDE/target/a.png")
    assert lq_gt(get_dataset("hide").pairs(repacked, "test"), repacked) == [
        ("a", "test/HIDE/input/a.png", "test/HIDE/target/a.png")
    ]


@pytest.mark.parametrize("variant", ["J", "R"])
def test_realblur_list_files(tmp_path, variant):
    top = f"RealBlur-{variant}_ECC_IMCORR_centroid_itensity_ref"
    lines = {"train": [], "test": []}
    for split, scene in (("train", "scene001"), ("train", "scene002"), ("test", "scene230")):
        for k in (1, 2):
            make_image(tmp_path / top / scene / "blur" / f"blur_{k}.png")
            make_image(tmp_path / top / scene / "gt" / f"gt_{k}.png")
            lines[split].append(f"{top}/{scene}/gt/gt_{k}.png {top}/{scene}/blur/blur_{k}.png")
    for split, content in lines.items():
        (tmp_path / f"RealBlur_{variant}_{split}_list.txt").write_text("\n".join(content) + "\n")
    ds = get_dataset(f"realblur-{variant.lower()}")
    assert ds.metric["align"] is True
    test = ds.pairs(tmp_path, "test")
    assert lq_gt(test, tmp_path) == [
        (f"scene230/blur/blur_{k}", f"{top}/scene230/blur/blur_{k}.png", f"{top}/scene230/gt/gt_{k}.png") for k in (1, 2)
    ]
    assert len(ds.pairs(tmp_path, "train")) == 4
    (tmp_path / top / "scene230/gt/gt_2.png").unlink()
    with pytest.raises(DatasetError, match="scene230/gt/gt_2.png"):
        ds.pairs(tmp_path, "test")
    (tmp_path / f"RealBlur_{variant}_train_list.txt").unlink()
    with pytest.raises(DatasetError, match=f"RealBlur_{variant}_train_list.txt"):
        ds.pairs(tmp_path, "train")


def test_dpdd_pairs_by_sorted_order_and_keeps_16_bits(tmp_path):
    sources = {}
    for n, (src, tgt) in enumerate([("1P0A1040", "1P0A1041"), ("1P0A1050", "1P0A1052"), ("1P0A1100", "1P0A1101")]):
        sources[src] = make_image(tmp_path / "test_c/source" / f"{src}.png", 6, 7, seed=n, dtype=np.uint16)
        make_image(tmp_path / "test_c/target" / f"{tgt}.png", 6, 7, seed=10 + n, dtype=np.uint16)
        make_image(tmp_path / "test_l/source" / f"{src}.png", 6, 7, seed=20 + n, dtype=np.uint16)  # ignored view
    pairs = get_dataset("dpdd").pairs(tmp_path, "test")
    assert lq_gt(pairs, tmp_path) == [
        ("1P0A1040", "test_c/source/1P0A1040.png", "test_c/target/1P0A1041.png"),
        ("1P0A1050", "test_c/source/1P0A1050.png", "test_c/target/1P0A1052.png"),
        ("1P0A1100", "test_c/source/1P0A1100.png", "test_c/target/1P0A1101.png"),
    ]
    loaded = pairs[1].lq.load()
    assert loaded.dtype == np.uint16
    np.testing.assert_array_equal(loaded, sources["1P0A1050"])
    make_image(tmp_path / "test_c/source/1P0A1200.png", 6, 7, dtype=np.uint16)
    with pytest.raises(DatasetError, match="1P0A1200.png"):
        get_dataset("dpdd").pairs(tmp_path, "test")
    with pytest.raises(DatasetError, match="train_c"):
        get_dataset("dpdd").pairs(tmp_path, "train")


# ------------------------------------------------------------------------------------------- dehazing


def test_sots_indoor_shared_gt_and_centre_crop(tmp_path):
    root = tmp_path / "SOTS"
    big_gt = make_image(root / "indoor/gt/1400.png", 24, 28)  # larger than its hazy images
    same_gt = make_image(root / "indoor/gt/1401.png", 20, 22)
    for j in (1, 2, 10):
        make_image(root / f"indoor/hazy/1400_{j}.png", 20, 22)
    make_image(root / "indoor/hazy/1401_1.png", 20, 22)
    pairs = get_dataset("sots-indoor").pairs(root, "test")  # a SOTS root: indoor/ is found
    assert [p.id for p in pairs] == ["1400_1", "1400_2", "1400_10", "1401_1"]
    assert [rel(p.gt, root) for p in pairs] == ["indoor/gt/1400.png"] * 3 + ["indoor/gt/1401.png"]
    assert pairs[0].gt_key == pairs[1].gt_key == pairs[2].gt_key != pairs[3].gt_key
    assert pairs[0].gt == pairs[2].gt  # identical refs, so the clean image is stored once
    gt = pairs[0].gt.load()
    assert gt.shape == (20, 22, 3) and pairs[0].gt.size() == (20, 22)
    np.testing.assert_array_equal(gt, big_gt[2:22, 3:25])
    np.testing.assert_array_equal(pairs[3].gt.load(), same_gt)
    report = get_dataset("sots-indoor").check(root / "indoor")
    assert report.ok and report.counts == {"test": 4} and any("500" in n for n in report.notes)


def test_sots_indoor_missing_clear_image(tmp_path):
    make_image(tmp_path / "gt/1400.png")
    make_image(tmp_path / "hazy/1400_1.png")
    make_image(tmp_path / "hazy/1402_3.png")
    with pytest.raises(DatasetError, match=r"1402_3\.png' has no clear image '1402"):
        get_dataset("sots-indoor").pairs(tmp_path, "test")
    with pytest.raises(DatasetError, match="hazy/ and gt/"):
        get_dataset("sots-indoor").pairs(tmp_path / "gt", "test")


def test_its_clear_folder_and_unused_clear_note(tmp_path):
    make_image(tmp_path / "clear/1.png")
    make_image(tmp_path / "clear/2.png")
    make_image(tmp_path / "clear/3.png")
    make_image(tmp_path / "hazy/1_1_0.90179.png")
    make_image(tmp_path / "hazy/1_2_0.97842.png")
    make_image(tmp_path / "hazy/2_1_0.80000.png")
    pairs = get_dataset("its").pairs(tmp_path, "train")
    assert lq_gt(pairs, tmp_path) == [
        ("1_1_0.90179", "hazy/1_1_0.90179.png", "clear/1.png"),
        ("1_2_0.97842", "hazy/1_2_0.97842.png", "clear/1.png"),
        ("2_1_0.80000", "hazy/2_1_0.80000.png", "clear/2.png"),
    ]
    assert pairs[0].lq.crop is None and pairs[0].gt.crop is None  # only SOTS-indoor crops
    report = get_dataset("its").check(tmp_path)
    assert report.ok and any("3.png" in n for n in report.notes)


def test_sots_outdoor_and_ots_jpg_names(tmp_path):
    sots = tmp_path / "sots"
    make_image(sots / "outdoor/gt/0005.png")
    make_image(sots / "outdoor/hazy/0005_0.8_0.04.jpg")
    make_image(sots / "outdoor/hazy/0005_0.9_0.2.jpg")
    pairs = get_dataset("sots-outdoor").pairs(sots, "test")
    assert lq_gt(pairs, sots) == [
        ("0005_0.8_0.04", "outdoor/hazy/0005_0.8_0.04.jpg", "outdoor/gt/0005.png"),
        ("0005_0.9_0.2", "outdoor/hazy/0005_0.9_0.2.jpg", "outdoor/gt/0005.png"),
    ]
    assert pairs[0].lq.load().shape == (8, 8, 3)
    ots = tmp_path / "ots"
    make_image(ots / "clear/0005.jpg")
    make_image(ots / "hazy/part1/0005_0.8_0.04.jpg")
    make_image(ots / "hazy/part2/0005_1_0.2.jpg")
    pairs = get_dataset("ots").pairs(ots, "train")
    assert [(p.id, rel(p.gt, ots)) for p in pairs] == [
        ("part1/0005_0.8_0.04", "clear/0005.jpg"), ("part2/0005_1_0.2", "clear/0005.jpg")
    ]
    assert pairs[0].gt_key == pairs[1].gt_key == "clear/0005.jpg"


# ------------------------------------------------------------------------------------------- deraining


def test_rain100l_flat_and_repacked(tmp_path):
    flat = tmp_path / "flat"
    for n in ("001", "002", "010"):
        make_image(flat / f"rain-{n}.png")
        make_image(flat / f"norain-{n}.png")
    pairs = get_dataset("rain100l").pairs(flat, "test")
    assert lq_gt(pairs, flat) == [(n, f"rain-{n}.png", f"norain-{n}.png") for n in ("001", "002", "010")]
    assert pairs[0].degradation == "rain"
    (flat / "norain-010.png").unlink()
    with pytest.raises(DatasetError, match=r"rain-010\.png"):
        get_dataset("rain100l").pairs(flat, "test")
    repacked = tmp_path / "repacked"
    make_image(repacked / "input/1.png")
    make_image(repacked / "target/1.png")
    assert lq_gt(get_dataset("rain100l").pairs(repacked, "test"), repacked) == [("1", "input/1.png", "target/1.png")]
    with pytest.raises(DatasetError, match="rain-NNN.png"):
        get_dataset("rain100l").pairs(tmp_path / "repacked" / "input", "test")


def test_raintrainl_ignores_region_and_streak_maps(tmp_path):
    for n in ("1", "2"):
        for prefix in ("rain", "norain", "rainregion", "rainstreak"):
            make_image(tmp_path / f"{prefix}-{n}.png")
    pairs = get_dataset("raintrainl").pairs(tmp_path, "train")
    assert lq_gt(pairs, tmp_path) == [("1", "rain-1.png", "norain-1.png"), ("2", "rain-2.png", "norain-2.png")]


@pytest.mark.parametrize("name", ["rain200l", "rain200h"])
def test_rain200_x2_and_repacked(tmp_path, name):
    for split in ("train", "test"):
        for n in (1, 2, 11):
            make_image(tmp_path / split / "rain/X2" / f"norain-{n}x2.png")
            make_image(tmp_path / split / "norain" / f"norain-{n}.png")
    pairs = get_dataset(name).pairs(tmp_path, "test")
    assert lq_gt(pairs, tmp_path) == [
        (f"norain-{n}", f"test/rain/X2/norain-{n}x2.png", f"test/norain/norain-{n}.png") for n in (1, 2, 11)
    ]
    make_image(tmp_path / "train/rain/X2/norain-5x2.png")
    with pytest.raises(DatasetError, match=r"norain-5x2\.png"):
        get_dataset(name).pairs(tmp_path, "train")
    repacked = tmp_path / "repacked"
    make_image(repacked / "train/input/7.png")
    make_image(repacked / "train/target/7.png")
    assert lq_gt(get_dataset(name).pairs(repacked, "train"), repacked) == [("7", "train/input/7.png", "train/target/7.png")]


def test_did_splits_each_image_into_halves(tmp_path):
    whole = make_image(tmp_path / "DID-Data/test/1.png", 6, 10)
    make_image(tmp_path / "DID-Data/test/2.png", 6, 11)  # odd width: both halves 5 wide
    make_image(tmp_path / "DID-Data/training/a/3.jpg", 6, 10)
    root = tmp_path / "DID-Data"
    pairs = get_dataset("did").pairs(root, "test")
    assert [p.id for p in pairs] == ["1", "2"]
    assert rel(pairs[0].lq, root) == rel(pairs[0].gt, root) == "test/1.png"
    np.testing.assert_array_equal(pairs[0].lq.load(), whole[:, :5])
    np.testing.assert_array_equal(pairs[0].gt.load(), whole[:, 5:])
    assert pairs[1].lq.load().shape == pairs[1].gt.load().shape == (6, 5, 3)
    assert pairs[1].lq.size() == pairs[1].gt.size() == (6, 5)
    assert pairs[0].gt_key != pairs[0].lq.key
    assert [p.id for p in get_dataset("did").pairs(root, "train")] == ["a/3"]


def test_ddn_splits_by_index_and_shares_clean_image(tmp_path):
    for i in (899, 900, 901):
        make_image(tmp_path / "ground_truth" / f"{i}.jpg")
        for j in (1, 2, 14):
            make_image(tmp_path / "rainy_image" / f"{i}_{j}.jpg")
    ds = get_dataset("ddn")
    train, test = ds.pairs(tmp_path, "train"), ds.pairs(tmp_path, "test")
    assert [p.id for p in train] == ["899_1", "899_2", "899_14", "900_1", "900_2", "900_14"]
    assert lq_gt(test, tmp_path) == [(f"901_{j}", f"rainy_image/901_{j}.jpg", "ground_truth/901.jpg") for j in (1, 2, 14)]
    assert len({p.gt_key for p in test}) == 1 and len({p.gt_key for p in train}) == 2
    make_image(tmp_path / "rainy_image" / "950_1.jpg")
    with pytest.raises(DatasetError, match=r"950_1\.jpg' has no clean image '950"):
        ds.pairs(tmp_path, "test")
    assert ds.pairs(tmp_path, "train")  # the other split is unaffected


# ------------------------------------------------------------------------------------------- denoising


def test_sidd_train_noisy_to_gt(tmp_path):
    data = tmp_path / "SIDD_Medium_Srgb/Data"
    for scene in ("0001_001_S6_00100_00060_3200_L", "0002_001_S6_00100_00020_3200_N"):
        for k in ("010", "011"):
            make_image(data / scene / f"{scene[:4]}_NOISY_SRGB_{k}.PNG".replace(".PNG", ".png"))
            make_image(data / scene / f"{scene[:4]}_GT_SRGB_{k}.png")
    pairs = get_dataset("sidd").pairs(tmp_path, "train")
    assert [p.id for p in pairs] == [
        "0001_001_S6_00100_00060_3200_L/0001_NOISY_SRGB_010", "0001_001_S6_00100_00060_3200_L/0001_NOISY_SRGB_011",
        "0002_001_S6_00100_00020_3200_N/0002_NOISY_SRGB_010", "0002_001_S6_00100_00020_3200_N/0002_NOISY_SRGB_011",
    ]
    assert pairs[0].gt.path.name == "0001_GT_SRGB_010.png"
    (data / "0002_001_S6_00100_00020_3200_N/0002_GT_SRGB_011.png").unlink()
    with pytest.raises(DatasetError, match="0002_NOISY_SRGB_011.png"):
        get_dataset("sidd").pairs(tmp_path, "train")


def test_sidd_validation_mat_blocks(tmp_path):
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (2, 3, 16, 16, 3), dtype=np.uint8)
    clean = rng.integers(0, 256, (2, 3, 16, 16, 3), dtype=np.uint8)
    scipy.io.savemat(tmp_path / "ValidationNoisyBlocksSrgb.mat", {"ValidationNoisyBlocksSrgb": noisy})
    scipy.io.savemat(tmp_path / "ValidationGtBlocksSrgb.mat", {"ValidationGtBlocksSrgb": clean})
    pairs = get_dataset("sidd").pairs(tmp_path, "test")
    assert [p.id for p in pairs] == [f"block{r:02d}_{c:02d}" for r in range(2) for c in range(3)]
    assert pairs[4].id == "block01_01" and pairs[4].gt_key == "ValidationGtBlocksSrgb.mat[1,1]"
    np.testing.assert_array_equal(pairs[4].lq.load(), noisy[1, 1])
    np.testing.assert_array_equal(pairs[4].gt.load(), clean[1, 1])
    assert pairs[4].lq.size() == (16, 16)
    (tmp_path / "ValidationGtBlocksSrgb.mat").unlink()
    with pytest.raises(DatasetError, match="ValidationGtBlocksSrgb.mat"):
        get_dataset("sidd").pairs(tmp_path, "test")


def test_gaussian_noise_is_deterministic_and_follows_the_convention(tmp_path):
    flat = np.full((64, 64, 3), 128, np.uint8)
    write_png(tmp_path / "a.png", flat)
    make_image(tmp_path / "sub/b.png")
    ds = get_dataset("cbsd68")
    assert ds.options() == {"sigma": 25.0, "noise": "promptir", "seed": 0}
    pairs = ds.pairs(tmp_path, "test")
    assert [p.id for p in pairs] == ["a", "sub/b"]
    assert pairs[0].gt_key == "a.png" and pairs[0].lq.key != pairs[0].gt.key
    np.testing.assert_array_equal(pairs[0].gt.load(), flat)
    first = pairs[0].lq.load()
    np.testing.assert_array_equal(get_dataset("cbsd68").pairs(tmp_path, "test")[0].lq.load(), first)
    assert abs(float(np.std(first.astype(float) - 128)) - 25) < 1.5
    # the promptir convention truncates after clipping, "round" rounds: same noise, values differ by ≤ 1
    rounded = ds.with_options(noise="round").pairs(tmp_path, "test")[0].lq.load()
    diff = rounded.astype(int) - first.astype(int)
    assert set(np.unique(diff)) <= {0, 1} and diff.mean() > 0.3
    # noise depends on (seed, id) only: another seed changes it, another sigma scales the same draw
    assert not np.array_equal(ds.with_options(seed=1).pairs(tmp_path, "test")[0].lq.load(), first)
    sigma50 = get_dataset("cbsd68", sigma=50).pairs(tmp_path, "test")[0].lq.load().astype(float)
    assert abs(np.std(sigma50 - 128) - 50) < 3 and np.corrcoef((sigma50 - 128).ravel(), (first - 128.0).ravel())[0, 1] > 0.95


def test_gaussian_noise_exact_formula(tmp_path):
    clean = make_image(tmp_path / "x.png", 5, 6)
    pair = get_dataset("kodak24", sigma=15, seed=3).pairs(tmp_path, "test")[0]
    digest = hashlib.sha256(b"3/x").digest()
    noise = np.random.default_rng(int.from_bytes(digest[:8], "little")).standard_normal(clean.shape) * 15
    np.testing.assert_array_equal(pair.lq.load(), np.clip(clean + noise, 0, 255).astype(np.uint8))


def test_grey_sets_get_one_noise_plane_and_options_are_checked(tmp_path):
    grey = np.random.default_rng(0).integers(0, 256, (12, 12), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "01.png")
    noisy = get_dataset("set12").pairs(tmp_path, "test")[0].lq.load()
    assert (noisy[:, :, 0] == noisy[:, :, 1]).all() and (noisy[:, :, 1] == noisy[:, :, 2]).all()
    assert not np.array_equal(noisy[:, :, 0], grey)
    assert "restormer" not in NOISE_CONVENTIONS
    with pytest.raises(DatasetError, match="cannot be stored as 8-bit"):
        get_dataset("cbsd68", noise="restormer")
    with pytest.raises(DatasetError, match="out of range"):
        get_dataset("cbsd68", sigma=0)
    with pytest.raises(DatasetError, match="takes no options"):
        get_dataset("gopro", sigma=25)
    with pytest.raises(DatasetError, match="any images"):
        get_dataset("bsd400").pairs(tmp_path / "empty" if (tmp_path / "empty").mkdir() is None else tmp_path, "train")


def test_gaussian_training_sets_and_subfolders(tmp_path):
    make_image(tmp_path / "DIV2K_train_HR/0001.png")
    make_image(tmp_path / "DIV2K_valid_HR/0801.png")
    assert [p.id for p in get_dataset("div2k").pairs(tmp_path, "train")] == ["0001"]
    make_image(tmp_path / "wed/00001.bmp")
    make_image(tmp_path / "wed/00002.bmp")
    assert [p.id for p in get_dataset("wed").pairs(tmp_path / "wed", "train")] == ["00001", "00002"]
    assert get_dataset("wed").pairs(tmp_path / "wed", "train")[0].degradation == "noise"


# ------------------------------------------------------------------------------------------- custom folder


def test_folder_nested_ids_and_single_split(tmp_path):
    make_image(tmp_path / "test/lq/b.jpg")
    make_image(tmp_path / "test/gt/b.png")
    make_image(tmp_path / "test/lq/scene1/a.png")
    make_image(tmp_path / "test/gt/scene1/a.png")
    make_image(tmp_path / "test/lq/scene10/a.png")
    make_image(tmp_path / "test/gt/scene10/a.png")
    make_image(tmp_path / "test/lq/scene2/a.png")
    make_image(tmp_path / "test/gt/scene2/a.png")
    ds = get_dataset("folder")
    assert lq_gt(ds.pairs(tmp_path, "test"), tmp_path) == [
        ("b", "test/lq/b.jpg", "test/gt/b.png"),
        ("scene1/a", "test/lq/scene1/a.png", "test/gt/scene1/a.png"),
        ("scene2/a", "test/lq/scene2/a.png", "test/gt/scene2/a.png"),
        ("scene10/a", "test/lq/scene10/a.png", "test/gt/scene10/a.png"),
    ]
    report = ds.check(tmp_path)
    assert report.ok and report.counts == {"train": 0, "test": 4} and "train" in report.notes[0]
    assert ds.available_splits(tmp_path) == ["test"]
    with pytest.raises(DatasetError, match="train"):
        ds.pairs(tmp_path, "train")
    make_image(tmp_path / "test/lq/scene2/extra.png")
    with pytest.raises(DatasetError, match=r"scene2/extra\.png"):
        ds.pairs(tmp_path, "test")
    make_image(tmp_path / "test/lq/b.png")  # b.jpg and b.png: ambiguous
    assert any("same name" in p for p in ds.check(tmp_path).problems)


def test_folder_without_gt_gives_lq_only_pairs(tmp_path):
    make_image(tmp_path / "train/lq/x.png")
    (pair,) = get_dataset("folder").pairs(tmp_path, "train")
    assert pair.id == "x" and pair.gt is None and pair.gt_key == ""
    (tmp_path / "test").mkdir()
    with pytest.raises(DatasetError, match="lq"):
        get_dataset("folder").pairs(tmp_path, "test")


def test_corrupt_image_raises_image_read_error_naming_it(tmp_path):
    make_image(tmp_path / "test/lq/a.png")
    (tmp_path / "test/gt").mkdir(parents=True)
    (tmp_path / "test/gt/a.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (pair,) = get_dataset("folder").pairs(tmp_path, "test")  # listing does not decode
    with pytest.raises(ImageReadError, match=r"test/gt/a\.png"):
        pair.gt.load()


# ------------------------------------------------------------------------------------------- demo


def test_demo_pairs_without_root():
    ds = get_dataset("demo")
    train, test = ds.pairs(None, "train"), ds.pairs(None, "test")
    assert len(train) == 48 and len(test) == 12
    assert train[3].id == "train/0003-noise" and test[0].id == "test/0000-blur"
    assert {p.degradation for p in train} == {"blur", "haze", "rain", "noise"}
    assert all(isinstance(p, Pair) and p.lq.path is None for p in train)
    assert len({p.gt_key for p in train + test}) == 60
    shapes = {p.gt.synth.size for p in train}
    assert len(shapes) > 10 and all(192 <= s <= 320 for size in shapes for s in size)
    assert len({round(h / w, 2) for h, w in shapes}) > 10


def test_demo_render_is_deterministic_and_degraded():
    pairs = get_dataset("demo").pairs(None, "test")
    for pair in pairs[:4]:
        lq, gt = pair.lq.load(), pair.gt.load()
        assert lq.dtype == gt.dtype == np.uint8 and lq.shape == gt.shape == pair.gt.synth.size + (3,)
        assert pair.lq.size() == pair.gt.synth.size
        psnr = 10 * np.log10(255**2 / np.mean((lq.astype(float) - gt) ** 2))
        assert 7 < psnr < 38, (pair.id, psnr)
        np.testing.assert_array_equal(lq, get_dataset("demo").pairs(None, "test")[pairs.index(pair)].lq.load())


def test_demo_build_writes_folder_layout_bit_identically(tmp_path):
    counts = demo_module.build(tmp_path / "a")
    assert counts == {"train": 48, "test": 12}
    demo_module.build(tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 120
    for f in files[::7]:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    folder = get_dataset("folder").pairs(tmp_path / "a", "test")
    assert [p.id for p in folder] == [p.id.split("/", 1)[1] for p in get_dataset("demo").pairs(None, "test")]
    np.testing.assert_array_equal(folder[5].lq.load(), get_dataset("demo").pairs(None, "test")[5].lq.load())
    assert "test/0002-rain" in (tmp_path / "a" / "demo.json").read_text()
