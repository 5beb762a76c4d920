"""Hard-concrete (L0) gates as Triton kernels: sampling, keep probability, soft values.

Reference: :mod:`shear.ops.hard_concrete` (the constants are imported from there, the one
source of truth). All kernels are element-wise: they load in the input dtype, compute in
float32 and store in the input dtype (float64 inputs are accepted but computed in float32).

Sampling comes in two forms:

* :func:`shear_hard_concrete_sample` ``(log_alpha, u)``: the reference's signature, noise given.
* :func:`sample_all` ``(log_alphas, seed, offset)``: every mask of a model in ONE forward
  launch and one backward launch. The flat log_alphas are concatenated (``torch.cat`` is
  differentiable and cheap for ~100k units), the noise is drawn inside the kernel with
  ``tl.rand(seed, global_index + offset)`` mapped to ``(EPS, 1 - EPS)`` as
  :func:`shear.ops.hard_concrete.uniform_noise` does, and the result is split back into views.

The backward pass of :func:`sample_all` RECOMPUTES the noise from ``(seed, offset)`` instead
of saving ``u``: Philox is counter based, so the recomputed bits are identical, it costs a few
integer ops per element in a kernel that is memory bound anyway, and it saves one float per
unit of activation memory and a write plus a read of it. :func:`noise_for` exposes the exact
``u`` the kernels use (same ``tl.rand`` helper), for tests and for the reference path.

Gradient at the clamp boundaries: ``torch.clamp``'s backward passes the gradient where
``0 <= pre <= 1`` (both ends inclusive) and returns 0 strictly outside; the kernels do the same
on the pre-clamp value recomputed in backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl

from shear.kernels.heuristics import ELEMENTWISE_BLOCK
from shear.kernels.utils import check_launchable, ensure_contiguous
from shear.ops.hard_concrete import (
    BETA,
    DETERMINISTIC_SCALE,
    EPS,
    KEEP_SHIFT,
    LIMIT_L,
    LIMIT_R,
    keep_topk,
)

# Triton kernels may read only constexpr globals.
_EPS = tl.constexpr(EPS)
_BETA = tl.constexpr(BETA)
_LIMIT_L = tl.constexpr(LIMIT_L)
_LIMIT_R = tl.constexpr(LIMIT_R)

# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _uniform_noise(seed, idx, offset):
    """u ~ U(EPS, 1 - EPS) for the global element indices ``idx`` (int64), as the reference draws it."""
    # int64 counters: Philox then uses the high word too, so offsets never wrap at 2^32.
    r = tl.rand(seed, idx + offset)
    return r * (1.0 - 2.0 * _EPS) + _EPS


@triton.jit
def _noise_kernel(u_ptr, n, seed, offset, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    u = _uniform_noise(seed, idx, offset)
    tl.store(u_ptr + idx, u, mask=mask)


@triton.jit
def _hard_concrete_pre_clamp(la_ptr, u_ptr, idx, mask, seed, offset, HAS_U: tl.constexpr):
    """Returns (s, pre) with s = sigmoid((ln u - ln(1-u) + log_alpha) / beta), pre = s (r - l) + l."""
    la = tl.load(la_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_U:
        u = tl.load(u_ptr + idx, mask=mask, other=0.5).to(tl.float32)
    else:
        u = _uniform_noise(seed, idx, offset)
    s = tl.sigmoid((tl.log(u) - tl.log(1.0 - u) + la) / _BETA)
    pre = s * (_LIMIT_R - _LIMIT_L) + _LIMIT_L
    return s, pre


@triton.jit
def _hard_concrete_forward_kernel(
    la_ptr, u_ptr, z_ptr, n, seed, offset, HAS_U: tl.constexpr, BLOCK: tl.constexpr
):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    _, pre = _hard_concrete_pre_clamp(la_ptr, u_ptr, idx, mask, seed, offset, HAS_U)
    z = tl.minimum(tl.maximum(pre, 0.0), 1.0)
    tl.store(z_ptr + idx, z.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _hard_concrete_backward_kernel(
    dz_ptr, la_ptr, u_ptr, dla_ptr, n, seed, offset, HAS_U: tl.constexpr, BLOCK: tl.constexpr
):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    s, pre = _hard_concrete_pre_clamp(la_ptr, u_ptr, idx, mask, seed, offset, HAS_U)
    dz = tl.load(dz_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    # torch.clamp's backward: gradient passes where min <= pre <= max (inclusive).
    inside = (pre >= 0.0) & (pre <= 1.0)
    dla = tl.where(inside, dz * ((_LIMIT_R - _LIMIT_L) / _BETA) * s * (1.0 - s), 0.0)
    tl.store(dla_ptr + idx, dla.to(dla_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sigmoid_gate_forward_kernel(la_ptr, p_ptr, n, scale, shift, BLOCK: tl.constexpr):
    """p = sigmoid(log_alpha * scale + shift): keep probability and deterministic soft value."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    la = tl.load(la_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    p = tl.sigmoid(la * scale + shift)
    tl.store(p_ptr + idx, p.to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sigmoid_gate_backward_kernel(dp_ptr, la_ptr, dla_ptr, n, scale, shift, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    # Recompute p from log_alpha (a parameter, kept anyway) rather than saving the output.
    la = tl.load(la_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    p = tl.sigmoid(la * scale + shift)
    dp = tl.load(dp_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    tl.store(dla_ptr + idx, (dp * scale * p * (1.0 - p)).to(dla_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, ELEMENTWISE_BLOCK),)


def noise_for(seed: int, offset: int, n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The exact noise ``u`` (float32, in ``(EPS, 1 - EPS)``) that :func:`sample_all` uses.

    Computed by the same ``tl.rand`` helper as the sampling kernels, so
    ``hard_concrete_sample(la, noise_for(seed, offset, n))`` is the reference for
    ``sample_all([la], seed, offset)``.

    Args:
        seed: Philox seed.
        offset: index of the first element in the random stream.
        n: number of elements.
        device: where to compute (CUDA, or CPU under the interpreter); default CUDA if available.

    Returns:
        A float32 tensor of shape ``[n]``.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    u = torch.empty(n, dtype=torch.float32, device=torch.device(device))
    check_launchable(u)
    if n > 0:
        _noise_kernel[_grid(n)](u, n, int(seed), int(offset), BLOCK=ELEMENTWISE_BLOCK)
    return u


def hard_concrete_forward(
    log_alpha: torch.Tensor,
    u: torch.Tensor | None = None,
    seed: int = 0,
    offset: int = 0,
    z: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the sampling kernel on flat contiguous tensors.

    Args:
        log_alpha: ``[n]`` mask parameters.
        u: ``[n]`` noise, or None to draw it in-kernel from ``(seed, offset)``.
        seed: Philox seed (used when ``u`` is None).
        offset: stream offset of element 0 (used when ``u`` is None).
        z: optional preallocated ``[n]`` output in the dtype of ``log_alpha``.

    Returns:
        z, ``[n]`` in the dtype of ``log_alpha``.
    """
    n = log_alpha.numel()
    if z is None:
        z = torch.empty(n, dtype=log_alpha.dtype, device=log_alpha.device)
    check_launchable(log_alpha, u, z)
    if n > 0:
        _hard_concrete_forward_kernel[_grid(n)](
            log_alpha, u if u is not None else log_alpha, z, n, int(seed), int(offset),
            HAS_U=u is not None, BLOCK=ELEMENTWISE_BLOCK,
        )  # fmt: skip
    return z


def hard_concrete_backward(
    dz: torch.Tensor,
    log_alpha: torch.Tensor,
    u: torch.Tensor | None = None,
    seed: int = 0,
    offset: int = 0,
    dla: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient of the sampled mask with respect to log_alpha (noise given or recomputed).

    Args:
        dz: ``[n]`` upstream gradient.
        log_alpha: ``[n]`` mask parameters of the forward pass.
        u: the forward's noise, or None to recompute it from ``(seed, offset)``.
        seed: Philox seed of the forward pass.
        offset: stream offset of the forward pass.
        dla: optional preallocated ``[n]`` output.

    Returns:
        d log_alpha, ``[n]`` in the dtype of ``log_alpha``.
    """
    n = log_alpha.numel()
    if dla is None:
        dla = torch.empty(n, dtype=log_alpha.dtype, device=log_alpha.device)
    check_launchable(dz, log_alpha, u, dla)
    if n > 0:
        _hard_concrete_backward_kernel[_grid(n)](
            dz, log_alpha, u if u is not None else log_alpha, dla, n, int(seed), int(offset),
            HAS_U=u is not None, BLOCK=ELEMENTWISE_BLOCK,
        )  # fmt: skip
    return dla


def sigmoid_gate_forward(log_alpha: torch.Tensor, scale: float, shift: float) -> torch.Tensor:
    """p = sigmoid(log_alpha * scale + shift) on a flat contiguous tensor.

    Args:
        log_alpha: ``[n]`` mask parameters.
        scale: multiplier of log_alpha.
        shift: added after scaling.

    Returns:
        ``[n]`` in the dtype of ``log_alpha``.
    """
    n = log_alpha.numel()
    p = torch.empty(n, dtype=log_alpha.dtype, device=log_alpha.device)
    check_launchable(log_alpha, p)
    if n > 0:
        _sigmoid_gate_forward_kernel[_grid(n)](
            log_alpha, p, n, float(scale), float(shift), BLOCK=ELEMENTWISE_BLOCK
        )
    return p


def sigmoid_gate_backward(
    dp: torch.Tensor, log_alpha: torch.Tensor, scale: float, shift: float
) -> torch.Tensor:
    """Gradient of :func:`sigmoid_gate_forward`: ``dp * scale * p (1 - p)``.

    Args:
        dp: ``[n]`` upstream gradient.
        log_alpha: ``[n]`` mask parameters of the forward pass.
        scale: multiplier of the forward pass.
        shift: shift of the forward pass.

    Returns:
        d log_alpha, ``[n]`` in the dtype of ``log_alpha``.
    """
    n = log_alpha.numel()
    dla = torch.empty(n, dtype=log_alpha.dtype, device=log_alpha.device)
    check_launchable(dp, log_alpha, dla)
    if n > 0:
        _sigmoid_gate_backward_kernel[_grid(n)](
            dp, log_alpha, dla, n, float(scale), float(shift), BLOCK=ELEMENTWISE_BLOCK
        )
    return dla


# --------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------


class HardConcreteSampleFunction(torch.autograd.Function):
    """z = clamp(sigmoid((logit(u) + log_alpha) / beta) (r - l) + l, 0, 1) on flat tensors.

    ``u`` given: saved for backward. ``u`` None: drawn in-kernel from ``(seed, offset)`` and
    recomputed in backward (see the module docstring).
    """

    @staticmethod
    @ensure_contiguous
    def forward(
        ctx: Any, log_alpha: torch.Tensor, u: torch.Tensor | None, seed: int, offset: int
    ) -> torch.Tensor:
        z = hard_concrete_forward(log_alpha.reshape(-1), None if u is None else u.reshape(-1), seed, offset)
        ctx.save_for_backward(log_alpha, u)
        ctx.seed, ctx.offset = seed, offset
        return z.view(log_alpha.shape)

    @staticmethod
    def backward(ctx: Any, dz: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        log_alpha, u = ctx.saved_tensors
        dla = hard_concrete_backward(
            dz.contiguous().reshape(-1),
            log_alpha.reshape(-1),
            None if u is None else u.reshape(-1),
            ctx.seed,
            ctx.offset,
        )
        return dla.view(log_alpha.shape), None, None, None


class SigmoidGateFunction(torch.autograd.Function):
    """p = sigmoid(log_alpha * scale + shift): keep probability (1, KEEP_SHIFT), soft value (0.8/beta, 0)."""

    @staticmethod
    @ensure_contiguous
    def forward(ctx: Any, log_alpha: torch.Tensor, scale: float, shift: float) -> torch.Tensor:
        p = sigmoid_gate_forward(log_alpha.reshape(-1), scale, shift)
        ctx.save_for_backward(log_alpha)
        ctx.scale, ctx.shift = scale, shift
        return p.view(log_alpha.shape)

    @staticmethod
    def backward(ctx: Any, dp: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (log_alpha,) = ctx.saved_tensors
        dla = sigmoid_gate_backward(dp.contiguous().reshape(-1), log_alpha.reshape(-1), ctx.scale, ctx.shift)
        return dla.view(log_alpha.shape), None, None


# --------------------------------------------------------------------------------------
# functional API
# --------------------------------------------------------------------------------------


def shear_hard_concrete_sample(log_alpha: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Training-time mask z from log_alpha and given noise u (kernel twin of ``hard_concrete_sample``).

    Args:
        log_alpha: mask parameters, any shape.
        u: noise of the same shape in ``(EPS, 1 - EPS)``.

    Returns:
        z in [0, 1], same shape and dtype as ``log_alpha``; differentiable in ``log_alpha``.
    """
    if u.shape != log_alpha.shape:
        raise ValueError(f"noise shape {tuple(u.shape)} != log_alpha shape {tuple(log_alpha.shape)}")
    return HardConcreteSampleFunction.apply(log_alpha, u.detach(), 0, 0)


def _concat(log_alphas: Sequence[torch.Tensor]) -> torch.Tensor:
    dtypes = {la.dtype for la in log_alphas}
    devices = {la.device for la in log_alphas}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ValueError(f"log_alphas must share one dtype and device, got {dtypes} on {devices}")
    return torch.cat([la.reshape(-1) for la in log_alphas])


def _split(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    parts = torch.split(flat, [la.numel() for la in like])
    return [p.view(la.shape) for p, la in zip(parts, like, strict=True)]


def sample_all(log_alphas: Sequence[torch.Tensor], seed: int, offset: int = 0) -> list[torch.Tensor]:
    """Sample every hard-concrete mask of a model in one kernel launch (one more in backward).

    Element ``i`` of the concatenation of the flattened ``log_alphas`` uses the noise
    ``noise_for(seed, offset + i, 1)``; the same ``(seed, offset)`` gives the same masks.

    Args:
        log_alphas: mask parameters (any shapes; one dtype and device).
        seed: Philox seed.
        offset: stream offset of the first element (advance it by the total unit count to
            get fresh noise).

    Returns:
        One mask per log_alpha, same shapes and dtype (views of one flat output).
    """
    if len(log_alphas) == 0:
        return []
    flat = _concat(log_alphas)
    z = HardConcreteSampleFunction.apply(flat, None, int(seed), int(offset))
    return _split(z, log_alphas)


def shear_keep_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z > 0) = sigmoid(log_alpha + KEEP_SHIFT) (kernel twin of ``keep_probability``).

    Args:
        log_alpha: mask parameters.

    Returns:
        Keep probabilities, same shape and dtype; differentiable.
    """
    return SigmoidGateFunction.apply(log_alpha, 1.0, KEEP_SHIFT)


def shear_soft_mask(log_alpha: torch.Tensor) -> torch.Tensor:
    """sigmoid(log_alpha / beta * 0.8), the kept value under deterministic masks (twin of ``soft_mask``).

    Args:
        log_alpha: mask parameters.

    Returns:
        Soft values, same shape and dtype; differentiable.
    """
    return SigmoidGateFunction.apply(log_alpha, DETERMINISTIC_SCALE / BETA, 0.0)


def deterministic_masks(log_alphas: Sequence[torch.Tensor], keeps: Sequence[int]) -> list[torch.Tensor]:
    """Evaluation masks: the soft value on the ``keep`` best units of every row, 0 elsewhere.

    The top-k selection uses torch (:func:`shear.ops.hard_concrete.keep_topk`): sorting is not
    kernel work and this runs at evaluation / finalization only. The soft values of all masks
    come from one :func:`shear_soft_mask` launch over the concatenation.

    Args:
        log_alphas: mask parameters of any shape; a row is the last dimension (one per
            layer, or per (layer, KV group) for the ``head`` mask).
        keeps: units to keep per row, one count per log_alpha.

    Returns:
        One mask per log_alpha with exactly ``keep`` non-zeros per row; differentiable in
        the kept entries.
    """
    if len(log_alphas) != len(keeps):
        raise ValueError(f"{len(log_alphas)} log_alphas but {len(keeps)} keep counts")
    if len(log_alphas) == 0:
        return []
    soft = _split(shear_soft_mask(_concat(log_alphas)), log_alphas)
    return [s * keep_topk(la, k) for s, la, k in zip(soft, log_alphas, keeps, strict=True)]
