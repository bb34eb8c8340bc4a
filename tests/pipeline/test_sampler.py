"""Our DDIM + CFG loop against diffusers' StableDiffusionPipeline; schedule; per-image determinism."""

import numpy as np
import pytest
import torch

from tdr.pipeline import GuidancePipeline, load_components
from tdr.pipeline.attention import remove_mapper_kv
from tdr.pipeline.injection import encode_injected
from tdr.pipeline.sampler import (
    PAPER_SCHEDULER_CONFIG,
    ddim_sample,
    decode_float,
    initial_noise,
    make_scheduler,
    noise_seed,
)

torch.set_num_threads(1)


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(48, 64), (64, 40), (32, 32), (40, 56)]
    return [rng.integers(0, 256, (*sizes[i % 4], 3), dtype=np.uint8) for i in range(n)]


def test_matches_diffusers_stable_diffusion_pipeline(models):
    from diffusers import StableDiffusionPipeline

    m = models
    steps, scale = 4, 5.0
    sd = StableDiffusionPipeline(
        vae=m.vae,
        text_encoder=m.text_encoder,
        tokenizer=m.tokenizer,
        unet=m.unet,
        scheduler=make_scheduler(m.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sd.set_progress_bar_config(disable=True)
    pipe = GuidancePipeline(m)  # installs the mapper's k/v copies (equal to the UNet's: untrained)
    words = pipe.words(images(2))
    with torch.inference_mode():
        cond = encode_injected(m.text_encoder, m.tokenizer, words)
        uncond = pipe.uncond_embeddings()
        latents = initial_noise(["x", "y"], 0, (4, 8, 8))
        scheduler = make_scheduler(m.scheduler_config)
        ours = ddim_sample(pipe.unet, scheduler, latents, cond, uncond, steps=steps, scale=scale)
        ours = decode_float(m.vae, ours).permute(0, 2, 3, 1).numpy()
    remove_mapper_kv(m.unet)  # diffusers' own cross-attention with the UNet's to_k/to_v
    try:
        ref = sd(
            prompt_embeds=cond,
            negative_prompt_embeds=uncond.expand_as(cond),
            latents=latents,
            num_inference_steps=steps,
            guidance_scale=scale,
            height=64,
            width=64,
            output_type="np",
        ).images
    finally:
        GuidancePipeline(m)  # put our processors back for the other tests
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    # and the public entry point, uint8 (per-image batches on CPU): within one level of rounding
    out = pipe(images(2), ["x", "y"], steps=steps, scale=scale, size=64)
    assert out.shape == (2, 64, 64, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - np.round(ref * 255).astype(int)).max() <= 1


def test_paper_ddim_timesteps():
    s = make_scheduler()
    assert s.config.timestep_spacing == "leading" and s.config.steps_offset == 1
    assert not s.config.set_alpha_to_one and not s.config.clip_sample
    s.set_timesteps(200)
    t = s.timesteps.tolist()
    assert len(t) == 200 and t[:3] == [996, 991, 986] and t[-3:] == [11, 6, 1]
    assert all(a - b == 5 for a, b in zip(t, t[1:]))
    assert PAPER_SCHEDULER_CONFIG["beta_schedule"] == "scaled_linear"
    betas = s.betas
    assert betas[0].item() == pytest.approx(0.00085) and betas[-1].item() == pytest.approx(0.012)


def test_noise_depends_only_on_seed_and_id():
    a = initial_noise(["img1", "img2", "img3"], 7, (4, 8, 8))
    b = initial_noise(["img3", "img1"], 7, (4, 8, 8))
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a[0], initial_noise(["img1"], 8, (4, 8, 8))[0])
    assert noise_seed(0, "a") != noise_seed(0, "b") and 0 <= noise_seed(0, "a") < 2**63


def test_batch_size_and_order_do_not_change_an_image(models):
    pipe = GuidancePipeline(models)
    ims, ids = images(3), ["a", "b", "c"]
    three = pipe(ims, ids, steps=2, size=64)
    ones = [pipe([im], [i], steps=2, size=64) for im, i in zip(ims, ids)]
    assert np.array_equal(three, np.concatenate(ones))  # bit-identical, CPU fp32
    reordered = pipe(ims[::-1], ids[::-1], steps=2, size=64)
    assert np.array_equal(reordered[::-1], three)
    assert not np.array_equal(three[0], three[1])


def test_same_image_other_id_gives_other_guidance(models):
    pipe = GuidancePipeline(models)
    im = images(1)
    assert not np.array_equal(pipe(im, ["a"], steps=2, size=64), pipe(im, ["b"], steps=2, size=64))


def test_layouts_and_bad_arguments(models):
    pipe = GuidancePipeline(models)
    wide = images(1)[0]
    centre = pipe.words([wide], layout="center")
    full = pipe.words([wide], layout="full")
    assert not torch.equal(centre, full)
    with pytest.raises(ValueError, match="layout"):
        pipe([wide], ["a"], steps=1, size=64, layout="left")
    with pytest.raises(ValueError, match="multiple of 16"):
        pipe([wide], ["a"], steps=1, size=72)
    with pytest.raises(ValueError, match="ids"):
        pipe([wide], ["a", "b"], steps=1, size=64)


def test_progress_callback(models):
    seen = []
    GuidancePipeline(models)(images(1), ["a"], steps=3, size=64, callback=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_paths(models, dtype):
    """The GPU dtypes run end to end (here on CPU) and stay close to fp32."""
    half = load_components(preset="tiny", dtype=dtype)
    assert half.unet.dtype == dtype and next(half.mapper.parameters()).dtype == dtype
    ims, ids = images(2), ["a", "b"]
    ref = GuidancePipeline(models)(ims, ids, steps=2, size=64).astype(int)
    out = GuidancePipeline(half)(ims, ids, steps=2, size=64)
    assert out.dtype == np.uint8 and np.abs(out - ref).mean() < 2


def test_settings_travel_as_one_object_or_as_keywords(models):
    """``pipe(images, ids, SamplingSettings(...))`` and keyword overrides are the same call; without a size
    the tiny preset samples at its own side (64), not SD's 512."""
    from tdr.pipeline import SamplingSettings

    pipe = GuidancePipeline(models)
    im = images(1)
    by_object = pipe(im, ["a"], SamplingSettings(steps=2))
    assert by_object.shape == (1, 64, 64, 3)
    assert np.array_equal(by_object, pipe(im, ["a"], steps=2, size=64))
    assert np.array_equal(by_object, pipe(im, ["a"], SamplingSettings(steps=5, size=128), steps=2, size=64))
    with pytest.raises(TypeError):
        pipe(im, ["a"], stepz=2)
