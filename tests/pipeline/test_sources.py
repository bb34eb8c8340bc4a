"""Guidance sources (textual, mapper-only, caption) through `tdr generate-guidance --source`: three groups in
one store, batch-size invariance per source, captions stored / exported / shown / edited, missing models."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from tdr.cache import captions, open_store
from tdr.cli import app
from tdr.pipeline.degradation_words import clean_caption
from tdr.pipeline.sources import source_of
from helpers import run

runner = CliRunner()
TINY = ["--preset", "tiny", "--steps", "2", "--size", "64", "--device", "cpu", "--dataset", "demo", "--split", "test"]
WORDS = ("a an the photo image picture of street cat dog car city road man at night with in and on "
         "blurry noisy rainy foggy hazy rain fog haze dark grainy").split()
# the fingerprint entries of textual guidance before sources existed: stores made then keep their group
TEXTUAL_KEYS = {"preset", "sd_model", "clip_model", "seed", "mapper", "cleaner", "scheduler", "dtype", "device_type",
                "model_seed", "steps", "scale", "layout", "noise", "size"}



@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    """A tiny random BLIP-2 (ViT + Q-Former + OPT) with a word-level tokenizer, saved as transformers saves it,
    so that its random captions are words — degradation words among them."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessorPil,
                              PreTrainedTokenizerFast)

    specials = ["<pad>", "</s>", "<unk>", "<image>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = Blip2Config(
        vision_config=dict(**small, image_size=32, patch_size=8, initializer_range=0.5),
        qformer_config=dict(**small, encoder_hidden_size=16, vocab_size=len(tok), initializer_range=0.5),
        text_config=dict(model_type="opt", vocab_size=len(tok), hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                         num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=64, init_std=0.5,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        num_query_tokens=2, image_token_index=vocab["<image>"], initializer_range=0.5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Blip2ForConditionalGeneration(config).eval()
    folder = tmp_path_factory.mktemp("blip2")
    model.save_pretrained(folder)
    Blip2Processor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tok,
                   num_query_tokens=2).save_pretrained(folder)
    return str(folder)


def _guidance(store: str, source: str, n: int = 12) -> tuple[dict, np.ndarray]:
    st = open_store(store)
    (gid,) = [g for g in st.guidance_ids() if source_of(st.guidance(g).fingerprint) == source]
    gs = st.guidance(gid)
    assert list(np.flatnonzero(gs.done("test"))) == list(range(n))
    return gs.fingerprint, np.stack([gs.read("test", i) for i in range(n)])


def test_three_sources_three_groups_captions_stored_exported_shown(tmp_path, blip):
    store = str(tmp_path / "s.zarr")
    run("generate-guidance", *TINY, "--store", store, "--batch-size", "4")
    run("generate-guidance", *TINY, "--store", store, "--batch-size", "4", "--source", "mapper-only")
    run("generate-guidance", *TINY, "--store", store, "--batch-size", "4", "--source", "caption", "--caption-model", blip)
    facts = json.loads(run("cache", "info", store, "--json").output)
    assert len(facts["guidance"]) == 3
    assert all(g["splits"]["test"] == {"done": 12, "missing": 0} for g in facts["guidance"].values())
    assert [g["provenance"] for g in facts["guidance"].values()] == ["generated"] * 3

    textual, g_text = _guidance(store, "textual")
    mapper_only, g_mapper = _guidance(store, "mapper-only")
    caption, g_caption = _guidance(store, "caption")
    assert set(textual) == TEXTUAL_KEYS  # the default source's fingerprint is what it was
    assert mapper_only["source"] == "mapper-only" and "cleaner" not in mapper_only
    assert mapper_only["mapper"] == textual["mapper"] == "untrained"
    assert caption["source"] == "caption" and not {"mapper", "cleaner", "clip_model"} & set(caption)
    assert caption["caption_model"] == blip and len(caption["caption_weights"]["model.safetensors"]) == 64
    assert len(caption["degradation_words"]) == 64
    # three different routes to the conditioning, one shared sampler: different guidance
    assert not np.array_equal(g_text, g_mapper) and not np.array_equal(g_text, g_caption)

    # captions: one per image, the prompt is the raw caption without its degradation words
    st = open_store(store)
    gs = st.guidance(next(g for g in st.guidance_ids() if source_of(st.guidance(g).fingerprint) == "caption"))
    recs = captions.records(gs)
    assert [r["id"] for r in recs] == st["test"].ids
    assert all(r["prompt"] == clean_caption(r["raw"]) and not r["edited"] for r in recs)
    assert len({r["raw"] for r in recs}) > 1  # the captioner saw the images
    assert any(r["prompt"] != r["raw"] for r in recs)  # some degradation words were removed
    assert not any(set(r["prompt"].split()) & {"blurry", "noisy", "rainy", "foggy", "hazy", "rain", "fog", "haze"}
                   for r in recs)
    # shown by info (a sample), exported beside the PNGs
    info = facts["guidance"][gs.id]["captions"]
    assert info["count"] == 12 and info["edited"] == 0 and info["sample"] == recs[:3]
    assert recs[0]["prompt"] in run("cache", "info", store).output
    run("cache", "export", store, "--to", str(tmp_path / "png"), "--group", gs.id)
    lines = (tmp_path / "png" / "test" / "captions.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == recs
    assert len(list((tmp_path / "png" / "test").glob("**/*.png"))) == 12
    # the textual group exports no captions
    run("cache", "export", store, "--to", str(tmp_path / "png2"), "--group", [g for g in facts["guidance"]
        if source_of(facts["guidance"][g]["fingerprint"]) == "textual"][0])
    assert not (tmp_path / "png2" / "test" / "captions.jsonl").exists()
    # a second run of any source finds its group complete
    assert "Nothing to do" in run("generate-guidance", *TINY, "--store", store, "--source", "caption",
                                  "--caption-model", blip).output


@pytest.mark.parametrize("source", ["mapper-only", "caption"])
def test_batch_size_does_not_change_guidance(tmp_path, blip, source):
    extra = ["--caption-model", blip] if source == "caption" else []
    a, b = str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")
    run("generate-guidance", *TINY, "--store", a, "--batch-size", "1", "--limit", "6", "--source", source, *extra)
    run("generate-guidance", *TINY, "--store", b, "--batch-size", "4", "--limit", "6", "--source", source, *extra)
    fa, ga = _guidance(a, source, 6)
    fb, gb = _guidance(b, source, 6)
    assert fa == fb
    np.testing.assert_array_equal(ga, gb)
    assert any(not np.array_equal(ga[0], ga[k]) for k in range(1, len(ga)))
    if source == "caption":
        ra = captions.records(open_store(a).guidance())
        assert ra == captions.records(open_store(b).guidance()) and len(ra) == 6


def test_edited_captions_regenerate_only_those_images(tmp_path, blip):
    store = str(tmp_path / "s.zarr")
    cap = ["--source", "caption", "--caption-model", blip]
    run("generate-guidance", *TINY, "--store", store, *cap)
    gs = open_store(store).guidance()
    before = np.stack([gs.read("test", i) for i in range(12)])
    listing = run("cache", "captions", store).output.splitlines()
    recs = [json.loads(line) for line in listing]
    assert len(recs) == 12
    recs[3]["prompt"] = "a photo of a red bicycle leaning on a wall"
    edited = tmp_path / "captions.jsonl"
    edited.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    result = run("cache", "captions", store, "--from", str(edited))
    assert "1 caption(s) changed, 11 unchanged; guidance removed for 1 image(s)" in result.output
    gs = open_store(store).guidance()
    assert list(np.flatnonzero(~gs.done("test"))) == [3]
    assert json.loads(run("cache", "info", store, "--json").output)["guidance"][gs.id]["captions"]["edited"] == 1
    again = run("generate-guidance", *TINY, "--store", store, *cap)
    assert "│ 1 " in again.output  # one image done, the eleven others skipped
    gs = open_store(store).guidance()
    after = np.stack([gs.read("test", i) for i in range(12)])
    np.testing.assert_array_equal(np.delete(after, 3, 0), np.delete(before, 3, 0))
    assert not np.array_equal(after[3], before[3])  # made from the new prompt
    rec = captions.read(gs, "test", 3)
    assert rec == {"raw": recs[3]["raw"], "prompt": "a photo of a red bicycle leaning on a wall", "edited": True}
    # an unknown id changes nothing
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"split": "test", "id": "nope", "prompt": "x"}) + "\n")
    result = run("cache", "captions", store, "--from", str(bad), code=1)
    assert "nope" in result.output and "Traceback" not in result.output
    assert open_store(store).guidance().done("test").all()


