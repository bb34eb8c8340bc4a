"""Dynamic aggregation: matching finds the right places, transfer and fusion behave, gradients flow."""

import itertools

import numpy as np

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tdr.guided.aggregation import AggregationConfig, DynamicAggregation, guidance_box, input_to_guidance
from tdr.guided.aggregation import search as search_mod
from tdr.guided.aggregation import transfer as transfer_mod
from tdr.guided.aggregation.geometry import grid
from tdr.guided.backbones import build_backbone

torch.set_num_threads(1)


def texture(b, h, w, seed=0):
    """(b,3,h,w) in [0,1]: smooth random texture with detail at several scales."""
    g = torch.Generator().manual_seed(seed)
    img = 0
    for s in (2, 4, 8, 16):
        n = torch.rand(b, 3, h // s + 2, w // s + 2, generator=g)
        up = F.interpolate(n, size=(h + 2 * s, w + 2 * s), mode="bicubic", align_corners=False)
        img = img + up[..., s:s + h, s:s + w]
    return ((img - img.amin()) / (img.amax() - img.amin())).clamp(0, 1)


def make_agg(levels=2, **config):
    """Exact-match tests read whole-cell matches: transfer="patch" unless asked otherwise; the prior
    search unless asked otherwise (these tests place the guidance by a known box)."""
    config.setdefault("transfer", "patch")
    config.setdefault("search", "prior")
    torch.manual_seed(0)
    points = {f"enc{i}": (i, 8 * 2 ** i) for i in range(levels)} | {"mid": (levels, 8 * 2 ** levels)}
    return DynamicAggregation(levels, points, lambda c, level: nn.Identity(), config=AggregationConfig(nf=8, **config))


def share_within(matches, true_g, tol, region=None):
    """Share of valid cells (inside ``region`` if given) whose match lies within ``tol`` guidance pixels."""
    ok = matches.valid if region is None else matches.valid & region
    close = (matches.g_yx - true_g).abs().amax(1, keepdim=True) <= tol
    return float((close & ok).sum() / ok.sum())


def interior(matches, hw, margin):
    y, x = matches.x_yx[:, :1], matches.x_yx[:, 1:]
    return (y > margin) & (x > margin) & (y < hw[0] - margin) & (x < hw[1] - margin)


@pytest.mark.parametrize("search", ["prior", "global", "masa"])
def test_guidance_equal_to_input_matches_identity(search):
    x = texture(2, 96, 128)
    a = make_agg(search=search, layout="full")
    a.prepare(x, x, (96, 128))
    m = a.last_matches
    assert m.stride == 4 and m.g_yx.shape == (2, 2, 24, 32)
    # exact away from the frame's edge, where the image features' gradients and normalisation differ
    assert share_within(m, m.x_yx, 1e-3, interior(m, (96, 128), 8)) == 1.0
    assert share_within(m, m.x_yx, 1e-3) > 0.99
    assert torch.all(m.score[m.valid & interior(m, (96, 128), 8)] > 0.999)
    sub = make_agg(search=search, layout="full", transfer="bilinear")
    sub.prepare(x, x, (96, 128))
    assert share_within(sub.last_matches, m.x_yx, 0.5) > 0.97  # sub-cell estimates stay near the identity


@pytest.mark.parametrize("search", ["prior", "global", "masa"])
def test_shifted_guidance_gives_the_shift(search):
    big = texture(2, 256, 320, seed=1)
    H, W = 192, 256
    x = big[..., 16:16 + H, 16:16 + W]
    g = big[..., 8:8 + H, 4:4 + W]  # x's content at p sits at p + (8, 12) in g (2, 3 match cells)
    a = make_agg(search=search, layout="full", penalty=0.0)
    a.prepare(x, g, (H, W))
    m = a.last_matches
    truth = m.x_yx + torch.tensor([8.0, 12.0]).view(1, 2, 1, 1)
    if search == "global":  # placed by coarse 8-px cells, refined at 4-px cells: within a match cell
        assert share_within(m, truth, 4.0, interior(m, (H, W), 32)) > 0.99
        return
    assert share_within(m, truth, 1e-3, interior(m, (H, W), 32)) == 1.0  # away from border effects
    if search == "prior":
        assert share_within(m, truth, 1e-3, interior(m, (H, W), 16)) > 0.95
        # the default pull towards the expected place (zero displacement) gives up exactness only where
        # the exact match is not clearly better; the rest move towards the prior, not elsewhere
        pulled = make_agg(search=search, layout="full")
        pulled.prepare(x, g, (H, W))
        pm = pulled.last_matches
        inner = interior(pm, (H, W), 32) & pm.valid
        assert share_within(pm, truth, 1e-3, inner) > 0.8
        moved = (pm.g_yx - pm.x_yx).abs().amax(1, keepdim=True)
        assert bool((moved[inner] <= 12.0 + 1e-3).all())


def test_resized_guidance_full_layout_prior():
    x = texture(2, 96, 128)
    g = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    a = make_agg(layout="full")
    a.prepare(x, g, (96, 128))
    m = a.last_matches
    truth = input_to_guidance(m.x_yx, guidance_box("full", (96, 128), batch=2), (64, 64))
    assert share_within(m, truth, 0.5 * 4 * 64 / 96 + 1e-3) == 1.0  # within half a match cell


def test_center_square_layout_prior():
    x = texture(2, 96, 128)
    g = F.interpolate(x[..., :, 16:112], size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    a = make_agg(layout="center")
    a.prepare(x, g, (96, 128))
    m = a.last_matches
    # cells outside the centre square have no guidance: invalid, zero score
    assert not m.valid[..., :4].any() and not m.valid[..., 28:].any() and m.valid[..., 6:26].all()
    assert torch.all(m.score[~m.valid] == 0)
    truth = input_to_guidance(m.x_yx, guidance_box("center", (96, 128), batch=2), (64, 64))
    away_from_edges = (m.x_yx[:, 1:] > 16 + 8) & (m.x_yx[:, 1:] < 112 - 8)
    assert share_within(m, truth, 0.5 * 4 * 64 / 96 + 1e-3, away_from_edges) == 1.0


def test_crop_box_maps_a_training_patch():
    frame = texture(1, 120, 160, seed=3)
    g = F.interpolate(frame[..., :, 20:140], size=(80, 80), mode="bilinear", antialias=True, align_corners=False)
    x = frame[..., 24:88, 40:136]  # a 64×96 training crop at (24, 40)
    box = guidance_box("center", (120, 160), crop_yx=(24, 40))
    a = make_agg()
    a.prepare(x, g, (64, 96), box)
    m = a.last_matches
    truth = input_to_guidance(m.x_yx, box, (80, 80))
    assert m.valid.all() and share_within(m, truth, 0.5 * 4 * 80 / 120 + 1e-3, interior(m, (64, 96), 8)) == 1.0


@pytest.mark.parametrize("search", ["prior", "global", "masa"])
def test_odd_and_mismatched_sizes(search):
    a = make_agg(levels=3, search=search)
    x, g = torch.rand(2, 3, 40, 56), torch.rand(2, 3, 64, 48)  # 37×53 padded to multiples of 8
    aligned = a.prepare(x, g, (37, 53))
    assert [t.shape for t in aligned] == [(2, 8 * 2 ** l, 40 // 2 ** l, 56 // 2 ** l) for l in range(4)]
    for g in (torch.rand(2, 3, 5, 300), torch.rand(2, 3, 700, 20)):  # extreme aspect ratios, tiny and huge
        assert a.prepare(x, g, (37, 53))[0].shape == (2, 8, 40, 56)


def test_finer_match_level_transfers_to_coarser_levels():
    a = make_agg(levels=3, match_level=1)
    x = texture(1, 64, 64)
    aligned = a.prepare(x, x, (64, 64))
    margin = a._margin()  # G (and X with it) is encoded in a frame grown by the search margin
    assert margin > 0
    feats = a.encoder(F.pad(x, (margin,) * 4, mode="replicate"))
    for level in range(4):  # identity match: transfer returns G's own features times the score (≈ 1)
        m = margin // 2 ** level
        assert torch.allclose(aligned[level], feats[level][..., m:-m, m:-m], atol=1e-4)


def test_bilinear_transfer_reproduces_integer_and_sub_cell_shifts():
    feat = torch.randn(1, 4, 32, 40)
    h, w = 8, 10  # flow found two levels coarser: 4 pixels of this level per cell
    ones = torch.ones(1, 1, h, w)
    same = transfer_mod.transfer_bilinear(feat, torch.zeros(1, 2, h, w), ones, 2)
    assert torch.allclose(same, feat, atol=1e-6)
    flow = torch.zeros(1, 2, h, w)
    flow[:, 0], flow[:, 1] = 0.5, -0.25  # half a cell down, a quarter cell left: (2, -1) level pixels
    moved = transfer_mod.transfer_bilinear(feat, flow, ones, 2)
    assert torch.allclose(moved[..., :-2, 1:], feat[..., 2:, :-1], atol=1e-6)
    assert torch.all(moved[..., -2:, :] == 0)  # sources below G read zeros
    coarse = transfer_mod.transfer_bilinear(feat[..., ::4, ::4].contiguous(), 2 * flow, ones, -1)  # one level up
    assert coarse.shape == (1, 4, 4, 5)


def test_sub_cell_displacement_beats_whole_cells():
    big = texture(1, 192, 224, seed=1)
    x = big[..., 32:160, 32:192]
    errors = {}
    for transfer in ("patch", "bilinear"):
        err = []
        for dy, dx in [(6, 2), (5, 3), (1, 7), (3, 5)]:  # x's content at p lies at p − d in g
            g = big[..., 32 + dy:160 + dy, 32 + dx:192 + dx]
            a = make_agg(layout="full", penalty=0.0, match_features="image", transfer=transfer)
            a.prepare(x, g, (128, 160))
            m = a.last_matches
            inner = interior(m, (128, 160), 24) & m.valid
            d = (m.g_yx - m.x_yx)[inner.expand(-1, 2, -1, -1)].view(2, -1)
            err.append(float((d + torch.tensor([[dy], [dx]])).abs().mean()))
        errors[transfer] = sum(err) / len(err)
    assert errors["bilinear"] < 0.75 * errors["patch"], errors


def test_transfer_identity_and_shift_reproduce_features():
    feat = torch.randn(1, 4, 16, 20)
    h, w = 4, 5  # match level two levels coarser: s = 4
    ones = torch.ones(1, 1, h, w)
    same = transfer_mod.transfer_patch(feat, torch.zeros(1, 2, h, w), ones, 2)
    assert torch.allclose(same, feat)
    disp = torch.zeros(1, 2, h, w, dtype=torch.long)
    disp[:, 1] = 1  # every cell matched one cell to the right → features move left by s = 4 pixels
    moved = transfer_mod.transfer_patch(feat, disp.float(), ones, 2)
    assert torch.allclose(moved[..., :, :12], feat[..., :, 4:16])


# -- vectorised search equals a slow per-block reference loop -----------------------------------
def _cos_patch(fx, py, px, fg, qy, qx, d=1, replicate_x=False):
    """Cosine of zero-padded (dilated) 3×3 patches, one pair at a time; ``replicate_x``: X's patch
    repeats X's edge pixels instead."""
    def patch(f, y, x, edge):
        out = torch.zeros(f.shape[0], 3, 3, dtype=f.dtype)
        for u, v in itertools.product(range(3), range(3)):
            yy, xx = y + (u - 1) * d, x + (v - 1) * d
            if edge:
                yy, xx = min(max(yy, 0), f.shape[1] - 1), min(max(xx, 0), f.shape[2] - 1)
            if 0 <= yy < f.shape[1] and 0 <= xx < f.shape[2]:
                out[:, u, v] = f[:, yy, xx]
        return out.flatten()
    a, b = patch(fx, py, px, replicate_x), patch(fg, qy, qx, False)
    return float(a @ b / (a.norm().clamp_min(1e-12) * b.norm().clamp_min(1e-12)))


def _reference_search(fx, fg, k, dilations, scale=1.5):
    """Paper's global search written as plain loops over blocks, positions and candidates (one sample)."""
    C, h, w = fx.shape
    hg, wg = fg.shape[1:]
    nby, nbx = -(-h // k), -(-w // k)
    q = torch.zeros(2, h, w, dtype=torch.long)
    for by, bx in itertools.product(range(nby), range(nbx)):
        y0, x0 = by * k, bx * k
        cy, cx = y0 + (min(k, h - y0) - 1) // 2, x0 + (min(k, w - x0) - 1) // 2
        scores = torch.tensor([[sum(_cos_patch(fx, cy, cx, fg, gy, gx, d) for d in dilations)
                                for gx in range(wg)] for gy in range(hg)])
        gy, gx = divmod(int(scores.argmax()), wg)
        dy = min(hg, 2 * int(hg / (2 * nby) * scale) + 1)
        dx = min(wg, 2 * int(wg / (2 * nbx) * scale) + 1)
        oy, ox = min(max(gy - dy // 2, 0), hg - dy), min(max(gx - dx // 2, 0), wg - dx)
        for py, px in itertools.product(range(y0, min(y0 + k, h)), range(x0, min(x0 + k, w))):
            best, arg = -float("inf"), None
            for ty, tx in itertools.product(range(oy, oy + dy), range(ox, ox + dx)):
                c = _cos_patch(fx, py, px, fg, ty, tx, replicate_x=True)
                if c > best:
                    best, arg = c, (ty, tx)
            q[:, py, px] = torch.tensor(arg)
    return q


def _reference_prior(fx, fg, radius, vote, penalty, margin):
    """Prior search as plain loops (one sample): X's patch at p against G's at p + d + margin over the
    cells inside X; coarse d by the mean cosine over the vote window, then the best d within ±1 of it."""
    C, h, w = fx.shape
    hg, wg = fg.shape[1:]
    offsets = list(itertools.product(range(-radius, radius + 1), repeat=2))

    def ok(py, px, d):
        return 0 <= py + d[0] + margin < hg and 0 <= px + d[1] + margin < wg

    def cos(py, px, d):
        num, nx, ng = 0.0, 0.0, 0.0
        for oy, ox in itertools.product((-1, 0, 1), repeat=2):
            y, x = py + oy, px + ox
            if not (0 <= y < h and 0 <= x < w):
                continue
            a = fx[:, y, x]
            ty, tx = y + d[0] + margin, x + d[1] + margin
            b = fg[:, ty, tx] if 0 <= ty < hg and 0 <= tx < wg else torch.zeros_like(a)
            num, nx, ng = num + float(a @ b), nx + float(a @ a), ng + float(b @ b)
        return num / (max(nx, 1e-12) ** 0.5 * max(ng, 1e-12) ** 0.5)

    pen = {d: penalty * (d[0] ** 2 + d[1] ** 2) ** 0.5 for d in offsets}
    cache = {(py, px, d): cos(py, px, d) if ok(py, px, d) else 0.0
             for py in range(h) for px in range(w) for d in offsets}
    q = torch.zeros(2, h, w, dtype=torch.long)
    r = vote // 2
    for py, px in itertools.product(range(h), range(w)):
        window = [(y, x) for y in range(py - r, py + r + 1) for x in range(px - r, px + r + 1)
                  if 0 <= y < h and 0 <= x < w]
        votes = {d: sum(cache[y, x, d] for y, x in window) / len(window) - pen[d] for d in offsets if ok(py, px, d)}
        coarse = max(votes, key=lambda d: (votes[d], -offsets.index(d)))
        cands = {d: cache[py, px, d] - pen[d] for d in offsets
                 if ok(py, px, d) and abs(d[0] - coarse[0]) <= 1 and abs(d[1] - coarse[1]) <= 1}
        d = max(cands, key=lambda d: (cands[d], -offsets.index(d)))
        q[:, py, px] = torch.tensor([py + d[0] + margin, px + d[1] + margin])
    return q


def test_vectorised_global_search_equals_reference_loop():
    torch.manual_seed(1)
    fx = torch.randn(2, 6, 11, 13, dtype=torch.float64)
    fg = torch.randn(2, 6, 9, 17, dtype=torch.float64)
    fg[1, :, 2:9, 3:10] = fx[1, :, 1:8, 2:9]  # one sample with a real correspondence
    k, dil = 4, (1, 2)
    with torch.no_grad():
        centres = search_mod.coarse_blocks(fx, fg, k, dil, budget=50)  # tiny budget: many chunks
        origins, win = search_mod.block_windows(centres, *fg.shape[-2:], 1.5)
        q = search_mod.fine_in_windows(fx, fg, origins, win, k, budget=5000)
    for b in range(2):
        assert torch.equal(q[b], _reference_search(fx[b], fg[b], k, dil))


@pytest.mark.parametrize("vote, penalty, margin", [(1, 0.0, 0), (3, 0.05, 1), (5, 0.02, 2)])
def test_prior_search_equals_reference_loop(vote, penalty, margin):
    torch.manual_seed(2)
    fx = torch.randn(2, 5, 9, 11, dtype=torch.float64)
    fg = torch.randn(2, 5, 9 + 2 * margin, 11 + 2 * margin, dtype=torch.float64)
    fg[1, :, margin + 1:margin + 8, margin + 2:margin + 10] = fx[1, :, 0:7, 1:9]  # shift (1, 1) in sample 1
    with torch.no_grad():
        q = search_mod.local_search(fx, fg, AggregationConfig(radius=2, vote=vote, penalty=penalty), margin)
    for b in range(2):
        assert torch.equal(q[b], _reference_prior(fx[b], fg[b], 2, vote, penalty, margin))
    shift = q[1] - grid(9, 11, "cpu")[0] - margin
    assert (shift[:, 2:6, 3:8] == 1).all()  # the real correspondence is found


def test_many_blocks_at_once_bounded_chunks():
    # 48×64 match map, 4×4 blocks → 192 blocks; a small budget forces several chunks, same answer
    fx, fg = torch.randn(1, 8, 48, 64), torch.randn(1, 8, 48, 64)
    origins, win = search_mod.block_windows(torch.randint(0, 48, (1, 12, 16, 2)), 48, 64, 1.5)
    one = search_mod.fine_in_windows(fx, fg, origins, win, 4, budget=1 << 30)
    many = search_mod.fine_in_windows(fx, fg, origins, win, 4, budget=20000)
    assert torch.equal(one, many)


def test_training_crop_matches_outside_its_frame():
    # the guidance shows the frame moved by (8, 12) px; a crop's edge cells have their true match
    # outside the crop, which the search margin around the crop's frame makes reachable
    frame = texture(1, 160, 192, seed=4)
    moved = torch.roll(frame, (8, 12), (2, 3))
    box = guidance_box("full", (160, 192), crop_yx=(48, 64))
    x = frame[..., 48:112, 64:128]
    a = make_agg(layout="full", penalty=0.0)
    a.prepare(x, moved, (64, 64), box)
    m = a.last_matches
    truth = input_to_guidance(m.x_yx + torch.tensor([8.0, 12.0]).view(1, 2, 1, 1), box, (160, 192))
    assert m.valid.all() and share_within(m, truth, 1e-3) > 0.95
    edge = ~interior(m, (64, 64), 12)
    assert share_within(m, truth, 1e-3, edge) > 0.9


# -- fusion: α = 0 keeps the backbone, gradients reach α, B and the encoder ---------------------
@pytest.mark.parametrize("name", ["nafnet-test", "restormer-test"])
def test_alpha_zero_keeps_backbone_output(name):
    torch.manual_seed(0)
    guided = build_backbone(name, guided=True).eval()
    torch.manual_seed(0)
    plain = build_backbone(name, guided=False).eval()
    plain.load_state_dict(guided.backbone_state_dict())
    x, g = torch.rand(1, 3, 37, 53), torch.rand(1, 3, 512, 512)
    with torch.no_grad():
        assert torch.equal(guided(x, g), plain(x))


@pytest.mark.parametrize("transfer", ["patch", "bilinear"])
def test_gradients_reach_alpha_block_and_encoder(transfer):
    torch.manual_seed(0)
    config = AggregationConfig(alpha_init=0.1, match_level=2, transfer=transfer)
    model = build_backbone("nafnet-test", guided=True, aggregation=config)
    model.train()
    x, g = texture(2, 48, 64), texture(2, 64, 64, seed=5)
    model(x, g).abs().mean().backward()
    agg = model.agg
    assert set(agg.fusions) == {"enc0", "enc1", "enc2", "enc3", "mid", "dec0", "dec1", "dec2", "dec3"}
    for name, fusion in agg.fusions.items():
        assert fusion.alpha.grad.abs().sum() > 0, name
        assert fusion.reduce.weight.grad.abs().sum() > 0, name
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in fusion.block.parameters()), name
    for name, p in agg.encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert {id(p) for p in model.aggregation_parameters()} == {id(p) for p in agg.parameters()}


def test_alpha_starts_at_zero_and_gets_gradient():
    model = build_backbone("nafnet-test", guided=True).train()
    model(texture(1, 32, 32), texture(1, 40, 40)).mean().backward()
    for fusion in model.agg.fusions.values():
        assert torch.all(fusion.alpha == 0) and fusion.alpha.grad.abs().sum() > 0


@pytest.mark.parametrize("fuse,expected", [("enc", {"enc0", "enc1", "enc2", "mid"}), ("dec", {"dec0", "dec1", "dec2"}),
                                           ("enc+dec", {"enc0", "enc1", "enc2", "mid", "dec0", "dec1", "dec2"})])
def test_fuse_sides(fuse, expected):
    model = build_backbone("restormer-test", guided=True, aggregation=AggregationConfig(fuse=fuse))
    assert set(model.agg.fusions) == expected
    with pytest.raises(ValueError, match="enc\\+dec"):
        AggregationConfig(fuse="both")


def test_config_errors_name_the_choices():
    with pytest.raises(ValueError, match="global, prior, masa"):
        AggregationConfig(search="local")
    with pytest.raises(ValueError, match="center, full"):
        guidance_box("middle", (10, 10))
    with pytest.raises(ValueError, match="bilinear, patch"):
        AggregationConfig(transfer="nearest")
    with pytest.raises(ValueError, match="image, encoder"):
        AggregationConfig(match_features="pixels")
    with pytest.raises(ValueError, match="vote must be an odd number"):
        AggregationConfig(vote=8)


def test_checkpointed_fusion_gives_the_same_gradients():
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        config = AggregationConfig(alpha_init=0.1, checkpoint_fusion=recompute)
        model = build_backbone("nafnet-test", guided=True, aggregation=config).train()
        model(texture(1, 32, 48), texture(1, 40, 40, seed=2)).abs().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_matching_runs_in_float32_under_autocast():
    # bf16 autocast (GPU training) must not coarsen the matching: same matches and sub-cell placement
    big = texture(1, 160, 192, seed=6)
    x, g = big[..., 16:112, 24:152], big[..., 21:117, 27:155]  # shifted by (5, 3) px: sub-cell at 4-px cells
    a = make_agg(layout="full", transfer="bilinear")
    with torch.no_grad():
        ref = a.prepare(x, g, (96, 128))
        m32 = a.last_matches
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = a.prepare(x, g, (96, 128))
        m16 = a.last_matches
    assert torch.equal(m32.g_yx, m16.g_yx)
    assert all(t.dtype == torch.float32 for t in low)  # transferred features sampled in float32
    assert torch.allclose(ref[0], low[0], atol=0.05)  # only the encoder itself ran in bf16


# -- content views: same content, other geometry ------------------------------------------------
def _photo(h=224, w=320):
    """A natural photograph (scikit-image's bundled 'coffee'), (h,w,3) uint8."""
    from PIL import Image
    from skimage import data
    return np.array(Image.fromarray(data.coffee()).resize((w, h), Image.Resampling.BICUBIC))


@pytest.mark.parametrize("mirror", [0.0, 1.0])
def test_global_search_finds_a_content_view(mirror):
    """The clean image moved by a quarter of the frame, rescaled and (or not) mirrored: the global search
    on image features (no training) matches most positions within 8 px of their true source; the prior
    search, which assumes the layout box places the content, does not."""
    from tdr.guided.synthetic import ViewRanges, content_view, match_hits

    clean = _photo()
    ranges = ViewRanges(shift=(0.25, 0.25), scale=(1.2, 1.2), mirror=mirror)
    guide, A = content_view(clean, np.random.default_rng(3), ranges)
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 8, clean.shape), 0, 255)  # a degraded input
    x = torch.from_numpy(noisy.transpose(2, 0, 1)).float()[None] / 255
    g = torch.from_numpy(guide.transpose(2, 0, 1)).float()[None] / 255
    shares = {}
    for search in ("global", "prior"):
        a = make_agg(levels=4, search=search, transfer="bilinear")
        with torch.no_grad():
            a.prepare(x, g, (224, 320))
        hits, scored = match_hits(a.last_matches, A, (4, 8))
        shares[search] = hits / scored
    assert shares["global"][1] > 0.6, shares
    assert shares["prior"][1] < 0.2, shares


def test_positions_outside_the_centre_square_draw_from_guidance():
    """"center" guidance is about the frame's centre square, but generated content can show anything in
    it: positions left and right of the square are valid, get a score, and find their content (the
    matching itself: the mutual test, off here, weights matches and does not move them)."""
    from tdr.guided.synthetic import ViewRanges, content_view, match_hits

    clean = _photo(192, 384)  # the centre square is the middle half
    guide, A = content_view(clean, np.random.default_rng(1), ViewRanges(shift=(0.0, 0.0), scale=(0.7, 0.7), mirror=0.0))
    x = torch.from_numpy(clean.transpose(2, 0, 1)).float()[None] / 255
    g = torch.from_numpy(guide.transpose(2, 0, 1)).float()[None] / 255
    a = make_agg(levels=4, search="global", transfer="bilinear", mutual=())
    with torch.no_grad():
        aligned = a.prepare(x, g, (192, 384))
    m = a.last_matches
    outside = (m.x_yx[:, 1:] < 96) | (m.x_yx[:, 1:] > 288)
    assert m.valid[outside].all() and (m.score[outside] != 0).float().mean() > 0.9
    assert aligned[0][..., :, :96].abs().sum() > 0  # features transferred to the left of the square
    m.valid = m.valid & outside
    hits, scored = match_hits(m, A, (8,))
    assert scored > 500 and hits[0] / scored > 0.6, (hits, scored)


def _reference_coarse_vote(fx, fg, ok_x, ok_g, vote):
    """The global search's coarse vote as plain loops (one sample): score of every (version, d) at p, the
    mean over p's vote² window (all of X when X is no larger than the window)."""
    C, h, w = fx.shape
    V, _, hg, wg = fg.shape
    r = vote // 2
    gnorm = search_mod.patch_norm(fg)[:, 0]
    scores = {}
    for v in range(V):
        for dy, dx in itertools.product(range(-(h - 1), hg), range(-(w - 1), wg)):
            cos = torch.zeros(h, w, dtype=fx.dtype)
            for py, px in itertools.product(range(h), range(w)):
                qy, qx = py + dy, px + dx
                if not (0 <= qy < hg and 0 <= qx < wg and ok_g[v, 0, qy, qx]):
                    continue
                num, nx = 0.0, 0.0
                for oy, ox in itertools.product((-1, 0, 1), repeat=2):
                    y, x = py + oy, px + ox
                    if 0 <= y < h and 0 <= x < w:
                        b = fg[v, :, y + dy, x + dx] if 0 <= y + dy < hg and 0 <= x + dx < wg else torch.zeros(C, dtype=fx.dtype)
                        num, nx = num + float(fx[:, y, x] @ b), nx + float(fx[:, y, x] @ fx[:, y, x])
                cos[py, px] = num / (max(nx, 1e-24) ** 0.5 * float(gnorm[v, qy, qx]))
            for py, px in itertools.product(range(h), range(w)):
                qy, qx = py + dy, px + dx
                if not (0 <= qy < hg and 0 <= qx < wg and ok_g[v, 0, qy, qx]):
                    continue
                win = [(y, x) for y in range(py - r, py + r + 1) for x in range(px - r, px + r + 1)
                       if 0 <= y < h and 0 <= x < w]
                if max(h, w) <= vote:  # X no larger than the template: X is the template
                    win = list(itertools.product(range(h), range(w)))
                scores[v, dy, dx, py, px] = sum(float(cos[y, x]) for y, x in win if ok_x[0, 0, y, x]) \
                    / sum(bool(ok_x[0, 0, y, x]) for y, x in win)
    return scores


def test_coarse_vote_equals_reference_loop():
    torch.manual_seed(4)
    fx = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    fg = torch.randn(2, 2, 3, 5, 6, dtype=torch.float64)
    fg[1, 1, :, 1:5, 1:6] = fx[1, :, :, :]  # sample 1 has its X inside version 1 at d = (1, 1)
    ok_x = torch.ones(1, 1, 4, 5, dtype=torch.bool)
    ok_x[..., -1] = False  # the padded column is no part of the input
    ok_g = torch.ones(2, 2, 1, 5, 6, dtype=torch.bool)
    ok_g[:, 0, :, :, -2:] = False  # version 0 is narrower
    best, version, d = search_mod.coarse_vote(fx, fg, ok_x, ok_g, 3)
    one_row = search_mod.coarse_vote(fx, fg, ok_x, ok_g, 3, budget=1)  # one displacement row per chunk
    assert torch.equal(one_row[0], best) and torch.equal(one_row[1], version) and torch.equal(one_row[2], d)
    for b in range(2):
        ref = _reference_coarse_vote(fx[b], fg[b], ok_x, ok_g[b], 3)
        for py, px in itertools.product(range(4), range(5)):
            here = {k[:3]: s for k, s in ref.items() if k[3:] == (py, px)}
            top = max(here, key=here.get)
            assert best[b, py, px].item() == pytest.approx(here[top], abs=1e-9)
            assert (int(version[b, py, px]), int(d[b, 0, py, px]), int(d[b, 1, py, px])) == top
    assert (version[1, :, :4] == 1).all() and (d[1, :, :, :4] == 1).all()  # the real correspondence


def test_coarse_vote_whole_window_shortcut_agrees():
    """A crop no larger than the template (training crops) is its own template: every cell takes the
    reference's best (version, displacement) over all cells, with X's padding cells, a narrower version
    of G and two samples."""
    torch.manual_seed(5)
    fx, fg = torch.randn(2, 3, 3, 4, dtype=torch.float64), torch.randn(2, 2, 3, 5, 6, dtype=torch.float64)
    fg[1, 1, :, 2:5, 1:5] = fx[1]  # sample 1 has its X inside version 1 at d = (2, 1)
    ok_x, ok_g = torch.ones(1, 1, 3, 4, dtype=torch.bool), torch.ones(2, 2, 1, 5, 6, dtype=torch.bool)
    ok_x[..., -1] = False
    ok_g[:, 0, :, :, -2:] = False
    fast = search_mod.coarse_vote(fx, fg, ok_x, ok_g, 5)
    for b in range(2):
        ref = _reference_coarse_vote(fx[b], fg[b], ok_x, ok_g[b], 5)
        top = max(ref, key=ref.get)[:3]  # a (v, d)'s score is the same at every cell whose target is in G_v
        for py, px in itertools.product(range(3), range(4)):
            assert fast[0][b, py, px].item() == pytest.approx(max(ref.values()), abs=1e-9)
            assert (int(fast[1][b, py, px]), int(fast[2][b, 0, py, px]), int(fast[2][b, 1, py, px])) == top
    assert (fast[1][1, :, :3] == 1).all() and (fast[2][1, 0, :, :3] == 2).all() and (fast[2][1, 1, :, :3] == 1).all()


def _photo_and_views(h, w):
    """A photograph as input (1,3,h,w) and two 512² guidance tensors: its own content view ("same") and a
    content view of another photograph ("other")."""
    from PIL import Image
    from skimage import data

    from tdr.guided.synthetic import ViewRanges, content_view

    clean = _photo(h, w)
    other = np.array(Image.fromarray(data.astronaut()).resize((w, h), Image.Resampling.BICUBIC))
    chw = lambda img: torch.from_numpy(img.transpose(2, 0, 1)).float()[None] / 255  # noqa: E731
    return chw(clean), {name: chw(content_view(source, np.random.default_rng(2), ViewRanges())[0])
                        for name, source in (("same", clean), ("other", other))}


def test_agreement_channel_tells_shared_content_from_unrelated():
    """confidence=True: every transferred level carries one more channel, the matches' agreement in
    [-1, 1]; a content view of the input agrees more than a view of another photograph."""
    x, guides = _photo_and_views(192, 256)
    means = {}
    for name, g in guides.items():
        a = make_agg(levels=4, search="global", transfer="bilinear", confidence=True)
        with torch.no_grad():
            out = a.prepare(x, g, (192, 256))
        for level, f in enumerate(out):
            assert f.shape == (1, 8 * 2 ** level + 1, 192 // 2 ** level, 256 // 2 ** level)
            assert f[:, -1].abs().max() <= 1.0
        means[name] = float(out[2][:, -1].mean())
    assert means["same"] > means["other"] + 0.1, means


def test_training_crop_with_its_frame_is_placed_as_the_frame_would_be():
    """With a Context the global search's coarse stage runs on the frame window around the crop, the
    whole window one template: the crop's pixels get exactly the G coordinates the window itself gets
    there (searched alone, the window no larger than the template); a window that is the crop itself
    changes nothing."""
    from tdr.guided.aggregation import Context

    cfg = AggregationConfig(coarse_vote=17)
    frame = texture(2, 160, 192, seed=6)
    g = F.interpolate(texture(2, 200, 200, seed=7), size=(512, 512), mode="bilinear", align_corners=False)
    wy, wx, (H, W), (y, x), (h, w), m = 16, 32, (128, 128), (24, 40), (48, 64), 16
    window = frame[..., wy:wy + H, wx:wx + W]
    crop = window[..., y:y + h, x:x + w]

    def box(yx):
        return guidance_box("center", (160, 192), crop_yx=yx, batch=2)

    whole = search_mod.place_global(window, g, box((wy, wx)), cfg, m)
    yx = torch.tensor([[y, x], [y, x]])
    placed = search_mod.place_global(crop, g, box((wy + y, wx + x)), cfg, m, Context(window, yx))
    assert torch.equal(placed.coords, whole.coords[..., y:y + h + 2 * m, x:x + w + 2 * m])
    assert torch.allclose(placed.g, whole.g[..., y:y + h + 2 * m, x:x + w + 2 * m], atol=1e-6)
    alone = search_mod.place_global(crop, g, box((wy + y, wx + x)), cfg, m)
    itself = search_mod.place_global(crop, g, box((wy + y, wx + x)), cfg, m, Context(crop, torch.zeros(2, 2)))
    assert torch.equal(alone.coords, itself.coords)


def test_the_frame_around_a_training_crop_finds_its_content_view():
    """64² crops of a photograph whose content view (moved, rescaled, mirrored) is the guidance: crops
    searched within the 128² frame window around them are matched within 8 px far more often than
    crops searched alone (no training, image features)."""
    from tdr.guided.aggregation import Context
    from tdr.guided.synthetic import ViewRanges, content_view, match_hits

    clean = _photo()
    ranges = ViewRanges(shift=(0.25, 0.25), scale=(0.8, 0.8), mirror=1.0)
    guide, A = content_view(clean, np.random.default_rng(3), ranges)
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 8, clean.shape), 0, 255)
    x = torch.from_numpy(noisy.transpose(2, 0, 1)).float()[None] / 255
    g = torch.from_numpy(guide.transpose(2, 0, 1)).float()[None] / 255
    a = make_agg(levels=4, search="global", transfer="bilinear")
    hits = {False: np.zeros(1), True: np.zeros(1)}
    scored = {False: 0, True: 0}
    for top, left in itertools.product((8, 80, 152), (16, 128, 240)):
        cy, cx = min(max(top - 32, 0), 224 - 128), min(max(left - 32, 0), 320 - 128)
        ctx = Context(x[..., cy:cy + 128, cx:cx + 128], torch.tensor([[top - cy, left - cx]]))
        for with_frame in (False, True):
            with torch.no_grad():
                a.prepare(x[..., top:top + 64, left:left + 64], g, (64, 64),
                          guidance_box("center", (224, 320), crop_yx=(top, left)), ctx if with_frame else None)
            h, n = match_hits(a.last_matches, A, (8,), crop_yx=(top, left))
            hits[with_frame], scored[with_frame] = hits[with_frame] + h, scored[with_frame] + n
    alone, framed = hits[False][0] / scored[False], hits[True][0] / scored[True]
    assert scored[True] > 300 and framed > 0.6 and framed > alone + 0.1, (alone, framed)


def test_shut_gate_makes_the_guided_model_the_plain_one():
    """gate: where the matches' agreement is below the gate's low end the fusion adds nothing, whatever α:
    a gate no match reaches gives the plain backbone's output, and nothing guidance-side gets a gradient
    (a run on unrelated guidance trains the backbone as an unguided run would)."""
    torch.manual_seed(0)
    guided = build_backbone("nafnet-test", guided=True,
                            aggregation=AggregationConfig(gate=(0.999, 1.0), alpha_init=0.5)).train()
    torch.manual_seed(0)
    plain = build_backbone("nafnet-test", guided=False).train()
    plain.load_state_dict(guided.backbone_state_dict())
    x, g = texture(2, 48, 64), texture(2, 96, 96, seed=3)
    out = guided(x, g)
    assert torch.equal(out, plain(x))
    out.abs().mean().backward()
    for name, fusion in guided.agg.fusions.items():
        assert fusion.alpha.grad is None or fusion.alpha.grad.abs().sum() == 0, name
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in fusion.block.parameters()), name
    open_gate = build_backbone("nafnet-test", guided=True,
                               aggregation=AggregationConfig(gate=(-1.0, -0.999), alpha_init=0.5)).train()
    open_gate.load_state_dict(guided.state_dict())
    assert not torch.equal(open_gate(x, g), out)  # a gate every match passes leaves the fusion on


def test_gate_opens_on_shared_content_and_stays_shut_on_unrelated():
    """The default-style gate (agreement ramped 0.4 → 0.6) on a photograph: its content view opens the
    fusion at most positions, a view of another photograph at few."""
    from tdr.guided.aggregation.modules import Aligned

    x, guides = _photo_and_views(192, 256)
    open_share = {}
    for name, g in guides.items():
        a = make_agg(levels=4, search="global", transfer="bilinear", gate=(0.4, 0.6))
        with torch.no_grad():
            out = a.prepare(x, g, (192, 256))
        assert isinstance(out, Aligned) and len(out.gates) == len(out) == 5
        for level, (f, gate) in enumerate(zip(out, out.gates)):
            assert gate.shape == (1, 1, 192 // 2 ** level, 256 // 2 ** level)
            assert gate.min() >= 0.0 and gate.max() <= 1.0
        open_share[name] = float((out.gates[2] > 0.5).float().mean())
    assert open_share["same"] > 0.6 and open_share["other"] < 0.3, open_share


def test_gate_setting_is_checked():
    for bad in ((0.6, 0.4), (0.5, 0.5), (-2.0, 0.5), (0.5,)):
        with pytest.raises(ValueError, match="gate"):
            AggregationConfig(gate=bad)


def test_guidance_dropout_switches_whole_samples_off_in_training_only():
    """drop: in training each sample's fusion branches are off together with probability ``drop`` (that
    sample's output is the plain backbone's), the others fused as usual; in evaluation never."""
    torch.manual_seed(0)
    guided = build_backbone("nafnet-test", guided=True,
                            aggregation=AggregationConfig(drop=0.5, alpha_init=0.5)).train()
    torch.manual_seed(0)
    plain = build_backbone("nafnet-test", guided=False).train()
    plain.load_state_dict(guided.backbone_state_dict())
    x, g = texture(8, 48, 64), texture(8, 96, 96, seed=3)
    torch.manual_seed(1)
    out = guided(x, g)
    off = [torch.allclose(out[i], plain(x[i:i + 1])[0], atol=1e-6) for i in range(8)]
    assert 0 < sum(off) < 8, off  # some samples dropped, some fused
    guided.eval()
    plain.eval()
    with torch.no_grad():
        fused = guided(x, g)
        assert not any(torch.allclose(fused[i], plain(x[i:i + 1])[0], atol=1e-6) for i in range(8))
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="drop"):
            AggregationConfig(drop=bad)


def test_cycle_gap_is_zero_where_matches_are_mutual_and_skips_invalid_positions():
    """cycle_gap: G = X matched to itself is mutual everywhere (gap 0); matched one cell off, G's patch
    finds its own place in X and the gap is how much better it matches there (the same searched back
    within a window that holds that place); positions marked invalid are never the better match."""
    from tdr.guided.aggregation.features import cycle_gap

    torch.manual_seed(0)
    fx = torch.randn(2, 6, 12, 16)
    p = grid(12, 16, "cpu").expand(2, -1, -1, -1)
    ok = torch.ones(1, 1, 12, 16, dtype=torch.bool)
    whole, near = cycle_gap(fx, fx, p, ok, rows=7, windows=(None, 3))
    assert whole.abs().max() < 1e-5 and near.abs().max() < 1e-5
    off = p.clone()
    off[:, 1] = (off[:, 1] + 1).clamp(max=15)
    gap, one = cycle_gap(fx, fx, off, ok, rows=7, windows=(None, 1))
    assert gap[..., :-1].min() > 0.05  # each G patch matches X one cell right better than at p
    assert torch.allclose(one, gap, atol=1e-5)  # its place lies within 1 cell
    far = p.clone()
    far[:, 1] = (far[:, 1] + 3).clamp(max=15)
    gap, (near,) = cycle_gap(fx, fx, far, ok, rows=5)[0], cycle_gap(fx, fx, far, ok, windows=(2,))
    assert gap[..., :-3].min() > 0.05  # G's patch comes from 3 cells right ...
    assert (near[..., :-3] < gap[..., :-3] - 0.05).all()  # ... which a ±2-cell search back cannot see
    only_here = torch.zeros(1, 1, 12, 16, dtype=torch.bool)
    only_here[..., 5, 7] = True
    assert cycle_gap(fx, fx, off, only_here)[0][..., 5, 7].abs().max() < 1e-6  # p the one valid position


def test_mutual_matches_keep_shared_content_and_drop_unrelated():
    """mutual: the transferred features are weighted by how mutual each match is — a content view of the
    input keeps far more of them than a view of another photograph."""
    x, guides = _photo_and_views(192, 256)
    kept = {}
    for name, g in guides.items():
        with torch.no_grad():
            plain = make_agg(levels=4, search="global", transfer="bilinear", mutual=()).prepare(x, g, (192, 256))
            mutual = make_agg(levels=4, search="global", transfer="bilinear", mutual=(0.03, 0.1),
                              mutual_fill=()).prepare(x, g, (192, 256))
        kept[name] = float(mutual[2].abs().mean() / plain[2].abs().mean())
    assert kept["same"] > 0.4 and kept["other"] < 0.15, kept
    for bad in ((0.1, 0.03), (-0.1, 0.1), (0.1,)):
        with pytest.raises(ValueError, match="mutual"):
            AggregationConfig(mutual=bad)


def test_mutual_fill_gives_the_guidance_colour_only_where_it_shows_the_scene():
    """mutual_fill: where matches are not mutual, G's mean features stand in, weighted by the sample's
    share of mutual matches — a content view of the input gets them, a view of another photograph not."""
    x, guides = _photo_and_views(192, 256)
    added = {}
    for name, g in guides.items():
        with torch.no_grad():
            local = make_agg(levels=4, search="global", transfer="bilinear", mutual_fill=()).prepare(x, g, (192, 256))
            filled = make_agg(levels=4, search="global", transfer="bilinear").prepare(x, g, (192, 256))  # defaults
        added[name] = float((filled[2] - local[2]).abs().mean() / local[2].abs().mean())
    assert added["same"] > 0.1 and added["other"] == 0.0, added
    for bad in dict(mutual_fill=(0.3, 0.2)), dict(mutual_fill=(0.1,)), dict(mutual_window=0):
        with pytest.raises(ValueError, match="mutual"):
            AggregationConfig(**bad)


def test_mutual_trust_transfers_every_match_only_where_the_guidance_shows_the_scene():
    """mutual_trust (with mutual, for the searches that do not know G's place): a sample
    whose share of mutual matches reaches the ramp's top transfers every match, as without the mutual
    test — a content view of the input does; a view of another photograph keeps only its mutual matches.
    The prior search (aligned guidance: its place is declared) does not put its matches to the test."""
    x, guides = _photo_and_views(192, 256)
    out = {}
    for name, g in guides.items():
        with torch.no_grad():
            out[name] = [make_agg(levels=4, search="global", transfer="bilinear", **kw).prepare(x, g, (192, 256))[2]
                         for kw in (dict(mutual=()), dict(mutual_fill=()),
                                    dict(mutual_fill=(), mutual_trust=(0.12, 0.24)))]
    plain, strict, trusted = out["same"]
    assert not torch.allclose(strict, plain, atol=1e-4)
    assert torch.allclose(trusted, plain, atol=1e-5)  # its scene: every match, as without mutual
    plain, strict, trusted = out["other"]
    assert torch.allclose(trusted, strict, atol=1e-5)  # another scene: only its mutual matches
    assert not torch.allclose(trusted, plain, atol=1e-4)
    g = guides["other"]
    with torch.no_grad():
        prior = [make_agg(levels=4, search="prior", transfer="bilinear", **kw).prepare(x, g, (192, 256))[2]
                 for kw in (dict(mutual=()), dict())]
    assert torch.equal(prior[0], prior[1])  # the defaults test nothing on the prior search
    for bad in dict(mutual_trust=(0.3, 0.2)), dict(mutual_trust=(0.1,)), dict(mutual=(0.1,)):
        with pytest.raises(ValueError, match="mutual"):
            AggregationConfig(**bad)
    AggregationConfig(mutual=())  # off: the default fill idle, not refused
