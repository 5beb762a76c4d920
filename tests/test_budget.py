"""Budget targets: parsing, the candidates under a budget, their ranking, and `shear prune` choosing one."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import TINY_KINDS, make_tiny, prune_tiny

from shear.arch import Arch
from shear.budget import (
    enumerate_candidates,
    is_budget,
    memory_bytes,
    parse_budget,
    shortlist,
    target_text,
)
from shear.cli import main
from shear.errors import ShearError
from shear.target import resolve_target


def test_parse_budget():
    b = parse_budget("params=60M")
    assert (b.kind, b.limit, b.grid, b.candidates) == ("params", 60_000_000, 64, 6)
    assert parse_budget("prunable=1.5e6,grid=16,candidates=3").limit == 1_500_000
    m = parse_budget("memory=1.2GB,context=2048,batch=8")
    assert (m.kind, m.limit, m.context, m.batch) == ("memory", 1_200_000_000, 2048, 8)
    assert is_budget("params=60M") and not is_budget("layers=2,hidden=48") and not is_budget("cfg.json")
    for bad, said in (("params=60M,context=10", "memory budget"), ("params=lots", "parameter count"),
                      ("memory=1GB,colour=3", "cannot read budget item"), ("params=60M,grid=0", "positive")):
        with pytest.raises(ShearError, match=said):  # fmt: skip
            parse_budget(bad)


def test_memory_counts_bf16_weights_and_the_kv_cache_a_forward_pass_keeps():
    model = make_tiny("llama_gqa_bias_untied")
    arch = Arch.from_config(model.config)
    batch, context = 2, 9
    with torch.no_grad():
        cache = model(torch.zeros(batch, context, dtype=torch.long), use_cache=True).past_key_values
    cached = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers)
    weights = sum(p.numel() for p in model.parameters())
    assert memory_bytes(arch, context, batch) == 2 * (weights + cached)


@pytest.mark.parametrize("kind", sorted(TINY_KINDS))
@pytest.mark.parametrize(
    "spec, fraction", [("params=1", 0.7), ("prunable=1", 0.5), ("memory=1,context=64,batch=2", 0.6)]
)
def test_candidates_are_valid_targets_under_the_budget(kind, spec, fraction):
    source = Arch.from_config(make_tiny(kind).config)
    budget = parse_budget(spec + ",grid=8")
    budget = dataclasses.replace(budget, limit=int(budget.cost(source) * fraction))  # a share of the source
    found = enumerate_candidates(source, budget)
    assert found and source not in found
    dims = ("layers", "hidden", "heads", "kv_heads", "intermediate")
    for a in found:
        assert resolve_target(source, target_text(a)) == a  # today's rules: GQA, divisibility, vocab, tying
        assert budget.cost(a) <= budget.limit
        assert a.hidden % 8 == 0 or a.hidden == source.hidden
        assert a.intermediate % 8 == 0 or a.intermediate == source.intermediate
        assert not any(b != a and all(getattr(b, d) >= getattr(a, d) for d in dims) for b in found)
        grown = a.replace(intermediate=a.intermediate + 8)  # the next intermediate size would not fit
        assert a.intermediate + 8 > source.intermediate or budget.cost(grown) > budget.limit
    picked = shortlist(found, 3)
    assert len(picked) == min(3, len(found)) and picked[0] == found[0] and picked[-1] == found[-1]
    with pytest.raises(ShearError, match="no uniform target"):
        enumerate_candidates(source, dataclasses.replace(budget, limit=10))


def test_info_and_plan_print_the_candidates(tiny_source, data_dir, capsys):
    budget = "prunable=60K,grid=16,candidates=3"
    assert main(["info", tiny_source, "--target", budget, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert len(r["candidates"]) == 3 and r["enumerated"] >= 3
    assert all(c["prunable"] <= 60_000 and c["score"] is None for c in r["candidates"])
    argv = ["plan", "--model", tiny_source, "--target", budget, "--data", data_dir, "--rank-seq-len", "32"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "ranked by one-shot importance cut + refit" in printed and "planned for layers=" in printed
    assert main(["plan", "--model", tiny_source, "--data", data_dir]) == 2
    assert "budget target" in capsys.readouterr().err


def test_prune_to_a_budget_chooses_the_best_ranked_candidate(tiny_source, data_dir, tmp_path):
    budget = "prunable=60K,grid=16,candidates=3"
    # one-shot with the ranking's refit: the export is exactly what the chosen candidate's score measured
    r = prune_tiny(tiny_source, data_dir, tmp_path / "run", target=budget, steps=0, refit=0.3)
    ranking = json.loads((tmp_path / "run" / "budget.json").read_text())
    rows = ranking["candidates"]
    assert len(rows) == 3 and [c["score"] for c in rows] == sorted(c["score"] for c in rows)
    assert ranking["chosen"] == rows[0]["target"] and ranking["budget"].startswith("prunable=0.06M")
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (cfg["target"], cfg["budget"]) == (ranking["chosen"], budget)
    exported = json.loads((tmp_path / "run" / "export" / "config.json").read_text())
    assert exported["num_hidden_layers"] == rows[0]["layers"] and exported["hidden_size"] == rows[0]["hidden"]
    assert exported["intermediate_size"] == rows[0]["intermediate"]
    losses = json.loads((tmp_path / "run" / "evals.json").read_text())["exported"]
    assert sum(losses.values()) / len(losses) == pytest.approx(rows[0]["score"], abs=2e-3)
    assert r["export"]


def test_scoring_works_on_a_copy_and_training_steps_count():
    from shear.budget import score_candidate
    from shear.importance import activation_importance

    model = make_tiny("llama_gqa_bias_untied")
    source = Arch.from_config(model.config)
    target = resolve_target(source, "layers=2,hidden=32,heads=2,kv_heads=1,intermediate=48")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 101, (8, 16), generator=torch.Generator().manual_seed(0))
    held_out = {"a": ids[:4], "b": ids[4:]}
    scores = activation_importance(model, source, ids, 4)
    cut = score_candidate(model, source, target, scores, ids, held_out, 4)
    assert cut == score_candidate(model, source, target, scores, ids, held_out, 4)  # the source is untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    steps = list(ids.split(4)) * 3
    trained = score_candidate(model, source, target, scores, ids, held_out, 4, steps, lr=1e-2)
    assert trained < cut  # six steps on the held-out sequences themselves lower their loss
