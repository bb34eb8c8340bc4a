"""Backbone registry: every entry runs on any size, full sizes match the papers, official names load."""

import pytest
import torch

from tdr.errors import TdrError
from tdr.guided.backbones import (BACKBONES, CheckpointMismatchError, UnknownBackboneError, build_backbone,
                                  load_backbone_checkpoint)

torch.set_num_threads(1)

TEST_ENTRIES = [name for name in BACKBONES if name.endswith("-test")]
FAMILIES = ["nafnet", "restormer", "promptir", "sfnet", "drsformer"]


def test_every_family_has_a_full_and_a_test_entry():
    for family in FAMILIES:
        assert family in BACKBONES and f"{family}-test" in BACKBONES
    assert {"nafnet-w32", "nafnet-small"} <= set(BACKBONES)


@pytest.mark.parametrize("name", TEST_ENTRIES)
@pytest.mark.parametrize("guided", [False, True])
def test_forward_any_size(name, guided):
    torch.manual_seed(0)
    model = build_backbone(name, guided=guided)
    model.train()
    y = model(torch.rand(2, 3, 19, 23), torch.rand(2, 3, 40, 30))
    assert y.shape == (2, 3, 19, 23) and torch.isfinite(y).all()
    y.mean().backward()
    model.eval()
    with torch.no_grad():
        y = model(torch.rand(2, 3, 37, 53), torch.rand(2, 3, 64, 48))
        assert y.shape == (2, 3, 37, 53) and 0 <= y.min() and y.max() <= 1
        y = model(torch.rand(1, 3, 9, 30), torch.rand(1, 3, 20, 20))  # smaller than the padding multiple
    assert y.shape == (1, 3, 9, 30)


@pytest.mark.parametrize("name", TEST_ENTRIES)
def test_unguided_ignores_guidance_and_guided_needs_it(name):
    torch.manual_seed(0)
    plain = build_backbone(name, guided=False).eval()
    x = torch.rand(1, 3, 24, 24)
    with torch.no_grad():
        assert torch.equal(plain(x), plain(x, torch.rand(1, 3, 50, 70)))
    assert plain.aggregation_parameters() == [] and not plain.guided
    guided = build_backbone(name).eval()
    with pytest.raises(ValueError, match="guided"):
        guided(x)


def _count(name, guided=False):
    with torch.device("meta"):  # parameters without memory
        model = build_backbone(name, guided=guided)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,paper_millions", [
    ("nafnet", 67.89),  # NAFNet-GoPro-width64
    ("restormer", 26.13),
    ("promptir", 35.59 - 0.22),  # the official count includes 0.22M of convs its forward never uses (buffers here)
    ("sfnet", 13.27),
    ("drsformer", 33.65),
])
def test_parameter_counts_match_papers(name, paper_millions):
    assert _count(name) / 1e6 == pytest.approx(paper_millions, rel=0.01)
    assert _count(name, guided=True) > _count(name)


@pytest.mark.parametrize("name", ["nafnet-test", "restormer-test", "promptir-test", "drsformer-test", "sfnet-test"])
@pytest.mark.parametrize("wrap", ["params", "params_ema", "state_dict", "plain", "module"])
def test_official_checkpoint_loads_into_guided_backbone(name, wrap):
    torch.manual_seed(1)
    official = build_backbone(name, guided=False).state_dict()
    wrapped = {"plain": official, "module": {f"module.{k}": v for k, v in official.items()}}
    checkpoint = wrapped.get(wrap, {wrap: official})
    torch.manual_seed(2)
    model = build_backbone(name, guided=True)
    agg_before = {k: v.clone() for k, v in model.agg.state_dict().items()}
    load_backbone_checkpoint(model, checkpoint)
    for k, v in model.backbone_state_dict().items():
        assert torch.equal(v, official[k]), k
    for k, v in model.agg.state_dict().items():
        assert torch.equal(v, agg_before[k]), k  # aggregation keeps its fresh weights
    assert all(k.startswith("agg.") for k in set(model.state_dict()) - set(official))


def test_official_names_present():
    with torch.device("meta"):
        nafnet, restormer = build_backbone("nafnet-test"), build_backbone("restormer-test")
    keys = set(nafnet.state_dict())
    for k in ["intro.weight", "ending.bias", "encoders.0.0.conv1.weight", "encoders.3.0.sca.1.weight",
              "encoders.0.0.norm1.weight", "encoders.0.0.beta", "encoders.0.0.gamma", "downs.0.weight",
              "ups.0.0.weight", "middle_blks.0.conv5.bias", "decoders.3.0.norm2.bias"]:
        assert k in keys, k
    keys = set(restormer.state_dict())
    for k in ["patch_embed.proj.weight", "encoder_level1.0.norm1.body.weight", "encoder_level1.0.attn.temperature",
              "encoder_level1.0.attn.qkv.weight", "encoder_level1.0.attn.qkv_dwconv.weight",
              "encoder_level1.0.attn.project_out.weight", "encoder_level1.0.ffn.project_in.weight",
              "encoder_level1.0.ffn.dwconv.weight", "encoder_level1.0.ffn.project_out.weight", "down1_2.body.0.weight",
              "latent.0.norm2.body.bias", "up4_3.body.0.weight", "reduce_chan_level3.weight",
              "decoder_level3.0.attn.qkv.weight", "refinement.0.ffn.dwconv.weight", "output.weight"]:
        assert k in keys, k


def test_checkpoint_mismatch_is_one_clear_error():
    model = build_backbone("nafnet-test", guided=True)
    other = build_backbone("restormer-test", guided=False).state_dict()
    with pytest.raises(CheckpointMismatchError, match="missing .* unexpected") as err:
        load_backbone_checkpoint(model, {"params": other})
    assert isinstance(err.value, TdrError)
    wider = build_backbone("nafnet-test", guided=False, width=16).state_dict()
    with pytest.raises(CheckpointMismatchError, match="other shape"):
        load_backbone_checkpoint(model, wider)
    with pytest.raises(CheckpointMismatchError, match="no state dict"):
        load_backbone_checkpoint(model, {"epoch": 3})


def test_typo_lists_the_choices():
    with pytest.raises(UnknownBackboneError, match="nafnet-w32.*restormer") as err:
        build_backbone("nafent")
    assert isinstance(err.value, ValueError) and isinstance(err.value, TdrError)


def test_guided_and_plain_share_backbone_init_under_one_seed():
    torch.manual_seed(3)
    guided = build_backbone("sfnet-test", guided=True)
    torch.manual_seed(3)
    plain = build_backbone("sfnet-test", guided=False)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, guided.state_dict()[k]), k


def test_sfnet_pyramid_outputs():
    model = build_backbone("sfnet-test", guided=True).eval()
    with torch.no_grad():
        outs = model.forward_pyramid(torch.rand(1, 3, 37, 53), torch.rand(1, 3, 64, 64))
    assert [o.shape[-2:] for o in outs] == [(10, 14), (19, 27), (37, 53)]


def test_guided_package_does_not_import_diffusers():
    import subprocess
    import sys
    code = ("import sys, tdr.guided.backbones, tdr.guided.aggregation; "
            "bad = [m for m in sys.modules if m.startswith(('diffusers', 'tdr.pipeline'))]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
