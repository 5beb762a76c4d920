"""Fused RMSNorm over the kept hidden dimensions, scaled by the hidden mask (Triton).

Reference: :func:`shear.ops.masked_rms_norm.masked_rms_norm`. With ``keep_i = (z_i != 0)``,
``c = max(count(keep), 1)`` and ``r = rsqrt(sum_i keep_i x_i^2 / c + eps)`` per row:

    y_i = w_i * (x_i * r) * z_i            (z None: keep = 1, c = d, z = 1: LlamaRMSNorm)

Forward: one program per row, a block covering the whole row, everything in float32 and one
rounding to the output dtype (the reference rounds ``x * r`` to the input dtype before the
weight multiply, so fp16/bf16 results differ from it by about one rounding). The count is
computed in-kernel from ``z`` (no host synchronisation). ``r`` is saved per row (float32).

Backward, with ``g_i = dy_i w_i z_i``:

    dx_i = r g_i - r^3 / c * keep_i x_i * sum_k g_k x_k
    dw_i = sum_rows dy_i z_i x_i r        dz_i = sum_rows dy_i w_i x_i r

``dw`` and ``dz`` are reduced deterministically: each program accumulates its block of rows in
float32 registers and writes one partial row of ``[num_programs, d]``, summed by torch
(Triton tutorial 05 / Liger-Kernel). No atomics, so the result is bit-reproducible.

Gradient convention: every gradient, including ``dz_i`` where ``z_i == 0``, equals the
reference's (it comes from the same row pass at no extra cost, so nothing is skipped here).
The output dtype follows the reference: ``promote_types(x.dtype, weight.dtype)``.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import nn

from shear import dispatch
from shear.kernels.heuristics import num_programs, row_config
from shear.kernels.utils import MaskedLayer, check_launchable, ensure_contiguous


@triton.jit
def _masked_rms_norm_forward_kernel(
    x_ptr, w_ptr, z_ptr, y_ptr, rstd_ptr, n_cols, eps, HAS_Z: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    cmask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=cmask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        keep = z != 0.0
        # Same count as the reference's keep.sum().clamp_min(1); recomputed per row from z
        # (in L2 after the first row) instead of a host-side reduction.
        count = tl.maximum(tl.sum(keep.to(tl.float32), axis=0), 1.0)
        xk = tl.where(keep, x, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xk * xk, axis=0) / count + eps)
        y = w * (x * rstd) * z
    else:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        y = w * (x * rstd)
    tl.store(rstd_ptr + row, rstd)
    tl.store(y_ptr + row * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _masked_rms_norm_backward_kernel(
    dy_ptr, x_ptr, w_ptr, z_ptr, rstd_ptr, dx_ptr, dw_part_ptr, dz_part_ptr,
    n_rows, n_cols, rows_per_program, HAS_Z: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK)
    cmask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        keep = z != 0.0
        count = tl.maximum(tl.sum(keep.to(tl.float32), axis=0), 1.0)
        wz = w * z
    else:
        z = tl.full((BLOCK,), 1.0, tl.float32)
        count = n_cols * 1.0
        wz = w
    dw_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    dz_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for row in range(row_start, row_end):
        x = tl.load(x_ptr + row * n_cols + cols, mask=cmask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * n_cols + cols, mask=cmask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        xr = x * rstd
        g = dy * wz
        if HAS_Z:
            xk = tl.where(keep, x, 0.0)
        else:
            xk = x
        dot = tl.sum(g * x, axis=0)
        dx = rstd * g - (rstd * rstd * rstd / count) * dot * xk
        tl.store(dx_ptr + row * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=cmask)
        dw_acc += dy * z * xr
        if HAS_Z:
            dz_acc += dy * w * xr
    tl.store(dw_part_ptr + pid * n_cols + cols, dw_acc, mask=cmask)
    if HAS_Z:
        tl.store(dz_part_ptr + pid * n_cols + cols, dz_acc, mask=cmask)


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------


def masked_rms_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    z: torch.Tensor | None,
    eps: float,
    y: torch.Tensor | None = None,
    rstd: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on a contiguous ``[rows, d]`` input.

    Args:
        x: ``[rows, d]`` contiguous input.
        weight: ``[d]`` contiguous weight.
        z: ``[d]`` contiguous hidden mask or None.
        eps: variance epsilon.
        y: optional preallocated ``[rows, d]`` output in ``promote_types(x, weight)``.
        rstd: optional preallocated ``[rows]`` float32 buffer.

    Returns:
        ``(y, rstd)``.
    """
    n_rows, n_cols = x.shape
    block, num_warps = row_config(n_cols)
    if y is None:
        y = torch.empty((n_rows, n_cols), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if rstd is None:
        rstd = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
    check_launchable(x, weight, z, y, rstd)
    if n_rows > 0:
        _masked_rms_norm_forward_kernel[(n_rows,)](
            x, weight, z if z is not None else weight, y, rstd, n_cols, float(eps),
            HAS_Z=z is not None, BLOCK=block, num_warps=num_warps,
        )  # fmt: skip
    return y, rstd


def masked_rms_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    z: torch.Tensor | None,
    rstd: torch.Tensor,
    dx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the backward kernel and reduce the weight / mask partials.

    Args:
        dy: ``[rows, d]`` contiguous upstream gradient.
        x: ``[rows, d]`` contiguous input of the forward pass.
        weight: ``[d]`` weight.
        z: ``[d]`` hidden mask or None.
        rstd: ``[rows]`` float32 from the forward pass.
        dx: optional preallocated ``[rows, d]`` output in the dtype of ``x``.

    Returns:
        ``(dx, dweight, dz)``; dz is None when z is None.
    """
    n_rows, n_cols = x.shape
    block, num_warps = row_config(n_cols)
    if dx is None:
        dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    programs = num_programs(n_rows, x.device)
    rows_per_program = triton.cdiv(n_rows, programs)
    dw_part = torch.empty((programs, n_cols), dtype=torch.float32, device=x.device)
    dz_part = torch.empty((programs, n_cols), dtype=torch.float32, device=x.device) if z is not None else None
    check_launchable(dy, x, weight, z, rstd, dx)
    if n_rows > 0:
        _masked_rms_norm_backward_kernel[(programs,)](
            dy, x, weight, z if z is not None else weight, rstd, dx, dw_part,
            dz_part if dz_part is not None else dw_part, n_rows, n_cols, rows_per_program,
            HAS_Z=z is not None, BLOCK=block, num_warps=num_warps,
        )  # fmt: skip
        dweight = dw_part.sum(0).to(weight.dtype)
        dz = dz_part.sum(0).to(z.dtype) if z is not None else None
    else:
        dweight = torch.zeros_like(weight)
        dz = torch.zeros_like(z) if z is not None else None
    return dx, dweight, dz


# --------------------------------------------------------------------------------------
# autograd, functional API, module
# --------------------------------------------------------------------------------------


class MaskedRMSNormFunction(torch.autograd.Function):
    """y = weight * (x * rstd_kept) * z over the last dimension; gradients for x, weight and z."""

    @staticmethod
    @ensure_contiguous
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, z: torch.Tensor | None, eps: float
    ) -> torch.Tensor:
        shape = x.shape
        x2 = x.view(-1, shape[-1])
        y, rstd = masked_rms_norm_forward(x2, weight, z, eps)
        ctx.save_for_backward(x2, weight, z, rstd)
        return y.view(shape)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, None]:
        x2, weight, z, rstd = ctx.saved_tensors
        dx, dweight, dz = masked_rms_norm_backward(dy.contiguous().view(x2.shape), x2, weight, z, rstd)
        return dx.view(dy.shape), dweight, dz, None


def shear_masked_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, z: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """RMSNorm whose statistics ignore pruned hidden dimensions, then scaled by the mask (fused).

    Same signature and semantics as :func:`shear.ops.masked_rms_norm.masked_rms_norm`.

    Args:
        x: input ``[..., d]``.
        weight: ``[d]`` RMSNorm weight.
        z: optional ``[d]`` hidden mask; dimensions where it is exactly 0 are left out of
            the mean of squares, and the output is multiplied by it.
        eps: variance epsilon.

    Returns:
        ``[..., d]`` in ``promote_types(x.dtype, weight.dtype)``.
    """
    d = x.shape[-1]
    if weight.shape != (d,) or (z is not None and z.shape != (d,)):
        raise ValueError(
            f"weight {tuple(weight.shape)} and z {None if z is None else tuple(z.shape)} must be [{d}]"
        )
    return MaskedRMSNormFunction.apply(x, weight, z, eps)


class ShearMaskedRMSNorm(MaskedLayer, nn.Module):
    """Hugging Face's LlamaRMSNorm (same ``weight`` / ``variance_epsilon``) under the hidden mask.

    The masked model's RMSNorms; runs the fused kernel or the reference op per call
    (:mod:`shear.dispatch`).

    Args:
        hidden_size: d.
        eps: variance epsilon.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """Normalise over the kept dimensions of ``z`` (all when None) and scale by ``z``.

        Args:
            hidden_states: ``[..., d]``.
            z: optional ``[d]`` hidden mask (from the patched model's slot when there is one).

        Returns:
            ``[..., d]``.
        """
        (z,) = self._masks(z)
        return dispatch.masked_rms_norm(hidden_states, self.weight, z, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"
