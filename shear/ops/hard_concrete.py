"""Hard-concrete (L0) gates: the reference math the Triton kernels reproduce.

Constants are those of the Sheared-LLaMA reference implementation (Louizos et al. 2018
stretch-and-clamp with the reference's temperature). Everything here is plain PyTorch,
differentiable in ``log_alpha``, and works in any float dtype (float64 for checks).
"""

from __future__ import annotations

import math

import torch

#: Stretch interval (l, r): the concrete sample is stretched to (l, r) and clamped to [0, 1].
LIMIT_L = -0.1
LIMIT_R = 1.1
#: Temperature of the concrete distribution.
BETA = 2.0 / 3.0
#: Uniform noise is drawn from (EPS, 1 - EPS) so that log(u) and log(1-u) stay finite.
EPS = 1e-6
#: log_alpha is clamped to [ln 1e-2, ln 1e2] after every optimiser step.
LOG_ALPHA_MIN = math.log(1e-2)
LOG_ALPHA_MAX = math.log(1e2)
#: Initial log_alpha ~ N(INIT_MEAN, INIT_STD).
INIT_MEAN = 5.0
INIT_STD = 1e-2
#: P(z > 0) = sigmoid(log_alpha + KEEP_SHIFT), KEEP_SHIFT = -beta * ln(-l / r) = 1.5986...
KEEP_SHIFT = -BETA * math.log(-LIMIT_L / LIMIT_R)
#: Deterministic masks use soft = sigmoid(log_alpha / beta * DETERMINISTIC_SCALE).
DETERMINISTIC_SCALE = 0.8


def uniform_noise(
    shape: torch.Size | tuple[int, ...],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw u ~ U(EPS, 1 - EPS), the noise of one hard-concrete sample.

    Args:
        shape: shape of the mask.
        device: where to draw.
        dtype: float dtype of the noise.
        generator: optional RNG for reproducible draws.

    Returns:
        The noise tensor.
    """
    u = torch.rand(shape, device=device, dtype=dtype, generator=generator)
    return u * (1.0 - 2.0 * EPS) + EPS


def hard_concrete_sample(log_alpha: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Training-time mask z from log_alpha and noise u (differentiable in log_alpha).

    s = sigmoid((ln u - ln(1-u) + log_alpha) / beta); z = clamp(s (r - l) + l, 0, 1).
    Exact zeros and ones come only from the clamp, whose gradient is zero there.

    Args:
        log_alpha: mask parameters, any shape.
        u: noise of the same shape from :func:`uniform_noise`.

    Returns:
        z in [0, 1], same shape and dtype as ``log_alpha``.
    """
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return torch.clamp(s * (LIMIT_R - LIMIT_L) + LIMIT_L, 0.0, 1.0)


def keep_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z > 0), the expected L0 norm of each unit: sigmoid(log_alpha + KEEP_SHIFT).

    Args:
        log_alpha: mask parameters.

    Returns:
        Keep probabilities, same shape.
    """
    return torch.sigmoid(log_alpha + KEEP_SHIFT)


def soft_mask(log_alpha: torch.Tensor) -> torch.Tensor:
    """Value a kept unit carries under the deterministic mask: sigmoid(log_alpha / beta * 0.8)."""
    return torch.sigmoid(log_alpha / BETA * DETERMINISTIC_SCALE)


def keep_topk(log_alpha: torch.Tensor, keep: int) -> torch.Tensor:
    """0/1 indicator of the ``keep`` highest log_alpha entries of every row (last dimension).

    Ties go to the lower index, so the choice is deterministic.

    Args:
        log_alpha: mask parameters, any number of leading dimensions (1-D: one row; 2-D:
            one row per layer; 3-D ``head``: one row per (layer, KV group)).
        keep: units to keep per row, 0 <= keep <= row length.

    Returns:
        A tensor of the same shape and dtype holding exactly ``keep`` ones per row.
    """
    size = log_alpha.shape[-1]
    if not 0 <= keep <= size:
        raise ValueError(f"cannot keep {keep} of {size} units")
    order = torch.argsort(log_alpha.detach(), dim=-1, descending=True, stable=True)
    indicator = torch.zeros_like(log_alpha, dtype=log_alpha.dtype)
    return indicator.scatter(-1, order[..., :keep], 1.0)


def deterministic_mask(log_alpha: torch.Tensor, keep: int) -> torch.Tensor:
    """Evaluation / finalization mask: the soft value on the ``keep`` best units per row, 0 elsewhere.

    Args:
        log_alpha: mask parameters; every last-dimension row is chosen on its own (see
            :func:`keep_topk`).
        keep: target count of kept units per row.

    Returns:
        z with exactly ``keep`` non-zeros per row; differentiable in the kept entries.
    """
    return soft_mask(log_alpha) * keep_topk(log_alpha, keep)
