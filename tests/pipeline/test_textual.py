"""Training the mapper (stage 1) and the cleaner (stage 2) with tiny models on the demo data."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tdr.errors import DatasetError, StoreError, TdrError
from tdr.cache.images import write_png
from tdr.pipeline import file_sha256, fingerprint, load_components
from tdr.pipeline.checkpoint import load_checkpoint
from tdr.pipeline.textual import TextualConfig, evaluate_loss, train_cleaner, train_mapper
from tdr.runs.config import ConfigError, from_dict
from tdr.pipeline.textual_data import cleaner_items, crop_box, mapper_items, parse_source, sample

torch.set_num_threads(1)

TINY = dict(preset="tiny", size=64, workers=1, val_every=0, save_every=0)
MODULES = ("unet", "vae", "text_encoder", "clip", "mapper", "cleaner")


def snapshot(models) -> dict[str, torch.Tensor]:
    return {f"{m}.{k}": v.detach().clone() for m in MODULES for k, v in getattr(models, m).state_dict().items()}


def changed(before: dict, models) -> set[str]:
    after = snapshot(models)
    assert after.keys() == before.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """30 mapper steps on the demo set, the models kept to inspect."""
    out = tmp_path_factory.mktemp("mapper")
    cfg = TextualConfig(data=("demo",), out=str(out), steps=30, batch_size=4, accum=1, lr=1e-2,
                        **{**TINY, "val_every": 30, "val_images": 2, "val_steps": 2})
    models = load_components(preset="tiny")
    items = mapper_items([parse_source("demo")])
    before, loss0 = snapshot(models), evaluate_loss("mapper", models, items, cfg, count=16)
    events = []
    result = train_mapper(cfg, events.append, models=models)
    loss1 = evaluate_loss("mapper", models, items, cfg, count=16)
    return SimpleNamespace(out=out, cfg=cfg, models=models, before=before, result=result, loss0=loss0,
                           loss1=loss1, events=events)


@pytest.fixture(scope="module")
def stage2(stage1, tmp_path_factory):
    """30 cleaner steps on the demo pairs, on the stage-1 mapper."""
    out = tmp_path_factory.mktemp("cleaner")
    mapper = str(stage1.out / "last.pt")
    cfg = TextualConfig(data=("demo",), out=str(out), mapper=mapper, steps=30, batch_size=4, accum=1, lr=1e-2, **TINY)
    models = load_components(preset="tiny", mapper_ckpt=mapper)
    items = cleaner_items([parse_source("demo")])
    before, loss0 = snapshot(models), evaluate_loss("cleaner", models, items, cfg, count=16)
    mapper_sha = file_sha256(mapper)
    result = train_cleaner(cfg, models=models)
    loss1 = evaluate_loss("cleaner", models, items, cfg, count=16)
    return SimpleNamespace(out=out, models=models, before=before, result=result, loss0=loss0, loss1=loss1,
                           mapper=mapper, mapper_sha=mapper_sha)


# ------------------------------------------------------------------------------------------------ stage 1


def test_mapper_loss_decreases(stage1):
    losses = np.array(stage1.result.losses)
    assert len(losses) == 30 and np.isfinite(losses).all()
    assert stage1.loss1 < 0.95 * stage1.loss0  # the same fixed samples before and after
    assert losses[-8:].mean() < losses[:8].mean()


def test_mapper_changes_only_mapper(stage1):
    diff = changed(stage1.before, stage1.models)
    mapper_keys = {k for k in stage1.before if k.startswith("mapper.")}
    assert diff == mapper_keys  # every mapper tensor moved (MLPs and k/v copies), nothing else did
    assert any(".kv." in k and "to_k" in k for k in diff) and any(".kv." in k and "to_v" in k for k in diff)
    assert any(k.startswith("mapper.cls_mlp") for k in diff) and any(k.startswith("mapper.patch_mlp") for k in diff)


def test_mapper_run_folder(stage1):
    out, result = stage1.out, stage1.result
    assert result.checkpoint == out / "last.pt" and (out / "config.json").is_file()
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["schema"] == 1 and ckpt["kind"] == "mapper" and ckpt["train"]["step"] == 30
    assert set(ckpt["train"]) >= {"optimizer", "rng", "config", "scaler"}
    assert isinstance(ckpt["train"]["rng"]["torch"], torch.Tensor)
    mapper = load_checkpoint(out / "last.pt", "mapper")
    for k, v in mapper.state_dict().items():
        assert torch.equal(v, stage1.models.mapper.state_dict()[k])
    assert result.validations == [out / "val_30.png"] and (out / "val_30.png").is_file()
    from PIL import Image

    assert Image.open(out / "val_30.png").size == (2 * 64, 2 * 64)  # 2 rows of input | guidance
    kinds = [e["event"] for e in stage1.events]
    assert kinds[0] == "start" and kinds.count("step") == 30 and "validation" in kinds
    assert all("loss" in e and "its" in e for e in stage1.events if e["event"] == "step")


# ------------------------------------------------------------------------------------------------ stage 2


def test_cleaner_loss_decreases(stage2):
    losses = np.array(stage2.result.losses)
    assert len(losses) == 30 and np.isfinite(losses).all()
    assert stage2.loss1 < 0.99 * stage2.loss0
    assert losses[-8:].mean() < losses[:8].mean()


def test_cleaner_changes_only_cleaner(stage2):
    diff = changed(stage2.before, stage2.models)
    assert diff == {k for k in stage2.before if k.startswith("cleaner.")}
    assert file_sha256(stage2.mapper) == stage2.mapper_sha
    ckpt = torch.load(stage2.out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["kind"] == "cleaner" and all(not k.startswith(("kv", "cls_mlp")) for k in ckpt["state_dict"])


# ------------------------------------------------------------------------------------------------ resume


def test_resume_reproduces_uninterrupted_run(tmp_path):
    common = dict(data=("demo",), batch_size=2, accum=2, lr=1e-2, **{**TINY, "save_every": 2})
    whole = train_mapper(TextualConfig(out=str(tmp_path / "a"), steps=4, **common))
    first = train_mapper(TextualConfig(out=str(tmp_path / "b"), steps=2, **common))
    assert first.losses == whole.losses[:2]
    assert (tmp_path / "b" / "step_2.pt").is_file()
    with pytest.raises(TdrError, match="already holds a run"):
        train_mapper(TextualConfig(out=str(tmp_path / "b"), steps=4, **common))
    with pytest.raises(TdrError, match="'seed'"):
        train_mapper(TextualConfig(out=str(tmp_path / "b"), steps=4, resume=True, **{**common, "seed": 1}))
    rest = train_mapper(TextualConfig(out=str(tmp_path / "b"), steps=4, resume=True, **common))
    assert rest.start_step == 2 and rest.losses == whole.losses[2:]
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ chain


def test_chain_checkpoints_load_into_generation(tmp_path):
    common = dict(data=("demo",), steps=10, batch_size=2, accum=1, lr=1e-3, **TINY)
    train_mapper(TextualConfig(out=str(tmp_path / "m"), **common))
    mapper = tmp_path / "m" / "last.pt"
    train_cleaner(TextualConfig(out=str(tmp_path / "c"), mapper=str(mapper), **common))
    cleaner = tmp_path / "c" / "last.pt"
    models = load_components(preset="tiny", mapper_ckpt=mapper, cleaner_ckpt=cleaner)
    fp = fingerprint(models)
    assert fp["mapper"] == file_sha256(mapper) and fp["cleaner"] == file_sha256(cleaner)


# ------------------------------------------------------------------------------------------------ data


def test_samples_are_pure_functions_of_seed_and_index():
    items = mapper_items([parse_source("demo")])
    kw = dict(size=64, latent_shape=(4, 8, 8))
    a, b, c = sample(items, 3, 17, **kw), sample(items, 3, 17, **kw), sample(items, 3, 18, **kw)
    for name in ("input", "target", "noise", "posterior"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert a.timestep == b.timestep and not torch.equal(a.noise, c.noise)
    assert a.input.shape == (3, 64, 64) and torch.equal(a.input, a.target)  # stage 1: its own target
    n = len(items)  # every item once per epoch
    from tdr.pipeline.textual_data import item_index

    assert sorted(item_index(0, k, n) for k in range(n)) == list(range(n))


def test_crop_rule():
    rng = np.random.default_rng(0)
    top, left, side, resize = crop_box(600, 800, 512, rng)
    assert side == 512 and not resize and 0 <= top <= 88 and 0 <= left <= 288
    assert crop_box(300, 400, 512, rng) == (0, 50, 300, True)  # small: centre square, resized


def test_denoising_data_gets_noise_on_the_fly(tmp_path):
    for i in range(2):  # a folder of clean photos without gt/
        write_png(tmp_path / "train" / "lq" / f"{i}.png", np.full((80, 96, 3), 100 + 50 * i, np.uint8))
    with pytest.raises(DatasetError, match="noise data"):
        cleaner_items([parse_source(f"folder:{tmp_path}")])
    items = cleaner_items([parse_source("demo")], [parse_source(f"folder:{tmp_path}")])
    noisy = [it for it in items if it.noise]
    assert len(noisy) == 2 and len(items) == 48 + 2
    sigmas = []
    for k in range(200):
        s = sample(noisy, 0, k, size=64, latent_shape=(4, 8, 8))
        sigmas.append(float((s.input - s.target).std()) * 255)
    assert 0 <= min(sigmas) < 5 and 40 < max(sigmas) < 52  # sigma ~ U(0, 50)


def test_store_sources(tmp_path):
    from tdr.cache.ingest import ingest

    url = str(tmp_path / "demo.zarr")
    ingest("demo", None, url, splits=["train"], workers=1)
    items = mapper_items([parse_source(f"store:{url}")])
    assert len(items) == 96
    pairs = cleaner_items([parse_source(f"store:{url}")])
    assert len(pairs) == 48 and not any(p.noise for p in pairs)
    s = sample(pairs, 0, 0, size=64, latent_shape=(4, 8, 8))
    assert not torch.equal(s.input, s.target)
    with pytest.raises(StoreError, match="no 'test' split"):
        mapper_items([parse_source(f"store:{url}")], split="test")


def test_config_errors_and_paper_lr():
    assert TextualConfig(data=("demo",), out="x").learning_rate(world_size=4) == pytest.approx(6.4e-5)
    with pytest.raises(ConfigError, match="set data"):
        TextualConfig(out="x")
    with pytest.raises(ConfigError, match="unknown key.*lr_typo"):
        from_dict(TextualConfig, {"data": ["demo"], "out": "x", "lr_typo": 1})
    with pytest.raises(ConfigError, match="'steps' must be an integer"):
        from_dict(TextualConfig, {"data": ["demo"], "out": "x", "steps": "9"})
    with pytest.raises(DatasetError, match="Unknown dataset"):
        parse_source("nosuchset")
    with pytest.raises(StoreError):
        parse_source("store:")
    with pytest.raises(ConfigError, match="set mapper"):
        train_cleaner(TextualConfig(data=("demo",), out="x"))


def test_merged_config_resumes_saved_settings(tmp_path):
    import json

    from tdr.pipeline.textual import merged_config

    saved = TextualConfig(data=("demo",), out=str(tmp_path), seed=7, size=64)
    (tmp_path / "config.json").write_text(json.dumps(saved.to_dict()))

    cfg = merged_config({"out": str(tmp_path), "resume": True, "steps": 9, "seed": None, "data": ()})
    assert cfg.seed == 7 and cfg.size == 64 and cfg.steps == 9 and cfg.data == ("demo",)
    assert merged_config({"out": "x", "data": ["demo"], "seed": None}).seed == 0


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    common = dict(data=("demo",), steps=2, batch_size=2, accum=1, lr=1e-2, **TINY)
    plain = train_mapper(TextualConfig(out=str(tmp_path / "a"), **common))
    ckpt = train_mapper(TextualConfig(out=str(tmp_path / "b"), grad_checkpointing=True, **common))
    assert np.allclose(plain.losses, ckpt.losses, rtol=1e-5, atol=1e-6)
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    fresh = load_components(preset="tiny").mapper.state_dict()
    kv = [k for k in a if k.startswith("kv.")]
    assert kv and all(not torch.equal(a[k], fresh[k]) for k in kv)  # gradients reached the k/v copies
