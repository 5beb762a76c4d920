"""Finalize and export: the exported folder, loaded by plain from_pretrained in a fresh
process, computes what the masked model computes under the deterministic masks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import TINY_KINDS, TINY_TARGETS, make_per_group_masked, make_tiny
from safetensors import safe_open

from shear.arch import Arch
from shear.errors import ShearError
from shear.export import export_plan, export_pruned, gather
from shear.masks import MASK_TYPES
from shear.patch import apply_masks

_LOAD_IN_FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    jobs = json.loads(sys.argv[1])
    for folder, tokens, out in jobs:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            logits = model(torch.tensor(tokens), use_cache=False).logits
        torch.save(logits, out)
    """
)


def _pruned_masked_model(kind: str, seed: int):
    """A tiny model with every mask type active and random log_alpha (varied kept values)."""
    model = make_tiny(kind, seed=seed)
    masks = apply_masks(model, TINY_TARGETS[kind], types=list(MASK_TYPES))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for la in masks.log_alpha.values():
            la.copy_(torch.randn(la.shape, generator=g) * 2.0)
    return model, masks


def _kept_heads(z: torch.Tensor) -> list[list[list[int]]]:
    """Kept query heads (within each group) of every (layer, group) row of a head mask."""
    return [[torch.nonzero(row).flatten().tolist() for row in layer] for layer in z]


def test_exported_models_match_the_masked_models(tmp_path, tokens):
    jobs, expected, targets = [], {}, {}
    kinds = [*sorted(TINY_KINDS), "per_group_heads"]
    for kind in kinds:
        seed = len(jobs) + 3
        model, masks = (
            make_per_group_masked(seed) if kind == "per_group_heads" else _pruned_masked_model(kind, seed)
        )
        with torch.no_grad():
            expected[kind] = model(tokens, use_cache=False).logits  # eval mode: deterministic masks
            z = masks.deterministic()
        # every granularity really prunes something, and the kept values are not all ~1
        pruned = ("layer", "head") if kind == "per_group_heads" else ("layer", "kv")
        for name in (*pruned, "intermediate", "hidden"):
            assert (z[name] == 0).any(), (kind, name)
        assert z["intermediate"][z["intermediate"] != 0].min() < 0.5
        if kind == "per_group_heads":  # both groups kept, each with its own heads
            assert (z["kv"] != 0).all()
            heads = _kept_heads(z["head"])
            assert all(layer[0] != layer[1] for layer in heads), heads
        folder = export_pruned(model, masks, tmp_path / kind)
        targets[kind] = masks.target
        jobs.append((str(folder), tokens.tolist(), str(tmp_path / f"{kind}.pt")))
    subprocess.run([sys.executable, "-c", _LOAD_IN_FRESH_PROCESS, json.dumps(jobs)], check=True)
    for kind, (_, _, out) in zip(kinds, jobs, strict=True):
        torch.testing.assert_close(torch.load(out, weights_only=True), expected[kind], rtol=0, atol=1e-4)
        cfg = json.loads((tmp_path / kind / "config.json").read_text())
        t = targets[kind]
        assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]) == (
            t.layers,
            t.hidden,
            t.heads,
        )
        assert (cfg["num_key_value_heads"], cfg["intermediate_size"], cfg["head_dim"]) == (
            t.kv_heads,
            t.intermediate,
            t.head_dim,
        )
        with safe_open(tmp_path / kind / "model.safetensors", "pt") as f:
            n_params = sum(_numel(f, k) for k in f.keys())
        assert n_params == t.total_params()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp folders left


def _numel(f, key: str) -> int:
    n = 1
    for s in f.get_slice(key).get_shape():
        n *= s
    return n


def test_existing_destination_and_overwrite(tmp_path):
    model, masks = _pruned_masked_model("mistral_gqa_untied", seed=0)
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("x")
    with pytest.raises(ShearError, match="already exists"):
        export_pruned(model, masks, dest)
    assert (dest / "keep.txt").exists()
    export_pruned(model, masks, dest, overwrite=True)
    assert (dest / "model.safetensors").exists() and not (dest / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failed_export_leaves_nothing(tmp_path):
    model, masks = _pruned_masked_model("llama_mha_tied", seed=1)

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(ShearError, match="disk full"):
        export_pruned(model, masks, tmp_path / "out", tokenizer=BrokenTokenizer())
    assert list(tmp_path.iterdir()) == []


def test_non_uniform_masks_are_refused():
    model, masks = _pruned_masked_model("mistral_gqa_untied", seed=2)
    z = {k: v.detach().clone() for k, v in masks.deterministic().items()}
    row = z["intermediate"][0]
    row[torch.nonzero(row)[0]] = 0  # one layer keeps one channel fewer
    with pytest.raises(ShearError, match="MLP channels per layer"):
        export_plan(model, masks, z)
    model, masks = make_per_group_masked(seed=2)
    z = {k: v.detach().clone() for k, v in masks.deterministic().items()}
    row = z["head"][int(torch.nonzero(z["layer"])[0]), 1]
    row[torch.nonzero(row)[0]] = 0  # group 1 of the first kept layer keeps one query head fewer
    with pytest.raises(ShearError, match=r"query heads per kept \(layer, KV group\) are \[2, 1, 2, 2\]"):
        export_plan(model, masks, z)


def test_export_dtype_and_gather_reference():
    model, masks = _pruned_masked_model("qwen2_gqa_bias_tied", seed=4)
    plan, arch = export_plan(model, masks)
    assert arch == masks.target
    assert "lm_head.weight" not in {s.name for s in plan}  # tied: written once
    spec = next(s for s in plan if s.name.endswith("layers.0.self_attn.o_proj.weight"))
    dense = spec.src.detach().double()
    expect = (
        dense[spec.rows][:, spec.cols] * spec.row_scale.double()[:, None] * spec.col_scale.double()[None, :]
    )
    torch.testing.assert_close(gather(spec).double(), expect, rtol=1e-6, atol=1e-7)
    spec.dtype = torch.bfloat16
    assert gather(spec).dtype == torch.bfloat16 and gather(spec).shape == spec.shape
    assert Arch.from_config(model.config) == masks.source
