"""Shared set-up for the benchmarks: models at real layer shapes, masked and dense."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from shear.masks import MASK_TYPES
from shear.patch import apply_masks

#: Layer shapes of the embedded default (SmolLM2-135M); 2 layers and a small vocabulary so
#: that the decoder layers, not the LM head, dominate the time.
SMOLLM2_LAYER = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
SMOLLM2_TARGET = "layers=1,hidden=384,heads=6,kv_heads=2,intermediate=1024"


def build(provider: str, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer model at SmolLM2 layer shapes, in training mode.

    Args:
        provider: ``dense`` (the unpatched Hugging Face model, the floor) or ``masked``
            (the reference path with every mask type, sampled each forward).
        seed: weight seed.

    Returns:
        The model.
    """
    torch.manual_seed(seed)
    cfg = LlamaConfig(**SMOLLM2_LAYER, num_hidden_layers=2, vocab_size=1024, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).train()
    if provider == "masked":
        apply_masks(
            model, SMOLLM2_TARGET, types=list(MASK_TYPES), generator=torch.Generator().manual_seed(seed)
        )
    elif provider != "dense":
        raise ValueError(f"unknown provider {provider!r}")
    return model


def step(model: LlamaForCausalLM, tokens: torch.Tensor, backward: bool) -> None:
    """One forward (and backward) pass with the LM loss."""
    if backward:
        model(tokens, labels=tokens).loss.backward()
    else:
        with torch.no_grad():
            model(tokens, labels=tokens)


def tokens(batch: int = 2, seq: int = 256) -> torch.Tensor:
    """Random token ids for the benchmarks."""
    return torch.randint(0, 1024, (batch, seq), generator=torch.Generator().manual_seed(0))
