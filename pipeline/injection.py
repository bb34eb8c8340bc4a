"""Injecting word embeddings into the text encoder (Lin et al., CVPR 2024, §3.2; as in ELITE / textual inversion).

The prompt template ``"a photo of a S"`` is tokenised to 77 tokens (BOS, words, EOS, padding). The
placeholder ``S`` (found by token id, index 5 with CLIP's tokenizer) is replaced by the N = 20 word
embeddings, everything after it (EOS, padding) moves right by N - 1, and the sequence is cut back to 77.
Position embeddings, the causal transformer and the final layer norm are then the text encoder's own: a
forward pre-hook hands the finished token embeddings to its embedding layer (``inputs_embeds``), so the
causal mask, attention kernels and any EOS pooling are exactly the model's. Stable Diffusion reads
``last_hidden_state``. The unconditional branch is the empty prompt ``""`` without injection.
"""

from __future__ import annotations

import torch
from torch import nn

TEMPLATE = "a photo of a S"
PLACEHOLDER = "S"


def _text_module(text_encoder: nn.Module) -> nn.Module:
    """The module that owns ``embeddings`` (``text_model`` in older transformers, the model in newer)."""
    return getattr(text_encoder, "text_model", text_encoder)


def tokenize(tokenizer, prompts: list[str], device: torch.device | str) -> torch.Tensor:
    """Prompts -> (B, L) token ids padded/truncated to the tokenizer's max length (77)."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


def placeholder_index(tokenizer, template: str = TEMPLATE, placeholder: str = PLACEHOLDER) -> int:
    """Position of the placeholder token in the tokenised template (5 for CLIP: BOS a photo of a S)."""
    ph = tokenizer(placeholder, add_special_tokens=False).input_ids
    if len(ph) != 1:
        raise ValueError(f"placeholder {placeholder!r} must be one token, the tokenizer gives {ph}")
    ids = tokenize(tokenizer, [template], "cpu")[0].tolist()
    where = [i for i, t in enumerate(ids) if t == ph[0]]
    if len(where) != 1:
        raise ValueError(f"placeholder {placeholder!r} must occur once in {template!r}, found {len(where)}")
    return where[0]


def injected_token_embeddings(
    text_encoder: nn.Module,
    tokenizer,
    words: torch.Tensor,
    template: str = TEMPLATE,
    placeholder: str = PLACEHOLDER,
) -> tuple[torch.Tensor, torch.Tensor]:
    """words (B, N, D) -> (input_ids (B, L), token embeddings (B, L, D)), before position embeddings.

    ``input_ids`` holds the placeholder id at the N word positions and the shifted EOS/padding ids after
    them (what the model uses for EOS pooling); ``token embeddings`` holds the words at those positions.
    """
    emb = _text_module(text_encoder).embeddings.token_embedding
    b, n, _ = words.shape
    device = emb.weight.device
    ids = tokenize(tokenizer, [template], device)[0]  # (L,)
    length = ids.shape[0]
    p = placeholder_index(tokenizer, template, placeholder)
    # [ ..before S.., S x N, ..after S.. ] cut to L: what followed S moves right by N - 1
    new_ids = torch.cat([ids[:p], ids[p : p + 1].repeat(n), ids[p + 1 :]])[:length]
    tokens = emb(new_ids).unsqueeze(0).expand(b, -1, -1)  # (B, L, D)
    end = min(p + n, length)
    words = words[:, : end - p].to(tokens.dtype)
    tokens = torch.cat([tokens[:, :p], words, tokens[:, end:]], dim=1)
    return new_ids.unsqueeze(0).expand(b, -1), tokens


def encode_injected(
    text_encoder: nn.Module,
    tokenizer,
    words: torch.Tensor,
    template: str = TEMPLATE,
    placeholder: str = PLACEHOLDER,
) -> torch.Tensor:
    """words (B, N, D) -> conditional text embeddings (B, L, D) (``last_hidden_state``)."""
    ids, tokens = injected_token_embeddings(text_encoder, tokenizer, words, template, placeholder)

    def use_tokens(module, args, kwargs):
        kwargs["inputs_embeds"] = tokens
        return args, kwargs

    handle = _text_module(text_encoder).embeddings.register_forward_pre_hook(use_tokens, with_kwargs=True)
    try:
        return text_encoder(input_ids=ids).last_hidden_state
    finally:
        handle.remove()


def encode_prompt(text_encoder: nn.Module, tokenizer, prompts: list[str]) -> torch.Tensor:
    """Plain prompts -> (B, L, D) text embeddings (the unconditional branch uses ``[""]``)."""
    device = next(text_encoder.parameters()).device
    return text_encoder(input_ids=tokenize(tokenizer, prompts, device)).last_hidden_state
