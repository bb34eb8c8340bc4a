"""Cross-attention through the mapper's key/value copies, in the conditional and unconditional passes."""

import pytest
import torch

from tdr.errors import ConfigError, MissingDependencyError
from tdr.pipeline import GuidancePipeline, load_components
from tdr.pipeline.attention import (
    MapperKVProcessor,
    install_mapper_kv,
    installed_processors,
    remove_mapper_kv,
    select_backend,
)
from tdr.pipeline.injection import encode_prompt
from tdr.pipeline.mapper import kv_key

torch.set_num_threads(1)


@pytest.fixture()
def models():
    return load_components(preset="tiny")


def unet_out(m, context):
    x = torch.randn(context.shape[0], 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return m.unet(x, torch.tensor(500), encoder_hidden_states=context).sample


def test_every_attn2_gets_the_processor_and_only_attn2(models):
    m = models
    assert install_mapper_kv(m.unet, m.mapper, "auto") == "sdpa"  # no CUDA here
    procs = {n: mod.processor for n, mod in m.unet.named_modules() if hasattr(mod, "processor")}
    cross = {n for n in procs if n.endswith("attn2")}
    assert cross == {name for name, *_ in m.mapper.config.kv_layers} and len(cross) == 4
    assert all(isinstance(procs[n], MapperKVProcessor) for n in cross)
    assert not any(isinstance(p, MapperKVProcessor) for n, p in procs.items() if n not in cross)
    # the copies belong to the mapper, not to the UNet
    assert not any("to_k" in k and "kv" in k for k in m.unet.state_dict())
    assert all(f"kv.{kv_key(n)}.to_k.weight" in m.mapper.state_dict() for n in cross)


def test_equal_copies_give_the_standard_unet(models):
    m = models
    context = torch.randn(2, 77, 32)
    remove_mapper_kv(m.unet)
    ref = unet_out(m, context)
    install_mapper_kv(m.unet, m.mapper)
    torch.testing.assert_close(unet_out(m, context), ref, rtol=0, atol=1e-6)
    assert {p.last_backend for p in installed_processors(m.unet)} == {"sdpa"}


def test_copies_are_used_in_both_passes_and_the_unets_own_are_not(models):
    m = models
    pipe = GuidancePipeline(m)
    uncond = encode_prompt(m.text_encoder, m.tokenizer, [""])
    cond = torch.randn(1, 77, 32)
    context = torch.cat([uncond, cond])  # the CFG batch [uncond; cond]
    base = unet_out(m, context)
    own = {k: v.clone() for k, v in m.unet.state_dict().items()}

    seen = []
    def record(module, inputs, output):
        seen.append(inputs[0].detach().clone())

    hooks = [p.to_k.register_forward_hook(record) for p in installed_processors(m.unet)]
    unet_out(m, context)
    for h in hooks:
        h.remove()
    assert len(seen) == 4 and all(torch.equal(s, context) for s in seen)  # every attn2, both rows

    with torch.no_grad():  # the UNet's own projections do nothing any more
        for mod in m.unet.modules():
            if hasattr(mod, "to_k") and isinstance(getattr(mod, "processor", None), MapperKVProcessor):
                mod.to_k.weight.mul_(3.0)
                mod.to_v.weight.mul_(-1.0)
    torch.testing.assert_close(unet_out(m, context), base, rtol=0, atol=0)
    m.unet.load_state_dict(own)

    with torch.no_grad():  # perturbing the copies changes the unconditional and conditional halves
        for kv in m.mapper.kv.values():
            kv.to_v.weight.add_(0.5 * torch.randn_like(kv.to_v.weight))
    out = unet_out(m, context)
    assert not torch.allclose(out[0], base[0], atol=1e-4) and not torch.allclose(out[1], base[1], atol=1e-4)
    assert all(torch.equal(v, own[k]) for k, v in m.unet.state_dict().items())
    assert pipe.attention_backend == "sdpa"


def test_backend_selection():
    assert select_backend("auto", "cpu") == "sdpa"
    assert select_backend("sdpa", "cpu") == "sdpa"
    with pytest.raises(MissingDependencyError, match="xformers") as missing:
        select_backend("xformers", "cpu")
    assert missing.value.param == "attention"
    with pytest.raises(ConfigError):
        select_backend("flash", "cpu")


def test_mapper_for_another_unet_is_refused(models):
    from diffusers import UNet2DConditionModel

    from tdr.pipeline.presets import TINY_UNET_CONFIG

    other = UNet2DConditionModel(**{**TINY_UNET_CONFIG, "layers_per_block": 2})
    with pytest.raises(ValueError, match="other cross-attention"):
        install_mapper_kv(other, models.mapper)
