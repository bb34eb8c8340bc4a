"""Offline model loading, the missing-model error, checkpoints, parameter counts, fingerprints."""

import os
import shutil

import numpy as np
import pytest
import torch

from tdr.errors import ModelNotFoundError, TdrError
from tdr.pipeline import GuidancePipeline, file_sha256, fingerprint, load_components
from tdr.pipeline.cleaner import Cleaner, CleanerConfig
from tdr.pipeline.mapper import Mapper, MapperConfig, cross_attention_layers
from tdr.pipeline.checkpoint import load_checkpoint, module_checkpoint
from tdr.pipeline.fingerprints import weight_sha256
from tdr.pipeline.presets import SD21_BASE_UNET_CONFIG, TINY_TEXT_CONFIG, TINY_VISION_CONFIG, random_components
from tdr.runs.checkpoint import save
from tdr.pipeline.sampler import make_scheduler

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """The tiny models saved as real ones: SD in diffusers' layout, CLIP as a full CLIPModel directory."""
    from transformers import CLIPConfig, CLIPModel

    from tdr.pipeline.presets import TINY_UNET_CONFIG, TINY_VAE_CONFIG

    root = tmp_path_factory.mktemp("models")
    parts = random_components(
        TINY_UNET_CONFIG, TINY_VAE_CONFIG, TINY_TEXT_CONFIG, TINY_VISION_CONFIG, cleaner_hidden=40
    )
    sd = root / "sd"
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        parts[name].save_pretrained(sd / name)
    make_scheduler().save_pretrained(sd / "scheduler")
    torch.manual_seed(0)
    text = {**TINY_TEXT_CONFIG, "vocab_size": len(parts["tokenizer"])}
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=TINY_VISION_CONFIG, projection_dim=16))
    clip.save_pretrained(root / "clip")
    save(root / "mapper.pt", module_checkpoint(parts["mapper"], meta={"step": 3}))
    save(root / "cleaner.pt", module_checkpoint(parts["cleaner"]))
    vision = {k.removeprefix("vision_model."): v for k, v in clip.state_dict().items() if k.startswith("vision_")}
    parts["clip"] = vision
    ckpts = {"mapper": root / "mapper.pt", "cleaner": root / "cleaner.pt"}
    return {"sd": sd, "clip": root / "clip", **ckpts, "parts": parts}


def test_missing_models_are_all_listed(tmp_path, offline_home):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError) as e:
        load_components(empty, "nobody/no-such-clip", mapper_ckpt=None, cleaner_ckpt=tmp_path / "nope.pt")
    msg = str(e.value)
    for piece in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert f"Stable Diffusion {piece}" in msg and str(empty / piece) in msg
    assert "nobody/no-such-clip" in msg and str(offline_home / "hub" / "models--nobody--no-such-clip") in msg
    assert "mapper checkpoint: none given" in msg and str(tmp_path / "nope.pt") in msg
    for flag in ("--sd-model", "--clip-model", "--mapper", "--cleaner", "--allow-untrained"):
        assert flag in msg
    assert "huggingface-cli download stabilityai/stable-diffusion-2-1-base" in msg
    assert "huggingface-cli download laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in msg
    assert isinstance(e.value, TdrError)

    with pytest.raises(ModelNotFoundError) as e:  # a hub id for SD, not cached
        load_components("stabilityai/stable-diffusion-2-1-base", empty, allow_untrained=True)
    assert "models--stabilityai--stable-diffusion-2-1-base" in str(e.value) and "CLIP" in str(e.value)


def test_real_loading_from_local_directories(tiny_dirs, offline_home):
    d = tiny_dirs
    with pytest.raises(ModelNotFoundError, match="--mapper"):  # real models refuse random mapper/cleaner
        load_components(d["sd"], d["clip"])
    m = load_components(d["sd"], d["clip"], mapper_ckpt=d["mapper"], cleaner_ckpt=d["cleaner"])
    ref = d["parts"]
    for name in ("unet", "vae", "text_encoder", "clip", "mapper", "cleaner"):
        got = m.__dict__[name].state_dict()
        want = ref[name] if isinstance(ref[name], dict) else ref[name].state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    assert m.clip.config.image_size == 224 and m.scheduler_config["timestep_spacing"] == "leading"
    fp = fingerprint(m)
    assert fp["mapper"] == file_sha256(d["mapper"]) and fp["cleaner"] == file_sha256(d["cleaner"])
    assert fp["weights"]["sd/unet"] == {
        "diffusion_pytorch_model.safetensors": file_sha256(d["sd"] / "unet" / "diffusion_pytorch_model.safetensors")
    }
    assert fp["weights"]["clip"] == {"model.safetensors": file_sha256(d["clip"] / "model.safetensors")}
    out = GuidancePipeline(m)([np.zeros((40, 60, 3), np.uint8)], ["a"], steps=2, size=32)
    assert out.shape == (1, 32, 32, 3)
    untrained = load_components(d["sd"], d["clip"], allow_untrained=True)
    assert fingerprint(untrained)["mapper"] == "untrained"


