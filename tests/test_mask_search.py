"""Mask search (shear.mask_search): graded start, weights untouched, a run that starts from its choice."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny, prune_tiny

from shear.arch import Arch
from shear.errors import ShearError
from shear.importance import activation_importance, keep_indicators, scores_for
from shear.mask_search import SPREAD, graded_init, search_masks
from shear.masks import MASK_TYPES, HardConcreteMasks
from shear.patch import masks_of
from shear.prune import PruneConfig
from shear.target import resolve_target

TARGET = "layers=1,hidden=36,heads=4,kv_heads=2,intermediate=50"


def _setup():
    torch.manual_seed(0)
    model = make_tiny("llama_gqa_bias_untied")
    arch = Arch.from_config(model.config)
    ids = torch.randint(0, model.config.vocab_size, (6, 12))
    return model, arch, resolve_target(arch, TARGET), ids, activation_importance(model, arch, ids)


def test_graded_start_keeps_the_one_shot_choice_ordered_by_importance():
    model, arch, target, _, scores = _setup()
    masks = HardConcreteMasks(arch, target, list(MASK_TYPES))
    graded_init(masks, scores)
    z = keep_indicators(masks)
    for name, s in scores_for(masks, scores).items():
        la, k = masks.log_alpha[name].detach().double(), masks.specs[name].target
        best = torch.topk(s, k, dim=-1).indices.sort(-1).values
        assert torch.equal(z[name].nonzero()[:, -1].view(best.shape), best), name
        # log_alpha follows the scores: positive on the kept units, negative on the others
        order = torch.argsort(s, dim=-1, descending=True, stable=True)
        sorted_la = la.gather(-1, order)
        assert torch.all(sorted_la[..., :-1] > sorted_la[..., 1:]), name
        assert torch.all(sorted_la[..., :k] > 0) and torch.all(sorted_la[..., k:] < 0), name
        assert sorted_la.max() <= SPREAD + 1e-6, name


def test_search_learns_only_the_masks_and_leaves_the_model_as_it_was():
    model, arch, target, ids, scores = _setup()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    records = []
    searched = search_masks(model, arch, target, scores, ids, 6, batch_size=2, lr_masks=0.5, lr_lambdas=1.0,
                            seed=0, log=records.append)  # fmt: skip
    assert masks_of(model) is None
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert [r["search_step"] for r in records] == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor(r["search_loss"])) for r in records)
    masks = HardConcreteMasks(arch, target)
    graded_init(masks, scores)
    assert set(searched) == set(masks.specs)
    for name, la in searched.items():
        assert la.shape == masks.log_alpha[name].shape
        # the masks moved: searching is learning, not a copy of the start
        assert not torch.equal(la, masks.log_alpha[name].detach()), name
    # the swap counts are what the searched log_alpha imply against the graded start
    start = keep_indicators(masks)
    with torch.no_grad():
        for name, la in searched.items():
            masks.log_alpha[name].copy_(la)
    end = keep_indicators(masks)
    assert records[-1]["swapped"] == {n: int((end[n] != start[n]).sum()) // 2 for n in end}
    # same seed, same data: the same search
    kw = dict(batch_size=2, lr_masks=0.5, lr_lambdas=1.0, seed=0)
    again = search_masks(model, arch, target, scores, ids, 6, **kw)
    assert all(torch.equal(again[n], searched[n]) for n in searched)


def test_a_run_searches_then_exports_the_searched_choice(tiny_source, data_dir, tmp_path):
    r = prune_tiny(tiny_source, data_dir, tmp_path / "s", steps=0, search_steps=4, lr_masks=0.5)
    records = [json.loads(x) for x in open(tmp_path / "s" / "log.jsonl")]
    search = [x for x in records if "search_step" in x]
    assert [x["search_step"] for x in search] == [1, 2, 3, 4]
    assert not any("loss" in x for x in records)  # the report's training-loss plots see no search step
    evals = json.loads((tmp_path / "s" / "evals.json").read_text())
    assert evals["exported"] == pytest.approx(evals["masked"], abs=1e-4)
    assert r["steps"] == 0


def test_search_options_are_checked():
    with pytest.raises(ShearError, match="search_steps"):
        PruneConfig(model="m", target="t", data="d", out="o", search_steps=-1).check()
    with pytest.raises(ShearError, match="--init importance"):
        PruneConfig(model="m", target="t", data="d", out="o", search_steps=3, init="uniform").check()
