"""shear: targeted structured pruning (Sheared LLaMA) of LLaMA-family models.

The public API is importable from the package root; submodules load on first use so
that ``import shear`` (and the CLI's ``--help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Arch": "shear.arch",
    "ShearError": "shear.errors",
    "resolve_target": "shear.target",
    "MASK_TYPES": "shear.masks",
    "HardConcreteMasks": "shear.masks",
    "plan_masks": "shear.masks",
    "Lagrangian": "shear.lagrangian",
    "build_optimizer": "shear.lagrangian",
    "apply_masks": "shear.patch",
    "remove_masks": "shear.patch",
    "masks_of": "shear.patch",
    "export_pruned": "shear.export",
    "load_source": "shear.loading",
    "load_config": "shear.loading",
    "default_model_dir": "shear.default_model",
    "perplexity": "shear.evaluation",
    "PruneConfig": "shear.prune",
    "run_prune": "shear.prune",
    "TrainConfig": "shear.trainer",
    "run_train": "shear.train",
    "update_weights": "shear.dynamic",
    "fit_reference_losses": "shear.reference_losses",
    "build_corpus": "shear.data",
    "DomainSampler": "shear.data",
    "DomainBatchLoader": "shear.data",
    "build_default_corpus": "shear.corpus",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'shear' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
