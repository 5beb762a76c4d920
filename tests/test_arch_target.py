"""Architecture parsing, exact parameter counts and target validation."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_KINDS, make_tiny
from transformers import GPT2Config, LlamaConfig

from shear.arch import Arch
from shear.errors import ShearError
from shear.target import resolve_target

LLAMA2_7B = Arch("llama", layers=32, hidden=4096, heads=32, kv_heads=32, head_dim=128, intermediate=11008,
                 vocab=32000, tied=False)  # fmt: skip


@pytest.mark.parametrize("kind", sorted(TINY_KINDS))
def test_counts_equal_the_real_model(kind):
    model = make_tiny(kind)
    arch = Arch.from_config(model.config)
    assert arch.total_params() == sum(p.numel() for p in model.parameters())
    linear = sum(p.numel() for n, p in model.named_parameters() if ".self_attn." in n or ".mlp." in n)
    assert arch.prunable_params() == linear


def test_published_sizes():
    assert LLAMA2_7B.total_params() == 6_738_415_616
    t13 = resolve_target(LLAMA2_7B, "hidden=2048,layers=24,heads=16,intermediate=5504")
    t27 = resolve_target(LLAMA2_7B, "hidden=2560,layers=32,heads=20,intermediate=6912")
    assert t13.total_params() == 1_345_423_360
    assert t27.total_params() == 2_701_560_320
    assert (t13.kv_heads, t27.kv_heads) == (16, 20)  # MHA stays MHA


def test_unsupported_architecture():
    with pytest.raises(ShearError, match="LlamaForCausalLM.*MistralForCausalLM.*Qwen2ForCausalLM"):
        Arch.from_config(GPT2Config())


SRC = Arch("llama", layers=30, hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536, vocab=49152,
           tied=True)  # fmt: skip


def test_target_forms_agree(tmp_path):
    numbers = resolve_target(SRC, "layers=24, hidden=384, heads=6, kv_heads=2, intermediate=1024")
    cfg = LlamaConfig(num_hidden_layers=24, hidden_size=384, num_attention_heads=6, num_key_value_heads=2,
                      intermediate_size=1024, vocab_size=49152, tie_word_embeddings=True,
                      architectures=["LlamaForCausalLM"])  # fmt: skip
    cfg.save_pretrained(tmp_path)
    renamed = tmp_path / "target-arch.json"
    renamed.write_text((tmp_path / "config.json").read_text())
    assert resolve_target(SRC, tmp_path) == numbers
    assert resolve_target(SRC, str(renamed)) == numbers
    assert (
        resolve_target(SRC, {"layers": 24, "hidden": 384, "heads": 6, "kv_heads": 2, "intermediate": 1024})
        == numbers
    )
    assert resolve_target(SRC, json.loads(renamed.read_text())) == numbers
    assert numbers.head_dim == 64 and numbers.heads_per_group == 3


def test_unnamed_dimensions_keep_the_source():
    t = resolve_target(SRC, "intermediate=1000")
    assert t == SRC.replace(intermediate=1000)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("hidden=600", "larger than the source"),
        ("layers=31", "larger than the source"),
        ("heads=8,kv_heads=3", "divisible"),
        ("layers=0", "positive"),
        ("heads=0,kv_heads=0", "positive"),
        ("heads=6", "name kv_heads too; valid choices: kv_heads=2, kv_heads=3"),
        ("heads=8,kv_heads=2", "query heads per KV group"),
        ("hidden=500", "LlamaConfig refuses"),
        ("widht=3", "cannot read target item"),
        ("hidden=abc", "must be an integer"),
        ("", "empty target"),
    ],
)
def test_invalid_targets(spec, message):
    with pytest.raises(ShearError, match=message):
        resolve_target(SRC, spec)


def test_invalid_config_targets(tmp_path):
    def write(**fields):
        base = dict(
            model_type="llama",
            architectures=["LlamaForCausalLM"],
            num_hidden_layers=24,
            hidden_size=384,
            num_attention_heads=6,
            num_key_value_heads=2,
            intermediate_size=1024,
        )
        base.update(fields)
        p = tmp_path / "t.json"
        p.write_text(json.dumps({k: v for k, v in base.items() if v is not None}))
        return p

    with pytest.raises(ShearError, match="head dimension is 48"):
        resolve_target(SRC, write(hidden_size=288))  # 288 / 6 = 48 != 64
    assert resolve_target(SRC, write(hidden_size=288, head_dim=64)).hidden == 288
    with pytest.raises(ShearError, match="architecture mismatch"):
        resolve_target(SRC, write(model_type="mistral", architectures=["MistralForCausalLM"]))
    with pytest.raises(ShearError, match="vocabulary mismatch"):
        resolve_target(SRC, write(vocab_size=32000))
    with pytest.raises(ShearError, match="tie_word_embeddings mismatch"):
        resolve_target(SRC, write(tie_word_embeddings=False))
    with pytest.raises(ShearError, match="lacks intermediate_size"):
        resolve_target(SRC, write(intermediate_size=None))
    with pytest.raises(ShearError, match="not found"):
        resolve_target(SRC, tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ShearError, match="not valid JSON"):
        resolve_target(SRC, tmp_path / "bad.json")
    with pytest.raises(ShearError, match="architecture mismatch"):
        resolve_target(SRC, SRC.replace(model_type="qwen2"))
