"""The Lagrangian constraint that steers each mask type to its target, and the optimiser.

Per mask type with target sparsity t (ramped linearly over the warm-up steps), the
original rule: for every row r of the mask (a 1-D mask is one row; a per-layer mask has a
row per layer, the per-group head mask a row per layer and KV group) with expected
sparsity e_r, lag = mean_r [lambda_1 (e_r - t) + lambda_2 (e_r - t)^2]. Every row is held
to the target, not only the mean over rows: averaging first would let uneven rows (4 heads
kept in one layer, 0 in another) meet a target of 2 and leave the export's per-row top-k
to cut what the model relies on. The weights and log_alpha minimise LM loss + sum(lag);
the lambdas maximise it (gradient ascent), which the reference wrote as a learning rate
of -1. PyTorch optimisers reject negative learning rates, so the lambda group uses AdamW's
``maximize=True`` instead: the same update.
"""

from __future__ import annotations

import torch
from torch import nn

from shear.masks import HardConcreteMasks


class Lagrangian(nn.Module):
    """Multipliers lambda_1, lambda_2 (initialised at 0) for every learned mask type.

    Args:
        masks: the run's masks; their specs give each type's target sparsity.
        warmup_steps: steps over which targets ramp linearly from their start to their
            final value (the paper: 640 of 3200); 0 applies the final targets at once.
        start: target sparsity by type at step 0 (default 0, the paper's: the uniform
            initialisation keeps everything). Masks initialised from importance already sit
            near their targets; a ramp from 0 would push the dropped units back in.
        final: target sparsity by type after the warm-up (default: the paper's,
            ``1 - target / size``).
    """

    def __init__(
        self,
        masks: HardConcreteMasks,
        warmup_steps: int = 0,
        start: dict[str, float] | None = None,
        final: dict[str, float] | None = None,
    ):
        super().__init__()
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = warmup_steps
        self.final_targets = {n: (final or {}).get(n, s.target_sparsity) for n, s in masks.specs.items()}
        self.start_targets = {n: (start or {}).get(n, 0.0) for n in masks.specs}
        self.lambda_1 = nn.ParameterDict({n: nn.Parameter(torch.zeros(())) for n in masks.specs})
        self.lambda_2 = nn.ParameterDict({n: nn.Parameter(torch.zeros(())) for n in masks.specs})

    def get_extra_state(self) -> dict[str, float]:
        # the start of the ramp depends on the initialisation, which a resume does not redo
        return dict(self.start_targets)

    def set_extra_state(self, state: dict[str, float]) -> None:
        self.start_targets = dict(state)

    def target_at(self, name: str, step: int) -> float:
        """Target sparsity of mask type ``name`` at optimiser step ``step``."""
        final, begin = self.final_targets[name], self.start_targets[name]
        if self.warmup_steps == 0:
            return final
        return begin + (final - begin) * min(1.0, step / self.warmup_steps)

    def forward(
        self, expected_sparsity: dict[str, torch.Tensor], step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The constraint loss.

        Args:
            expected_sparsity: per row, from :meth:`HardConcreteMasks.expected_sparsity`
                (a scalar counts as one row).
            step: current optimiser step (for the warm-up of the targets).

        Returns:
            The sum over types of lag, and each type's lag term (the mean over its rows).
        """
        terms = {}
        for name, e in expected_sparsity.items():
            gap = e - self.target_at(name, step)
            terms[name] = (self.lambda_1[name] * gap + self.lambda_2[name] * gap * gap).mean()
        total = torch.stack(list(terms.values())).sum() if terms else torch.zeros(())
        return total, terms


def build_optimizer(
    model: nn.Module,
    masks: HardConcreteMasks,
    lagrangian: Lagrangian,
    lr_weights: float = 1e-4,
    lr_masks: float = 1.0,
    lr_lambdas: float = 1.0,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.0,
) -> torch.optim.AdamW:
    """AdamW with the three groups of the method: weights, log_alpha, lambdas (ascent).

    Args:
        model: the masked model; its trainable parameters form the weights group.
        masks: the run's masks (log_alpha group).
        lagrangian: the multipliers (maximised: ``maximize=True``).
        lr_weights: learning rate of the model weights (reference 1e-4).
        lr_masks: learning rate of log_alpha (reference 1.0).
        lr_lambdas: step size of the gradient ascent on the lambdas (reference -1.0
            written as a negative rate; give it positive here).
        betas: AdamW betas (reference (0.9, 0.95)).
        weight_decay: applied to the weights group only (reference 0).

    Returns:
        The optimiser; each param group has a ``"name"``.
    """
    if lr_lambdas < 0:
        raise ValueError("give lr_lambdas as a positive step size: the lambda group already ascends")
    weights = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"name": "weights", "params": weights, "lr": lr_weights, "weight_decay": weight_decay},
        {"name": "log_alpha", "params": list(masks.parameters()), "lr": lr_masks, "weight_decay": 0.0},
        {
            "name": "lambdas",
            "params": list(lagrangian.parameters()),
            "lr": lr_lambdas,
            "weight_decay": 0.0,
            "maximize": True,
        },
    ]
    return torch.optim.AdamW(groups, lr=lr_weights, betas=betas)
