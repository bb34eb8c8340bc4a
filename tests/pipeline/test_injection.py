"""Injection of the 20 words into "a photo of a S" and the text encoder."""

import pytest
import torch

from tdr.pipeline.injection import (
    encode_injected,
    encode_prompt,
    injected_token_embeddings,
    placeholder_index,
    tokenize,
)

torch.set_num_threads(1)


def test_placeholder_is_found_at_index_5(models):
    assert placeholder_index(models.tokenizer) == 5
    assert placeholder_index(models.tokenizer, "a photo of S here") == 4
    with pytest.raises(ValueError, match="once"):
        placeholder_index(models.tokenizer, "a photo of a dog")


def test_words_at_positions_5_to_24_and_the_rest_shifted(models):
    m = models
    words = torch.randn(2, 20, 32)
    ids, tokens = injected_token_embeddings(m.text_encoder, m.tokenizer, words)
    template = tokenize(m.tokenizer, ["a photo of a S"], "cpu")[0]
    emb = m.text_encoder.get_input_embeddings()
    assert ids.shape == (2, 77) and tokens.shape == (2, 77, 32)
    assert torch.equal(tokens[:, 5:25], words)  # the 20 words
    assert torch.equal(tokens[:, :5], emb(template[:5]).expand(2, -1, -1))  # BOS a photo of a
    assert torch.equal(tokens[:, 25:], emb(template[6:58]).expand(2, -1, -1))  # EOS, padding moved by 19
    assert ids[0, 25].item() == m.tokenizer.eos_token_id and template[6].item() == m.tokenizer.eos_token_id


def test_injection_equals_the_text_encoder_on_real_tokens(models):
    """Injecting the token embeddings of 20 real tokens == encoding the prompt that holds those tokens."""
    m = models
    template = tokenize(m.tokenizer, ["a photo of a S"], "cpu")[0]
    chosen = torch.arange(100, 120)
    ids = torch.cat([template[:5], chosen, template[6:]])[:77].unsqueeze(0)
    words = m.text_encoder.get_input_embeddings()(chosen).unsqueeze(0)
    with torch.inference_mode():
        ours = encode_injected(m.text_encoder, m.tokenizer, words)
        ref = m.text_encoder(input_ids=ids).last_hidden_state
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    # the causal mask holds: positions before the words do not see them
    with torch.inference_mode():
        other = encode_injected(m.text_encoder, m.tokenizer, torch.randn(1, 20, 32))
    assert torch.equal(ours[:, :5], other[:, :5]) and not torch.allclose(ours[:, 5:], other[:, 5:])


def test_hook_is_removed_and_uncond_is_the_empty_prompt(models):
    m = models
    with torch.inference_mode():
        encode_injected(m.text_encoder, m.tokenizer, torch.randn(1, 20, 32))
        uncond = encode_prompt(m.text_encoder, m.tokenizer, [""])
        ref = m.text_encoder(input_ids=tokenize(m.tokenizer, [""], "cpu")).last_hidden_state
    assert torch.equal(uncond, ref) and uncond.shape == (1, 77, 32)
