"""CLIP preprocessing, the mapper formula and the per-word cleaner."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tdr.pipeline.cleaner import Cleaner, CleanerConfig
from tdr.pipeline.clip import CLIP_MEAN, CLIP_STD, preprocess
from tdr.pipeline.mapper import GroupedMLP, Mapper, MapperConfig

torch.set_num_threads(1)


def word_mlp(g: GroupedMLP, i: int) -> nn.Sequential:
    """MLP number ``i`` of a grouped MLP as plain torch layers (the paper's per-word MLP)."""
    layers = []
    for layer in g.layers:
        if hasattr(layer, "eps"):
            ln = nn.LayerNorm(layer.weight.shape[1], eps=layer.eps)
            ln.weight.data, ln.bias.data = layer.weight[i].clone(), layer.bias[i].clone()
            layers.append(ln)
        elif hasattr(layer, "weight"):
            lin = nn.Linear(layer.weight.shape[2], layer.weight.shape[1])
            lin.weight.data, lin.bias.data = layer.weight[i].clone(), layer.bias[i].clone()
            layers.append(lin)
        else:
            layers.append(nn.LeakyReLU())
    return nn.Sequential(*layers)


def test_mapper_is_the_papers_formula():
    torch.manual_seed(0)
    m = Mapper(MapperConfig(clip_dim=16, word_dim=12, num_words=5))
    for p in m.parameters():  # LayerNorm affine away from (1, 0) so it is exercised too
        p.data.add_(0.1 * torch.randn_like(p))
    tokens = torch.randn(3, 1 + 9, 16)
    with torch.no_grad():
        out = m(tokens)
        ref = torch.stack(
            [word_mlp(m.cls_mlp, i)(tokens[:, 0]) + word_mlp(m.patch_mlp, i)(tokens[:, 1:]).mean(1) for i in range(5)],
            dim=1,
        )
    assert out.shape == (3, 5, 12)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # layer names stay readable: (words, out, in) Linear weights, (words, C) LayerNorm weights
    sd = m.state_dict()
    assert sd["cls_mlp.layers.0.weight"].shape == (5, 16, 16) and sd["patch_mlp.layers.9.weight"].shape == (5, 12, 16)
    assert sd["cls_mlp.layers.1.weight"].shape == (5, 16)


def test_cleaner_words_are_independent():
    torch.manual_seed(0)
    c = Cleaner(CleanerConfig(word_dim=12, hidden_dim=20, num_words=5))
    x = torch.randn(2, 5, 12)
    y = x.clone()
    y[:, 3] += 1.0
    with torch.no_grad():
        a, b = c(x), c(y)
        ref = word_mlp(c.mlp, 2)(x[:, 2])
    changed = (a - b).abs().amax(dim=(0, 2)) > 0
    assert changed.tolist() == [False, False, False, True, False]
    torch.testing.assert_close(a[:, 2], ref, rtol=1e-5, atol=1e-5)
    linear = [lyr.weight.shape for lyr in c.mlp.layers if getattr(lyr, "weight", torch.empty(0)).ndim == 3]
    assert linear == [(5, 20, 12), (5, 20, 20), (5, 20, 20), (5, 12, 20)]


def test_centre_crop_resize_matches_clip_processing():
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (120, 200, 3), dtype=np.uint8)
    x = preprocess([wide], size=224, device="cpu")
    assert x.shape == (1, 3, 224, 224)
    # reference: PIL centre square, bicubic resize to 224, /255, CLIP mean/std
    square = np.array(Image.fromarray(wide[:, 40:160]).resize((224, 224), Image.BICUBIC))
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    ref = (torch.from_numpy(square).permute(2, 0, 1).float() / 255 - mean) / std
    assert ((x[0] - ref) * std * 255).abs().max() < 1.01  # within one grey level of PIL
    # "center" ignores what lies outside the centre square, "full" does not
    edited = wide.copy()
    edited[:, :40] = 0
    assert torch.equal(preprocess([edited], device="cpu"), x)
    full = preprocess([wide], layout="full", device="cpu")
    assert not torch.equal(preprocess([edited], layout="full", device="cpu"), full)


def test_preprocess_accepts_mixed_sizes_and_float_batches():
    rng = np.random.default_rng(1)
    ims = [rng.integers(0, 256, s, dtype=np.uint8) for s in [(30, 50, 3), (64, 64, 3), (80, 20, 3)]]
    x = preprocess(ims, size=32, device="cpu")
    assert x.shape == (3, 3, 32, 32)
    batch = torch.from_numpy(np.stack([ims[1]])).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(preprocess(batch, size=32, device="cpu"), x[1:2])
    with pytest.raises(ValueError):
        preprocess([np.zeros((4, 4), np.uint8)], device="cpu")
