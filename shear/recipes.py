"""Named pruning recipes: how the masks start, how long they learn, and the refit at the cut.

A recipe fills the options of :class:`shear.prune.PruneConfig` that ``shear prune`` was not
given (``--recipe NAME``; every option given explicitly still wins). The default,
``importance-refit``, is the recipe that beat one-shot pruning + equal-token training on
every domain in three seeds (benchmarks/RESULTS.md, "Refitting the kept weights at the
cut"): the masks start from activation importance and stay frozen from the first step
(the pruning stage trains the weights of that architecture), and before the first step
the kept weights are refitted to the source's layer outputs (:mod:`shear.refit`, damping
0.3) on 128 training sequences. It is the same on CPU, GPU, DDP and FSDP. The others are
what RESULTS.md compares it with:

``paper``
    the method as published: uniform mask initialisation, masks learned to the last
    step, no refit, the paper's dynamic batch loading (step 1 on the loss gap, no floor).
``one-shot``
    the activation-importance choice exported as cut: no training step, no refit
    (Minitron's cut; the baseline of benchmarks/quality.py).
``frozen``
    the importance choice frozen from the first step without the refit (the CPU demo's
    recipe before the refit).
``joint``
    the importance choice learned jointly with the weights for the first half of the
    steps, frozen after; no refit (a refit needs masks that no longer change).
``search``
    as ``importance-refit`` after 40 steps of mask search on the calibration sequences,
    weights frozen (:mod:`shear.mask_search`).
"""

from __future__ import annotations

from typing import Any

from shear.errors import ShearError

#: The options a recipe sets (those ``PruneConfig`` leaves at None until a recipe fills them).
RECIPE_OPTIONS = (
    "steps", "init", "freeze_masks", "search_steps", "refit", "refit_sequences", "dynamic_eta",
    "min_domain_weight",
)  # fmt: skip

#: Training with frozen importance masks from the first step, shear's dynamic loading.
_FROZEN = dict(steps=100, init="importance", freeze_masks=1.0, search_steps=0, refit=0.0,
               refit_sequences=None, dynamic_eta=0.3, min_domain_weight=0.05)  # fmt: skip

RECIPES: dict[str, dict[str, Any]] = {
    "importance-refit": {**_FROZEN, "refit": 0.3, "refit_sequences": 128},
    "paper": {
        **_FROZEN,
        "init": "uniform",
        "freeze_masks": 0.0,
        "dynamic_eta": 1.0,
        "min_domain_weight": 0.0,
    },
    "one-shot": {**_FROZEN, "steps": 0},
    "frozen": _FROZEN,
    "joint": {**_FROZEN, "freeze_masks": 0.5},
    "search": {**_FROZEN, "search_steps": 40, "refit": 0.3, "refit_sequences": 128},
}
#: The recipe of ``shear prune`` and ``PruneConfig()`` when none is named.
DEFAULT_RECIPE = "importance-refit"


def recipe_options(name: str) -> dict[str, Any]:
    """The options recipe ``name`` sets (a copy).

    Raises:
        ShearError: no such recipe.
    """
    if name not in RECIPES:
        raise ShearError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    return dict(RECIPES[name])
