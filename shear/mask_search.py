"""Mask search: learn the hard-concrete masks on the calibration sequences, weights frozen.

Before the weights train, ``--search-steps N`` steps learn log_alpha alone: hard-concrete
samples, the LM loss and the per-row Lagrangian, exactly the pruning objective, on the
calibration sequences that activation importance already read (so no extra training data).
log_alpha starts graded by importance rank (:func:`graded_init`): the best units of a row
positive, the rest negative, units near the row's cut close to zero, so the loss can swap
them in a few steps; the Lagrangian holds every row at that initial expected sparsity. The
searched log_alpha then serve as the scores from which :func:`shear.importance.init_from_importance`
decides the masks, so training starts from the searched choice at the clamp bounds.

Why the weights are frozen: at the CPU demo's budget, training the weights under sampled
masks costs more per token than the learned choice gains (benchmarks/RESULTS.md); searching
with the weights fixed learns the choice without that cost.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from shear.arch import Arch
from shear.importance import scores_for
from shear.lagrangian import Lagrangian, build_optimizer
from shear.masks import HardConcreteMasks
from shear.patch import attach_masks, remove_masks

#: log_alpha of a row's best unit at the start of the search (its worst: about -SPREAD).
SPREAD = 3.0


@torch.no_grad()
def graded_init(masks: HardConcreteMasks, scores: dict[str, torch.Tensor], spread: float = SPREAD) -> None:
    """Set log_alpha linear in each unit's importance rank within its row, zero at the cut.

    A row of ``n`` units keeping ``k``: the unit of rank ``r`` (0 = most important) gets
    ``spread * (k - 0.5 - r) / max(k, n - k)``, so the deterministic masks keep exactly the
    one-shot choice and the units nearest the cut are the easiest to swap.

    Args:
        masks: the masks (changed in place).
        scores: activation importance (:func:`shear.importance.activation_importance`).
        spread: log_alpha of the best (about minus that of the worst) unit of a row.
    """
    for name, s in scores_for(masks, scores).items():
        k, n = masks.specs[name].target, s.shape[-1]
        rank = torch.argsort(s, dim=-1, descending=True, stable=True).argsort(-1).to(torch.float64)
        la = masks.log_alpha[name]
        la.copy_((spread * (k - 0.5 - rank) / max(k, n - k)).to(la))


def search_masks(
    model: nn.Module,
    source: Arch,
    target: Arch,
    scores: dict[str, torch.Tensor],
    calibration: torch.Tensor,
    steps: int,
    *,
    batch_size: int,
    lr_masks: float,
    lr_lambdas: float,
    seed: int,
    mask_types: list[str] | None = None,
    log: Callable[[dict], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Learn the masks with the weights frozen; return the searched log_alpha as scores.

    Args:
        model: the unpruned model (no masks attached; its weights are left unchanged).
        source: its architecture.
        target: the target architecture.
        scores: activation importance, the starting point.
        calibration: ``[n, seq_len]`` calibration sequences, cycled in order.
        steps: optimiser steps.
        batch_size: sequences per step.
        lr_masks: AdamW learning rate of log_alpha.
        lr_lambdas: step size of the multipliers' ascent.
        seed: seed of the mask noise.
        mask_types: mask types to learn (None: those the target shrinks).
        log: called after each step with ``{"search_step", "search_loss", "search_lagrangian",
            "swapped"}`` (units swapped against the start, by type; not "loss": the
            report plots the training steps' losses).

    Returns:
        log_alpha by mask type: scores for :func:`shear.importance.init_from_importance`.
    """
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    masks = HardConcreteMasks(source, target, mask_types, generator=gen).to(device)
    graded_init(masks, scores)
    start = {n: z != 0 for n, z in masks.deterministic().items()}
    with torch.no_grad():
        held = {n: float(e.mean()) for n, e in masks.expected_sparsity().items()}
    lagrangian = Lagrangian(masks, start=held, final=held).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    attach_masks(model, masks)
    try:
        for p in trainable:
            p.requires_grad_(False)
        # the run's optimiser groups; the weights' group is empty while they are frozen
        optimizer = build_optimizer(model, masks, lagrangian, 0.0, lr_masks, lr_lambdas)
        model.train()
        batches = calibration.split(batch_size)
        for step in range(steps):
            ids = batches[step % len(batches)].to(device)
            lm = model(ids, labels=ids, use_cache=False).loss
            lag, _ = lagrangian(masks.expected_sparsity(), step)
            optimizer.zero_grad(set_to_none=True)
            (lm + lag).backward()
            optimizer.step()
            masks.clamp_()
            if log is not None:
                swapped = {n: int((z != 0).ne(start[n]).sum()) // 2 for n, z in masks.deterministic().items()}
                log({"search_step": step + 1, "search_loss": lm.item(), "search_lagrangian": lag.item(),
                     "swapped": swapped})  # fmt: skip
    finally:
        remove_masks(model)
        for p in trainable:
            p.requires_grad_(True)
        model.train(was_training)
    return {n: la.detach().clone() for n, la in masks.log_alpha.items()}