def test_missing_caption_model_and_bad_options(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    store = str(tmp_path / "s.zarr")
    result = run("generate-guidance", *TINY, "--store", store, "--source", "caption", code=1)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Salesforce/blip2-opt-2.7b" in lines[0] and "--caption-model" in lines[0]
    assert not (tmp_path / "s.zarr").exists()
    assert runner.invoke(app, ["generate-guidance", *TINY, "--store", store, "--source", "words"]).exit_code == 2
    assert runner.invoke(app, ["generate-guidance", *TINY, "--store", store, "--source", "mapper-only",
                               "--cleaner", "c.pt"]).exit_code == 2
    assert runner.invoke(app, ["generate-guidance", *TINY, "--store", store, "--caption-model", "x/y"]).exit_code == 2


def test_dask_workers_build_the_same_caption_source(tmp_path, blip):
    one, two = str(tmp_path / "one.zarr"), str(tmp_path / "two.zarr")
    cap = ["--source", "caption", "--caption-model", blip, "--limit", "4"]
    run("generate-guidance", *TINY, "--store", one, "--batch-size", "2", *cap)
    run("generate-guidance", *TINY, "--store", two, "--batch-size", "1", "--workers", "2", *cap)
    a, b = open_store(one).guidance(), open_store(two).guidance()
    assert a.id == b.id and source_of(b.fingerprint) == "caption"
    assert list(np.flatnonzero(b.done("test"))) == [0, 1, 2, 3]
    for i in range(4):
        np.testing.assert_array_equal(a.read("test", i), b.read("test", i))
    assert captions.records(a) == captions.records(b) and len(captions.records(b)) == 4


def test_verify_checks_caption_chunks(tmp_path, blip):
    from pathlib import Path

    store = str(tmp_path / "s.zarr")
    run("generate-guidance", *TINY, "--store", store, "--source", "caption", "--caption-model", blip)
    assert "ok:" in run("cache", "verify", store).output
    gid = open_store(store).guidance().id
    chunk = Path(store, "guidance", gid, "captions", "test", "c", "1", "0")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    result = run("cache", "verify", store, code=1)
    assert f"captions/{gid}" in result.output and open_store(store)["test"].ids[1] in result.output


def test_new_source_beside_imported_guidance_still_needs_force(tmp_path, blip):
    from PIL import Image

    store = str(tmp_path / "s.zarr")
    run("cache", "ingest", "--dataset", "demo", "--split", "test", "--store", store)
    folder = tmp_path / "g"
    for image_id in open_store(store)["test"].ids:
        (folder / image_id).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(folder / f"{image_id}.png")
    run("cache", "import-guidance", store, "--split", "test", "--from", str(folder))
    cap = ["--source", "caption", "--caption-model", blip, "--limit", "2"]
    assert "--force" in run("generate-guidance", *TINY, "--store", store, *cap, code=1).output
    run("generate-guidance", *TINY, "--store", store, *cap, "--force")
    assert len(open_store(store).guidance_ids()) == 2
