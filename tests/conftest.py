"""Shared fixtures: tiny random LLaMA-family models covering MHA / GQA, tied / untied, biases."""

from __future__ import annotations

import os

import torch

# Without a GPU the Triton kernels run in the interpreter; it must be on before the first
# @triton.jit is decorated (when shear.kernels is imported), so set it here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# the token cache of the tests' data stays out of the user's cache
if "SHEAR_TOKEN_CACHE" not in os.environ:
    import tempfile

    os.environ["SHEAR_TOKEN_CACHE"] = tempfile.mkdtemp(prefix="shear-test-tokens-")

import pytest  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

# Odd sizes on purpose: 3 layers, hidden 48, 6 heads of 8, intermediate 84, vocab 101.
_COMMON = dict(
    hidden_size=48,
    intermediate_size=84,
    num_hidden_layers=3,
    num_attention_heads=6,
    vocab_size=101,
    max_position_embeddings=64,
)

#: name -> (config class, model class, extra config); covers every supported family.
TINY_KINDS = {
    "llama_mha_tied": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=6, tie_word_embeddings=True)),
    "llama_gqa_bias_untied": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(num_key_value_heads=2, tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
    ),
    "mistral_gqa_untied": (
        MistralConfig,
        MistralForCausalLM,
        dict(num_key_value_heads=2, tie_word_embeddings=False),
    ),
    "qwen2_gqa_bias_tied": (
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(num_key_value_heads=3, tie_word_embeddings=True),
    ),
}

#: A target reachable from every tiny kind (MHA sources keep one query head per group).
TINY_TARGETS = {
    "llama_mha_tied": "layers=2,hidden=36,heads=4,intermediate=50",  # LlamaConfig: hidden % heads == 0
    "llama_gqa_bias_untied": "layers=2,hidden=34,heads=2,kv_heads=1,intermediate=50",
    "mistral_gqa_untied": "layers=2,hidden=34,heads=2,kv_heads=1,intermediate=50",
    "qwen2_gqa_bias_tied": "layers=2,hidden=34,heads=2,kv_heads=2,intermediate=50",
}


def make_tiny(kind: str, seed: int = 0):
    """A tiny random model of the given kind in eval mode, fp32, with non-trivial norms and biases."""
    cfg_cls, model_cls, extra = TINY_KINDS[kind]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**_COMMON, **extra)).eval()
    with torch.no_grad():
        # Hugging Face initialises norms to 1 and biases to 0; randomise them so that a
        # misplaced mask or a wrong fold cannot hide behind ones and zeros.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model


#: Per-group query heads: the GQA Llama (6 heads in 2 KV groups) keeps both groups and 2 of
#: the 3 heads of each, every (layer, group) its own pair.
PER_GROUP_KIND = "llama_gqa_bias_untied"
PER_GROUP_TARGET = "layers=2,hidden=36,heads=4,kv_heads=2,intermediate=50"


def prune_tiny(src, data, out, **kw):
    """A short `shear prune` run of a tiny source on the tiny corpus (options override the defaults)."""
    from shear.prune import PruneConfig, run_prune

    cfg = dict(model=src, target="layers=2,hidden=48,heads=2,kv_heads=1,intermediate=64", data=data,
               out=str(out), batch_size=4, seq_len=32, eval_interval=10, checkpoint_interval=100,
               calibration_sequences=8, export=True,
               init="importance", freeze_masks=0.0, refit=0.0)  # the defaults before recipes  # fmt: skip
    cfg.update(kw)
    return run_prune(PruneConfig(**cfg))


def make_per_group_masked(seed: int = 0):
    """A tiny GQA model under every mask type, random log_alpha, whose groups keep different heads.

    Returns:
        (model, masks); row (l, g) of the deterministic head mask drops head (l + g) % 3.
    """
    from shear.masks import MASK_TYPES
    from shear.patch import apply_masks

    model = make_tiny(PER_GROUP_KIND, seed=seed)
    masks = apply_masks(model, PER_GROUP_TARGET, types=list(MASK_TYPES))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for la in masks.log_alpha.values():
            la.copy_(torch.randn(la.shape, generator=g) * 2.0)
        head = masks.log_alpha["head"]  # [L, G, 3]
        for layer in range(head.shape[0]):
            for group in range(head.shape[1]):
                head[layer, group, (layer + group) % 3] = head[layer, group].min() - 1.0
    return model, masks


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory):
    """A tiny random GQA Llama with the default model's real tokenizer, saved to a folder."""
    from shear.loading import load_source

    _, tok = load_source("default")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)  # fmt: skip
    path = tmp_path_factory.mktemp("src") / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A small real multi-domain data folder (text on this machine)."""
    from machine_corpus import build_machine_corpus

    return str(build_machine_corpus(tmp_path_factory.mktemp("data") / "corpus", max_bytes_per_domain=30_000))


@pytest.fixture(params=sorted(TINY_KINDS))
def tiny_kind(request) -> str:
    return request.param


@pytest.fixture
def tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 101, (2, 13), generator=g)
