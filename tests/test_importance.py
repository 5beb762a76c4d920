"""Activation importance, masks initialised from it, the one-shot export, targets reached per row."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import TINY_TARGETS, make_tiny, prune_tiny

from shear.arch import Arch
from shear.data.corpus import Corpus
from shear.importance import (
    activation_importance,
    calibration_rows,
    init_from_importance,
    keep_indicators,
    scores_for,
)
from shear.masks import MASK_TYPES, HardConcreteMasks
from shear.target import resolve_target

KIND = "llama_gqa_bias_untied"  # 6 query heads in 2 KV groups, 2 layers


def _model_and_arch():
    model = make_tiny(KIND)
    return model, Arch.from_config(model.config)


def test_calibration_rows_spread_over_domains_and_follow_the_seed():
    corpus = Corpus(8, {"a": torch.zeros(10, 8), "b": torch.zeros(3, 8), "c": torch.zeros(40, 8)}, {})
    rows = calibration_rows(corpus, 12, seed=1)
    assert {d: len(r) for d, r in rows.items()} == {"a": 5, "b": 3, "c": 4}  # b runs out, others go on
    assert all(
        len(set(r)) == len(r) and all(0 <= i < len(corpus.train[d]) for i in r) for d, r in rows.items()
    )
    assert rows == calibration_rows(corpus, 12, seed=1)
    assert rows != calibration_rows(corpus, 12, seed=2)


def test_importance_sees_what_the_model_cannot_use():
    """Units silenced by their weights score 0: a head, an MLP channel, a layer, a hidden channel."""
    model, arch = _model_and_arch()
    dh, n = arch.head_dim, arch.heads_per_group
    with torch.no_grad():
        layer0, layer1 = model.model.layers[:2]
        layer0.self_attn.v_proj.weight[dh : 2 * dh] = 0  # KV group 1 of layer 0 reads nothing
        layer0.self_attn.v_proj.bias[dh : 2 * dh] = 0
        layer0.mlp.up_proj.weight[7] = 0  # channel 7 of layer 0's MLP
        layer0.mlp.up_proj.bias[7] = 0
        for p in (layer1.self_attn.o_proj, layer1.mlp.down_proj):  # layer 1 leaves its input as is
            p.weight.zero_()
            p.bias.zero_()
        for norm in [
            m for layer in model.model.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)
        ]:
            norm.weight[5] = 0
        model.model.norm.weight[5] = 0
    ids = torch.randint(0, model.config.vocab_size, (3, 11))
    s = activation_importance(model, arch, ids, batch_size=2)
    L, G = arch.layers, arch.kv_heads
    I = arch.intermediate  # noqa: E741
    shapes = {"hidden": (arch.hidden,), "head": (L, G, n), "kv": (L, G), "intermediate": (L, I)}
    shapes["layer"] = (L,)
    assert {k: tuple(s[k].shape) for k in shapes} == shapes
    assert torch.all(s["head"][0, 1] == 0) and torch.all(s["head"][0, 0] > 0) and torch.all(s["head"][1:] > 0)
    assert s["kv"][0, 1] == 0 and s["kv"][0, 0] > 0
    assert s["intermediate"][0, 7] == 0 and (s["intermediate"][0] > 0).sum() == arch.intermediate - 1
    assert s["layer"][1].abs() < 1e-12 and s["layer"][0] > 0 and torch.all(s["layer"][2:] > 0)
    assert s["hidden"][5] == 0 and (s["hidden"] > 0).sum() == arch.hidden - 1
    # block influence, against the model's own hidden states: 1 - cos(layer input, layer output)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    direct = (1 - torch.nn.functional.cosine_similarity(hs[0].double(), hs[1].double(), dim=-1)).mean()
    assert s["layer"][0].item() == pytest.approx(direct.item(), rel=1e-5)


def test_initialisation_is_the_one_shot_choice_at_the_targets():
    model, arch = _model_and_arch()
    target = resolve_target(arch, "layers=1,hidden=36,heads=4,kv_heads=2,intermediate=50")
    masks = HardConcreteMasks(arch, target, list(MASK_TYPES))
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    scores = activation_importance(model, arch, ids)
    init_from_importance(masks, scores)
    z = keep_indicators(masks)
    for name, s in scores_for(masks, scores).items():
        k = masks.specs[name].target
        best = torch.topk(s, k, dim=-1).indices.sort(-1).values
        assert torch.equal(z[name].nonzero()[:, -1].view(best.shape), best), name
        assert torch.all(z[name].sum(-1) == k)
    # every row starts close to its target: kept with probability 0.998, dropped with 0.047
    for name, kept in masks.expected_kept().items():
        size, k = masks.specs[name].size, masks.specs[name].target
        assert torch.all((kept - k).abs() <= 0.05 * (size - k) + 0.01 * k), (name, kept)


def test_one_shot_exports_the_importance_choice_without_training(tiny_source, data_dir, tmp_path):
    r = prune_tiny(tiny_source, data_dir, tmp_path / "one", steps=0)
    out = tmp_path / "one"
    assert r["steps"] == 0 and os.path.isdir(r["export"])
    log = out / "log.jsonl"  # no training step, no checkpoint
    assert not (out / "checkpoint.pt").exists()
    assert not log.exists() or not any("loss" in json.loads(x) for x in open(log))
    rows = json.loads((out / "calibration.json").read_text())
    assert sum(map(len, rows.values())) == 8
    evals = json.loads((out / "evals.json").read_text())
    # the export is the masked model at unit scale: the same losses
    assert evals["exported"] == pytest.approx(evals["masked"], abs=1e-4)


def test_every_row_ends_within_5_percent_of_its_target(tiny_source, data_dir, tmp_path):
    """Importance init starts at the targets; the per-row Lagrangian keeps every row there."""
    # rows of 3+ units: in a 1-of-2 row the clamp's floor alone (keep probability 0.047 for
    # the dropped unit) is 4.7% of the target
    target = "layers=2,hidden=48,heads=4,kv_heads=2,intermediate=96"
    prune_tiny(tiny_source, data_dir, tmp_path / "run", steps=60, target=target, lr_masks=0.05, export=False)
    last = [json.loads(x) for x in open(tmp_path / "run" / "log.jsonl") if '"expected"' in x][-1]
    for name, target in last["final_target"].items():
        for bound in ("expected_min", "expected_max"):
            assert abs(last[bound][name] - target) <= 0.05 * target, (name, bound, last[bound][name], target)


def test_tiny_targets_cover_every_kind():  # the importance hooks reach every supported family
    for kind, target in TINY_TARGETS.items():
        model = make_tiny(kind)
        arch = Arch.from_config(model.config)
        masks = HardConcreteMasks(arch, resolve_target(arch, target))
        init_from_importance(masks, activation_importance(model, arch, torch.randint(0, 50, (2, 5))))
        assert all(torch.all(v.sum(-1) == masks.specs[n].target) for n, v in keep_indicators(masks).items())
