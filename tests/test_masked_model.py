"""The masked Hugging Face model (reference path): equivalence, gradients, unit removal."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_TARGETS, make_tiny
from torch import nn

from shear.arch import Arch
from shear.errors import ShearError
from shear.lagrangian import Lagrangian
from shear.masks import MASK_TYPES
from shear.patch import apply_masks, masks_of, remove_masks

ALL = list(MASK_TYPES)


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens, use_cache=False).logits


def test_all_ones_equal_the_unpatched_model(tiny_kind, tokens):
    model = make_tiny(tiny_kind)
    ref = _logits(model, tokens)
    masks = apply_masks(model, TINY_TARGETS[tiny_kind], types=ALL)
    with masks.fixed(masks.ones()):
        torch.testing.assert_close(_logits(model, tokens), ref, rtol=0, atol=1e-5)
        model.train()  # fixed masks win over sampling too
        torch.testing.assert_close(_logits(model, tokens), ref, rtol=0, atol=1e-5)


def test_gradients_reach_log_alpha_and_lambdas(tiny_kind, tokens):
    model = make_tiny(tiny_kind).train()
    masks = apply_masks(model, TINY_TARGETS[tiny_kind], types=ALL, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # interior of the stretch, where the sample has a gradient
        for la in masks.log_alpha.values():
            la.normal_(0.0, 0.5)
    lag = Lagrangian(masks, warmup_steps=10)
    with torch.no_grad():
        for p in lag.parameters():
            p.fill_(0.5)
    lm = model(tokens, labels=tokens).loss
    constraint, _ = lag(masks.expected_sparsity(), step=5)
    (lm + constraint).backward()
    for name, la in masks.log_alpha.items():
        assert la.grad is not None and torch.isfinite(la.grad).all(), name
        assert la.grad.abs().sum() > 0, name
    for p in lag.parameters():
        assert p.grad is not None and p.grad.abs() > 0
    assert all(p.grad is not None for p in model.parameters())


def test_training_samples_fresh_masks_and_eval_is_deterministic(tokens):
    model = make_tiny("mistral_gqa_untied")
    masks = apply_masks(model, TINY_TARGETS["mistral_gqa_untied"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for la in masks.log_alpha.values():
            la.normal_(0.0, 1.0)
    model.train()
    a = model(tokens).logits.detach()
    b = model(tokens).logits.detach()
    assert not torch.equal(a, b)
    model.eval()
    torch.testing.assert_close(_logits(model, tokens), _logits(model, tokens), rtol=0, atol=0)
    det = masks.deterministic()
    assert int((det["kv"] != 0).sum(-1).unique()) == 1


# --- a mask at 0 removes exactly one unit --------------------------------------------------


def _masked_with_zero(model, target, tokens, name, index):
    masks = apply_masks(model, target, types=ALL)
    z = masks.ones()
    z[name][index] = 0.0
    with masks.fixed(z):
        out = _logits(model, tokens)
    remove_masks(model)
    return out


def _zero_o_proj_heads(model, layer, heads):
    ref = copy.deepcopy(model)
    dh = Arch.from_config(model.config).head_dim
    with torch.no_grad():
        for h in heads:
            ref.model.layers[layer].self_attn.o_proj.weight[:, h * dh : (h + 1) * dh] = 0
    return ref


@pytest.mark.parametrize("kind", ["llama_gqa_bias_untied", "qwen2_gqa_bias_tied"])
def test_zero_query_head_of_one_group(kind, tokens):
    model = make_tiny(kind)
    arch = Arch.from_config(model.config)
    g, n = arch.kv_heads - 1, arch.heads_per_group
    out = _masked_with_zero(model, TINY_TARGETS[kind], tokens, "head", (1, g, 1))
    ref = _zero_o_proj_heads(model, 1, [g * n + 1])  # that group's head only, not the others'
    torch.testing.assert_close(out, _logits(ref, tokens), rtol=0, atol=1e-5)


def test_zero_kv_group(tiny_kind, tokens):
    model = make_tiny(tiny_kind)
    n = Arch.from_config(model.config).heads_per_group
    out = _masked_with_zero(model, TINY_TARGETS[tiny_kind], tokens, "kv", (2, 1))
    ref = _zero_o_proj_heads(model, 2, [n + j for j in range(n)])
    torch.testing.assert_close(out, _logits(ref, tokens), rtol=0, atol=1e-5)


def test_zero_intermediate_channel(tiny_kind, tokens):
    model = make_tiny(tiny_kind)
    out = _masked_with_zero(model, TINY_TARGETS[tiny_kind], tokens, "intermediate", (0, 7))
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.model.layers[0].mlp.down_proj.weight[:, 7] = 0
    torch.testing.assert_close(out, _logits(ref, tokens), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,module", [("head_layer", "self_attn.o_proj"), ("mlp", "mlp.down_proj")])
def test_zero_attention_or_mlp_block(name, module, tokens):
    model = make_tiny("llama_gqa_bias_untied")
    out = _masked_with_zero(model, TINY_TARGETS["llama_gqa_bias_untied"], tokens, name, 1)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        lin = ref.model.layers[1].get_submodule(module)
        lin.weight.zero_()
        lin.bias.zero_()
    torch.testing.assert_close(out, _logits(ref, tokens), rtol=0, atol=1e-5)


def test_zero_layer_removes_the_layer(tiny_kind, tokens):
    model = make_tiny(tiny_kind)
    out = _masked_with_zero(model, TINY_TARGETS[tiny_kind], tokens, "layer", 1)
    ref = copy.deepcopy(model)
    del ref.model.layers[1]
    ref.config.num_hidden_layers -= 1
    if isinstance(getattr(ref.config, "layer_types", None), list):
        del ref.config.layer_types[1]
    torch.testing.assert_close(out, _logits(ref, tokens), rtol=0, atol=1e-5)


def _without_hidden_dim(model: nn.Module, i: int) -> nn.Module:
    """An independent reduced model: hidden dimension i deleted from every tensor."""
    arch = Arch.from_config(model.config)
    keep = torch.tensor([k for k in range(arch.hidden) if k != i])
    cfg = copy.deepcopy(model.config)
    cfg.hidden_size, cfg.head_dim = arch.hidden - 1, arch.head_dim
    reduced = type(model)(cfg).eval()
    reads = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")
    writes = ("o_proj.weight", "down_proj.weight", "o_proj.bias", "down_proj.bias", "norm.weight")
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith(reads) or k in ("model.embed_tokens.weight", "lm_head.weight"):
            v = v[:, keep]
        elif k.endswith(writes) or k.endswith("layernorm.weight"):
            v = v[keep]
        sd[k] = v
    reduced.load_state_dict(sd, strict=True)
    return reduced


def test_zero_hidden_dimension(tiny_kind, tokens):
    model = make_tiny(tiny_kind)
    out = _masked_with_zero(model, TINY_TARGETS[tiny_kind], tokens, "hidden", 5)
    ref = _without_hidden_dim(model, 5)
    torch.testing.assert_close(out, _logits(ref, tokens), rtol=0, atol=1e-5)


# --- the model stays a normal Hugging Face model -------------------------------------------


def test_remove_generate_save_and_state_dict(tmp_path, tokens):
    model = make_tiny("qwen2_gqa_bias_tied")
    keys = list(model.state_dict())
    ref = _logits(model, tokens)
    norm_cls = type(model.model.norm)
    masks = apply_masks(model, TINY_TARGETS["qwen2_gqa_bias_tied"], types=ALL)
    assert masks_of(model) is masks
    assert isinstance(model.model.norm, norm_cls) and type(model.model.norm) is not norm_cls
    assert list(model.state_dict()) == keys  # masks are not in the model's state dict
    assert not any(p is la for p in model.parameters() for la in masks.parameters())
    with pytest.raises(ShearError, match="already has masks"):
        apply_masks(model, TINY_TARGETS["qwen2_gqa_bias_tied"])
    generated = model.generate(tokens[:1, :4], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 9)
    model.save_pretrained(tmp_path / "saved")
    remove_masks(model)
    assert type(model.model.norm) is norm_cls and masks_of(model) is None
    torch.testing.assert_close(_logits(model, tokens), ref, rtol=0, atol=0)
    reloaded = type(model).from_pretrained(tmp_path / "saved").eval()
    torch.testing.assert_close(_logits(reloaded, tokens), ref, rtol=0, atol=0)


def test_unmasked_modules_stay_untouched():
    model = make_tiny("mistral_gqa_untied")
    apply_masks(model, "intermediate=50")  # only the intermediate mask
    layer = model.model.layers[0]
    assert type(layer.mlp).__name__ == "MaskedMistralMLP"  # the MLP block is one masked op
    assert type(layer.self_attn.o_proj) is nn.Linear and type(layer.mlp.up_proj) is nn.Linear
    assert type(layer.input_layernorm).__name__ == "MistralRMSNorm"


def test_fixed_masks_are_checked():
    model = make_tiny("mistral_gqa_untied")
    masks = apply_masks(model, "intermediate=50")
    with pytest.raises(ShearError, match="exactly the types"):
        with masks.fixed({}):
            pass
    with pytest.raises(ShearError, match="shape"):
        with masks.fixed({"intermediate": torch.ones(3, 5)}):
            pass


def test_default_model_all_ones_equal_the_unpatched_model():
    from shear.loading import load_source

    model, tok = load_source("default")
    ids = tok(
        "The masked model must equal the plain one when every mask is one.", return_tensors="pt"
    ).input_ids
    ref = _logits(model, ids)
    masks = apply_masks(model, "layers=24,hidden=384,heads=6,kv_heads=2,intermediate=1024", types=ALL)
    with masks.fixed(masks.ones()):
        torch.testing.assert_close(_logits(model, ids), ref, rtol=0, atol=1e-5)
    remove_masks(model)
