"""Mask planning, expected sizes, the Lagrangian and the optimiser groups."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_TARGETS, make_tiny
from test_arch_target import LLAMA2_7B, SRC

from shear.arch import Arch
from shear.errors import ShearError
from shear.lagrangian import Lagrangian, build_optimizer
from shear.masks import (
    MASK_TYPES,
    HardConcreteMasks,
    combine_layer_masks,
    expected_prunable_params,
    plan_masks,
)
from shear.target import resolve_target

SMOL_TARGET = "layers=24,hidden=384,heads=6,kv_heads=2,intermediate=1024"


def test_default_plan_covers_every_shrunk_dimension():
    t = resolve_target(SRC, SMOL_TARGET)
    specs = plan_masks(SRC, t)
    # 9 heads in 3 groups -> 6 in 2 groups: KV groups shrink, heads per group (3) do not
    assert [(s.name, s.shape, s.target) for s in specs] == [
        ("layer", (30,), 24),
        ("kv", (30, 3), 2),
        ("intermediate", (30, 1536), 1024),
        ("hidden", (576,), 384),
    ]
    assert specs[0].target_sparsity == pytest.approx(0.2)


def test_paper_fractions_for_the_llama2_targets():
    t13 = resolve_target(LLAMA2_7B, "hidden=2048,layers=24,heads=16,intermediate=5504")
    fr = {s.name: round(s.target_sparsity, 3) for s in plan_masks(LLAMA2_7B, t13)}
    assert fr == {"layer": 0.25, "kv": 0.5, "intermediate": 0.5, "hidden": 0.5}
    t27 = resolve_target(LLAMA2_7B, "hidden=2560,layers=32,heads=20,intermediate=6912")
    fr = {s.name: round(s.target_sparsity, 3) for s in plan_masks(LLAMA2_7B, t27)}
    assert fr == {"kv": 0.375, "intermediate": 0.372, "hidden": 0.375}


def test_chosen_types_must_cover_the_target():
    t = resolve_target(SRC, SMOL_TARGET)
    with pytest.raises(ShearError, match="shrinks hidden"):
        plan_masks(SRC, t, ["layer", "kv", "intermediate"])
    with pytest.raises(ShearError, match="unknown mask type"):
        plan_masks(SRC, t, ["layer", "kv", "intermediate", "hidden", "heads"])
    specs = plan_masks(SRC, t, MASK_TYPES)
    assert {s.name: s.target for s in specs}["head_layer"] == 30  # keeps every layer's attention
    assert {s.name: s.shape for s in specs}["head"] == (30, 3, 3)  # [layers, KV groups, heads per group]


# 2 layers, 4 query heads in 2 KV groups (n = 2), head_dim 3, hidden 4, intermediate 5
GQA = Arch("llama", layers=2, hidden=4, heads=4, kv_heads=2, head_dim=3, intermediate=5, vocab=7, tied=True,
           qkv_bias=True)  # fmt: skip
KV = torch.tensor([[1.0, 0.5], [0.25, 1.0]], dtype=torch.float64)
HEAD = torch.tensor([[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)


def test_combined_head_masks_follow_each_group():
    # query head h = g * n + j carries kv[l, g] * head[l, g, j]
    both = combine_layer_masks(GQA, {"kv": KV, "head": HEAD}).attn_in
    assert both.tolist() == [[1.0, 0.0, 0.25, 0.25], [0.0, 0.25, 1.0, 1.0]]
    assert combine_layer_masks(GQA, {"head": HEAD}).attn_in.tolist() == [[1, 0, 0.5, 0.5], [0, 1, 1, 1]]
    assert combine_layer_masks(GQA, {"kv": KV}).attn_in.tolist() == [[1, 1, 0.5, 0.5], [0.25, 0.25, 1, 1]]
    assert combine_layer_masks(GQA, {"intermediate": torch.ones(2, 5)}).attn_in is None


def test_expected_params_with_per_group_heads():
    # Q_l = sum_g kv[l,g] sum_j head[l,g,j]: layer 0 1*1 + 0.5*1 = 1.5, layer 1 0.25*1 + 1*2 = 2.25;
    # K = 1.5, 1.25. attn = D dh (2Q + 2K) + dh (Q + 2K) (q, k, v biases), mlp = 3 D I = 60:
    # layer 0: 12 * 6 + 3 * 4.5 = 85.5; layer 1: 12 * 7 + 3 * 4.75 = 98.25
    got = expected_prunable_params(GQA, {"kv": KV, "head": HEAD})
    assert got.item() == pytest.approx(85.5 + 98.25 + 2 * 60)
    ones = {"kv": torch.ones_like(KV), "head": torch.ones_like(HEAD)}
    assert expected_prunable_params(GQA, ones).item() == GQA.prunable_params() == 456
    # heads only: Q = 1 + 1 = 2 and 1 + 2 = 3, K = 2: 12 * 8 + 3 * 6 = 114, 12 * 10 + 3 * 7 = 141
    assert expected_prunable_params(GQA, {"head": HEAD}).item() == pytest.approx(114 + 141 + 120)


def test_deterministic_head_mask_chooses_per_layer_and_group():
    t = resolve_target(SRC, "layers=30,hidden=576,heads=6,kv_heads=3,intermediate=1536")  # 2 of 3 per group
    m = HardConcreteMasks(SRC, t)
    assert m.types == ["head"]
    order = torch.tensor([3.0, 2.0, 1.0])
    with torch.no_grad():  # row (l, g) ranks its heads [3, 2, 1] rolled by l + g: drops head (l + g + 2) % 3
        for l in range(30):  # noqa: E741
            for g in range(3):
                m.log_alpha["head"][l, g] = order.roll(l + g)
    kept = m.deterministic()["head"] != 0
    for l in range(30):  # noqa: E741
        for g in range(3):
            assert [j for j in range(3) if not kept[l, g, j]] == [(l + g + 2) % 3], (l, g)


def test_init_and_clamp():
    t = resolve_target(SRC, SMOL_TARGET)
    m = HardConcreteMasks(SRC, t, generator=torch.Generator().manual_seed(0))
    la = m.log_alpha["intermediate"]
    assert la.mean().item() == pytest.approx(5.0, abs=1e-3)
    assert la.std().item() == pytest.approx(0.01, rel=0.05)
    m.clamp_()
    assert torch.all((la - 4.60517).abs() < 1e-5)


@pytest.mark.parametrize("kind", sorted(TINY_TARGETS))
def test_expected_params_exact_at_zero_one(kind):
    model = make_tiny(kind)
    src = Arch.from_config(model.config)
    t = resolve_target(src, TINY_TARGETS[kind])
    m = HardConcreteMasks(src, t, MASK_TYPES, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for la in m.log_alpha.values():
            la.normal_(0, 2)
    ones = {k: torch.ones_like(v, dtype=torch.float64) for k, v in m.log_alpha.items()}
    assert expected_prunable_params(src, ones).item() == src.prunable_params()
    indicators = {k: (v != 0).double() for k, v in m.deterministic().items()}
    assert expected_prunable_params(src, indicators).item() == t.prunable_params()
    # differentiable in every log_alpha
    m.expected_params().backward()
    assert all(la.grad.abs().sum() > 0 for la in m.log_alpha.values())


def test_lagrangian_value_warmup_and_gradients():
    t = resolve_target(SRC, SMOL_TARGET)
    m = HardConcreteMasks(SRC, t)
    lag = Lagrangian(m, warmup_steps=100)
    assert lag.target_at("hidden", 0) == 0
    assert lag.target_at("hidden", 50) == pytest.approx(1 / 6)
    assert lag.target_at("hidden", 1000) == pytest.approx(1 / 3)
    with torch.no_grad():
        lag.lambda_1["hidden"].fill_(2.0)
        lag.lambda_2["hidden"].fill_(3.0)
    e = {"hidden": torch.tensor(0.1, requires_grad=True), "layer": torch.tensor(0.0, requires_grad=True)}
    total, terms = lag(e, step=50)
    gap = 0.1 - 1 / 6
    assert terms["hidden"].item() == pytest.approx(2 * gap + 3 * gap * gap)
    assert total.item() == pytest.approx(terms["hidden"].item() + terms["layer"].item())
    total.backward()
    assert lag.lambda_1["hidden"].grad.item() == pytest.approx(gap)
    assert lag.lambda_2["hidden"].grad.item() == pytest.approx(gap * gap)
    assert e["hidden"].grad.item() == pytest.approx(2 + 2 * 3 * gap)


def test_optimizer_groups_descend_and_ascend():
    model = make_tiny("qwen2_gqa_bias_tied")
    src = Arch.from_config(model.config)
    m = HardConcreteMasks(src, resolve_target(src, TINY_TARGETS["qwen2_gqa_bias_tied"]))
    lag = Lagrangian(m)
    opt = build_optimizer(model, m, lag, lr_weights=1e-4, lr_masks=0.5, lr_lambdas=0.25)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert [g["name"] for g in opt.param_groups] == ["weights", "log_alpha", "lambdas"]
    assert (by_name["weights"]["lr"], by_name["log_alpha"]["lr"], by_name["lambdas"]["lr"]) == (
        1e-4,
        0.5,
        0.25,
    )
    assert by_name["lambdas"]["maximize"] and not by_name["log_alpha"]["maximize"]
    assert by_name["weights"]["betas"] == (0.9, 0.95)
    assert len(by_name["weights"]["params"]) == len(list(model.parameters()))
    # below target (e < t): lambda_1 has gradient e - t < 0, so ascent lowers it
    total, _ = lag(m.expected_sparsity(), step=0)
    total.backward()
    opt.step()
    assert all(v.item() < 0 for v in lag.lambda_1.values())
    with pytest.raises(ValueError, match="positive"):
        build_optimizer(model, m, lag, lr_lambdas=-1.0)


def test_lagrangian_penalises_each_row_then_averages():
    """The original rule on deliberately uneven layers: per-row penalty, then the mean."""
    t = resolve_target(SRC, SMOL_TARGET)
    lag = Lagrangian(HardConcreteMasks(SRC, t))
    with torch.no_grad():
        lag.lambda_1["intermediate"].fill_(2.0)
        lag.lambda_2["intermediate"].fill_(3.0)
    target = lag.target_at("intermediate", 0)
    rows = torch.tensor([target - 0.5, target, target + 0.5], dtype=torch.float64, requires_grad=True)
    _, terms = lag({"intermediate": rows}, step=0)
    # gaps -0.5, 0, 0.5: (2 * -0.5 + 3 * 0.25 + 0 + 2 * 0.5 + 3 * 0.25) / 3; averaging the rows
    # first (gap 0) would give 0 and let the uneven layers stand
    assert terms["intermediate"].item() == pytest.approx(1.5 / 3)
    terms["intermediate"].backward()
    assert rows.grad.tolist() == pytest.approx([(2 + 6 * g) / 3 for g in (-0.5, 0.0, 0.5)])


def test_lagrangian_alone_evens_out_uneven_layers():
    """Ascent on the multipliers and descent on log_alpha bring every layer to the target."""
    model = make_tiny("llama_gqa_bias_untied")
    src = Arch.from_config(model.config)
    m = HardConcreteMasks(src, resolve_target(src, TINY_TARGETS["llama_gqa_bias_untied"]))
    with torch.no_grad():  # half the layers keep everything, half almost nothing
        la = m.log_alpha["intermediate"]
        la[::2] = 4.0
        la[1::2] = -4.0
    lag = Lagrangian(m)
    opt = build_optimizer(model, m, lag, lr_weights=0.0, lr_masks=0.1, lr_lambdas=0.1)
    for step in range(300):
        total, _ = lag(m.expected_sparsity(), step)
        opt.zero_grad()
        total.backward()
        opt.step()
        m.clamp_()
    for name, kept in m.expected_kept().items():
        target = m.specs[name].target
        assert (kept - target).abs().max().item() <= 0.05 * target, (name, kept)