def test_loading_a_hub_id_from_the_hf_cache(tiny_dirs, offline_home):
    """A hub id resolves offline through the HF cache; weight hashes come from the blob names."""
    snap = offline_home / "hub" / "models--someone--tiny-sd"
    rev = "0" * 40
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text(rev)
    for src in tiny_dirs["sd"].rglob("*"):
        if src.is_file():
            sha = file_sha256(src)
            blob = snap / "blobs" / sha
            blob.parent.mkdir(exist_ok=True)
            shutil.copy(src, blob)
            link = snap / "snapshots" / rev / src.relative_to(tiny_dirs["sd"])
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(blob, link)
    m = load_components("someone/tiny-sd", tiny_dirs["clip"], allow_untrained=True)
    unet_file = snap / "snapshots" / rev / "unet" / "diffusion_pytorch_model.safetensors"
    assert weight_sha256(unet_file) == os.path.basename(os.path.realpath(unet_file))
    assert fingerprint(m)["weights"]["sd/unet"]["diffusion_pytorch_model.safetensors"] == file_sha256(unet_file)


def test_checkpoint_round_trip_and_refusals(tiny_dirs, tmp_path):
    d = tiny_dirs
    raw = torch.load(d["mapper"], weights_only=True)
    assert raw["schema"] == 1 and raw["kind"] == "mapper" and raw["meta"] == {"step": 3}
    assert raw["config"]["clip_dim"] == 32 and len(raw["config"]["kv_layers"]) == 4
    mapper = load_checkpoint(d["mapper"], "mapper")
    assert isinstance(mapper, Mapper) and mapper.config == d["parts"]["mapper"].config
    assert all(torch.equal(v, d["parts"]["mapper"].state_dict()[k]) for k, v in mapper.state_dict().items())
    cleaner = load_checkpoint(d["cleaner"], "cleaner")
    assert isinstance(cleaner, Cleaner) and cleaner.config == CleanerConfig(32, 40, 20)
    with pytest.raises(TdrError, match="not a schema-1 cleaner"):
        load_checkpoint(d["mapper"], "cleaner")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(TdrError, match="not a readable mapper"):
        load_checkpoint(junk, "mapper")
    wrong = tmp_path / "wrong.pt"
    save(wrong, module_checkpoint(Mapper(MapperConfig(clip_dim=16, word_dim=32))))
    with pytest.raises(TdrError, match="16-d CLIP tokens"):
        load_components(preset="tiny", mapper_ckpt=wrong)
    tiny = load_components(preset="tiny", mapper_ckpt=d["mapper"], cleaner_ckpt=d["cleaner"])
    assert fingerprint(tiny)["mapper"] == file_sha256(d["mapper"])


def test_parameter_counts_at_real_size():
    from diffusers import UNet2DConditionModel

    n = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD21_BASE_UNET_CONFIG)
        mapper = Mapper(MapperConfig(1280, 1024, 20, cross_attention_layers(unet)))
        cleaner = Cleaner(CleanerConfig(1024, 1280, 20))
    assert n(unet) == pytest.approx(865.9e6, rel=1e-3)  # SD-2.1-base UNet
    assert len(mapper.config.kv_layers) == 16
    assert n(mapper.kv) == pytest.approx(25.6e6, rel=1e-2)  # k/v copies, "~26M"
    assert n(mapper) - n(mapper.kv) == pytest.approx(249.5e6, rel=1e-2)  # "~250M"
    assert n(cleaner) == pytest.approx(118.2e6, rel=1e-2)  # "~118M"

