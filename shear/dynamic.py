"""Dynamic batch loading (Sheared LLaMA, Algorithm 1): domain weights that follow the loss gap.

Every interval, each domain's held-out loss ``l[k]`` is compared with its reference loss
``ref[k]`` and the weights move toward the domains furthest above their reference:

* ``paper`` (default): ``delta = max(l - ref, 0)``; ``w = softmax(ln w + eta * delta)``.
* ``reference``: the original code's variant, without the clamp at 0 and smoothed toward
  uniform: ``alpha = softmax(ln w + eta * (l - ref))``; ``w = (1 - c) alpha + c / K``.

Either way, a floor ``f`` then keeps every domain learning: ``w = f + (1 - K f) w``. The paper's
eta = 1 assumes gaps of a few tenths of a nat; a freshly pruned model sits 2-9 nats above the
source, and e^gap per update hands the whole batch to one or two domains within a few
updates (measured: wiki 0.78 after 320 steps, three domains at 0.01-0.02). shear's defaults
(``--dynamic-eta 0.3``, ``--min-domain-weight 0.05``) keep the direction and bound the swing.

A domain missing from the losses or the references, or a non-finite loss, is an error,
never a NaN weight (the original code produced NaNs for domains without eval tokens).
"""

from __future__ import annotations

import math

import torch

from shear.errors import ShearError

RULES = ("paper", "reference")


def update_weights(
    weights: dict[str, float],
    losses: dict[str, float],
    reference_losses: dict[str, float],
    rule: str = "paper",
    eta: float = 1.0,
    smoothing: float = 1e-4,
    floor: float = 0.0,
) -> dict[str, float]:
    """One dynamic-batch-loading update of the domain weights.

    Args:
        weights: current weights by domain (positive, summing to 1).
        losses: measured held-out loss by domain.
        reference_losses: target loss by domain.
        rule: ``paper`` or ``reference`` (see the module docstring).
        eta: step size on the loss gap (the paper: 1).
        smoothing: ``c`` of the reference rule.
        floor: the least weight of a domain, ``0 <= floor * K < 1``.

    Returns:
        The new weights (same domains, summing to 1).
    """
    if rule not in RULES:
        raise ShearError(f"unknown dynamic-loading rule {rule!r}; choose {' or '.join(RULES)}")
    domains = list(weights)
    for name, table in (("loss", losses), ("reference loss", reference_losses)):
        missing = [d for d in domains if d not in table]
        if missing:
            raise ShearError(f"no {name} for domain(s) {missing}: every domain needs one")
        bad = [d for d in domains if not math.isfinite(table[d])]
        if bad:
            raise ShearError(f"non-finite {name} for domain(s) {bad}")
    if not (0 <= floor and floor * len(domains) < 1):
        raise ShearError(f"min_domain_weight must be >= 0 and below 1 / {len(domains)} domains, got {floor}")
    if any(weights[d] <= 0 for d in domains):
        raise ShearError(f"domain weights must be positive for the update, got {weights}")
    gap = torch.tensor([losses[d] - reference_losses[d] for d in domains], dtype=torch.float64)
    if rule == "paper":
        gap = gap.clamp_min(0.0)
    log_w = torch.tensor([math.log(weights[d]) for d in domains], dtype=torch.float64)
    new = torch.softmax(log_w + eta * gap, dim=0)
    if rule == "reference":
        new = (1 - smoothing) * new + smoothing / len(domains)
    new = floor + (1 - floor * len(domains)) * new
    return {d: float(v) for d, v in zip(domains, new, strict=True)}
