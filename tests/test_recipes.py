"""Named pruning recipes: the default, explicit options over a recipe, the demo budgets."""

from __future__ import annotations

import pytest

from shear.cli import DEMO_BUDGET_CPU, DEMO_BUDGET_GPU
from shear.errors import ShearError
from shear.prune import PruneConfig
from shear.recipes import DEFAULT_RECIPE, RECIPE_OPTIONS, RECIPES

BASE = dict(model="m", target="layers=1", data="d", out="o")


def _options(cfg: PruneConfig) -> dict:
    return {n: getattr(cfg, n) for n in RECIPE_OPTIONS}


def test_default_is_the_recipe_that_wins():
    """PruneConfig() runs importance masks frozen from step 0 and the refit 0.3 on 128 sequences."""
    cfg = PruneConfig(**BASE)
    assert cfg.recipe == DEFAULT_RECIPE == "importance-refit"
    assert (cfg.init, cfg.freeze_masks, cfg.search_steps) == ("importance", 1.0, 0)
    assert (cfg.refit, cfg.refit_sequences) == (0.3, 128)
    cfg.check()
    assert cfg.recipe_record() == {"recipe": DEFAULT_RECIPE, "options": RECIPES[DEFAULT_RECIPE]}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_resolves_to_valid_options(name):
    cfg = PruneConfig(**BASE, recipe=name)
    assert _options(cfg) == RECIPES[name]
    cfg.check()


def test_paper_and_one_shot_recipes():
    paper = PruneConfig(**BASE, recipe="paper")
    assert (paper.init, paper.freeze_masks, paper.refit) == ("uniform", 0.0, 0.0)
    assert (paper.dynamic_eta, paper.min_domain_weight) == (1.0, 0.0)
    one_shot = PruneConfig(**BASE, recipe="one-shot")
    assert (one_shot.steps, one_shot.init, one_shot.refit) == (0, "importance", 0.0)


def test_explicit_options_override_the_recipe():
    cfg = PruneConfig(**BASE, refit=0.0, steps=7, dynamic_eta=0.5)
    assert (cfg.refit, cfg.steps, cfg.dynamic_eta) == (0.0, 7, 0.5)
    assert (cfg.freeze_masks, cfg.refit_sequences) == (1.0, 128)  # the rest from the recipe
    paper = PruneConfig(**BASE, recipe="paper", init="importance")
    assert (paper.init, paper.freeze_masks) == ("importance", 0.0)


def test_unknown_recipe_is_refused():
    with pytest.raises(ShearError, match="unknown recipe 'fast'; choose from importance-refit, paper"):
        PruneConfig(**BASE, recipe="fast")


@pytest.mark.parametrize("budget", [DEMO_BUDGET_CPU, DEMO_BUDGET_GPU], ids=["cpu", "gpu"])
def test_both_demo_budgets_run_the_default_recipe(budget):
    cfg = PruneConfig(**BASE, **budget["prune"])
    expected = {**RECIPES[DEFAULT_RECIPE], "steps": budget["prune"]["steps"]}
    assert _options(cfg) == expected
