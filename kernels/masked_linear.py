"""Fused masked linear layer: ``y = ((x * m_in) W^T + b) * m_out`` as Triton GEMMs.

Forward: one tiled GEMM (grouped program ordering, Triton tutorial 03) whose prologue scales
the x tile by ``m_in`` as it is loaded and whose epilogue adds the bias and scales by
``m_out``; float32 accumulation, output in x's dtype.

Backward (anchors.md, masked matmul algebra, with ``H0 = dy^T x`` the dW GEMM on the raw
upstream gradient and ``P0 = W * H0``)::

    dx     = ((dy * m_out) W) * m_in            # the forward kernel again, W read transposed
    dW     = m_out[:, None] * m_in[None, :] * H0
    db     = m_out * sum_rows(dy)
    dm_in  = sum_n m_out[n] P0[n, :]
    dm_out = sum_k m_in[k] P0[:, k] + b * sum_rows(dy)

(``dm_out[n] = sum_m dy[m, n] y_pre[m, n]`` with ``y_pre = (x * m_in) W^T + b``; swapping the
sums gives the line above.) The two mask gradients and ``sum_rows(dy)`` are reductions in the
epilogue of the dW GEMM: O(NK) extra work, no extra pass over x or dy. Across tiles they are
reduced deterministically: each program writes its partial row into a float32 buffer
(``[cdiv(N, BLOCK_N), K]`` for dm_in, ``[cdiv(K, BLOCK_K), N]`` for dm_out) and a small torch
sum finishes. Chosen over fp32 atomics for run-to-run reproducibility (a training run's mask
gradients feed the Lagrangian) and because the buffers are tiny next to dW.

Zero skipping: masks hold exact zeros (the hard-concrete clamp, deterministic top-k).
* Output blocks: a program whose ``m_out`` block is all zero (decided in the kernel on the
  loaded mask block) runs its K loop zero times and writes zeros.
* Reduction blocks: a K-block whose ``m_in`` block is all zero is neither loaded nor
  multiplied. The launcher lists the live K-blocks first, with their count, using a few tiny
  device ops (no host sync), and the kernel loops over that list. The loop reads the next
  live block's index one step ahead: Triton software-pipelines a loop only as deep as its
  loads' addresses allow, and an index loaded in the same step (``kb = kidx[i]``) left the
  tiles single-buffered on sm_80 (33 KB of shared memory instead of 64 KB at 128 x 128 x 64
  tiles) and only the weights double-buffered on sm_90, for o_proj, down_proj and every dx
  GEMM with a mask. Read ahead, the tiles keep 2 buffers on sm_80 (as without a mask) and
  2 (x) and 3 (W) on sm_90 (``python -m shear.kernels.aot`` checks it; benchmarks/RESULTS.md).
* Grouped input masks: ``m_in`` may hold one entry per group of consecutive input features
  (o_proj's head mask: one entry per head of head_dim columns), read as ``m_in[k // group]``
  in the kernels; its gradient is summed per group (per head).
* The backward skips the same way: dx reduces only over live N-blocks and writes zeros in
  dead K-blocks; dW tiles with a dead N- or K-block are written as zeros without their M
  loop (a per-tile decision, so that loop stays branch-free too).

Gradient convention for skipped units (project decision): every output and every gradient
of x, W, b and of the NON-zero mask entries equals the reference; the gradient of a mask
entry that is exactly 0 is returned as 0 (computing it would cost the very work skipping
saves, and it never reaches log_alpha: the hard-concrete clamp and the deterministic top-k
both have zero derivative there). Non-finite inputs inside skipped blocks are not seen
(the reference would turn ``nan * 0`` into nan).

Masks can also act as *support* masks (``scale_in=False`` / ``scale_out=False``): the mask is
then used only as the indicator ``mask != 0`` (skip and zero, never scale). The fused MLP uses
this to skip the intermediate channels its intermediate mask has already zeroed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from shear import dispatch
from shear.kernels.heuristics import gemm_config
from shear.kernels.utils import MaskedLayer, autocast_inputs, check_launchable, dot_flags, ensure_contiguous

__all__ = [
    "MaskedLinearFunction",
    "ShearMaskedLinear",
    "masked_linear_backward",
    "masked_linear_backward_input",
    "masked_linear_backward_weight",
    "masked_linear_forward",
    "shear_masked_linear",
]


# --------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _grouped_pid(pid, num_pid_a, num_pid_b, GROUP: tl.constexpr):
    """Map a flat program id to (pid_a, pid_b), GROUP rows of tiles at a time (L2 reuse)."""
    num_pid_in_group = GROUP * num_pid_b
    group_id = pid // num_pid_in_group
    first_pid_a = group_id * GROUP
    group_size = tl.minimum(num_pid_a - first_pid_a, GROUP)
    pid_a = first_pid_a + ((pid % num_pid_in_group) % group_size)
    pid_b = (pid % num_pid_in_group) // group_size
    return pid_a, pid_b


@triton.jit
def _masked_linear_forward_kernel(
    a_ptr,
    b_ptr,
    bias_ptr,
    min_ptr,
    mout_ptr,
    kidx_ptr,
    kcnt_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    HAS_BIAS: tl.constexpr,
    HAS_MIN: tl.constexpr,
    SCALE_MIN: tl.constexpr,
    MIN_GROUP: tl.constexpr,
    HAS_MOUT: tl.constexpr,
    SCALE_MOUT: tl.constexpr,
    MOUT_GROUP: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C[M, N] (+)= (((A * m_in) B + bias) * m_out), A [M, K], B [K, N] (any strides).

    The forward pass runs it with B = W^T; the dx GEMM with A = dy, B = W and the masks swapped.
    A mask holds one entry per MIN_GROUP (MOUT_GROUP) consecutive columns: 1, or head_dim for
    a head mask.
    """
    pid = tl.program_id(0).to(tl.int64)
    pid_m, pid_n = _grouped_pid(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N

    # Reduction steps: every K-block, or only the live ones (m_in not all zero in the block),
    # listed first in kidx by the launcher (on the device: no host sync); see the module
    # docstring for why a list, read one step ahead.
    kb_next = 0
    if HAS_MIN:
        n_steps = tl.load(kcnt_ptr)
        kb_next = tl.load(kidx_ptr)
    else:
        n_steps = tl.cdiv(K, BLOCK_K)
    # An output block whose m_out block is all zero runs its K loop zero times.
    if HAS_MOUT:
        mo = tl.load(mout_ptr + offs_n // MOUT_GROUP, mask=n_ok, other=0.0).to(ACC_DTYPE)
        n_steps = tl.where(tl.sum((mo != 0).to(tl.int32), axis=0) > 0, n_steps, 0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for i in range(0, n_steps):
        if HAS_MIN:
            kb = kb_next
            kb_next = tl.load(kidx_ptr + i + 1, mask=i + 1 < n_steps, other=0)
        else:
            kb = i
        # int64: the dx GEMM strides over W's rows (offset n * K)
        offs_k = (kb * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_ok = offs_k < K
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        if HAS_MIN:
            mi = tl.load(min_ptr + offs_k // MIN_GROUP, mask=k_ok, other=0.0).to(ACC_DTYPE)
            if SCALE_MIN:
                # Prologue: scale in fp32, round once to the operand dtype (the reference
                # rounds x * m_in to x's dtype too).
                a = (a.to(ACC_DTYPE) * mi[None, :]).to(a.dtype)
            else:
                a = tl.where((mi != 0)[None, :], a, 0.0).to(a.dtype)
        b = tl.load(
            b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
            mask=k_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(ACC_DTYPE)
        acc = acc + bias[None, :]
    if HAS_MOUT:
        if SCALE_MOUT:
            acc = acc * mo[None, :]
        else:
            acc = tl.where((mo != 0)[None, :], acc, 0.0)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc = acc + tl.load(c_ptrs, mask=c_mask, other=0.0).to(ACC_DTYPE)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _masked_linear_backward_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    min_ptr,
    mout_ptr,
    dw_ptr,
    dmin_part_ptr,
    dmout_part_ptr,
    colsum_ptr,
    M,
    N,
    K,
    stride_dym,
    stride_dyn,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_dwn,
    stride_dwk,
    HAS_MIN: tl.constexpr,
    SCALE_MIN: tl.constexpr,
    MIN_GROUP: tl.constexpr,
    HAS_MOUT: tl.constexpr,
    SCALE_MOUT: tl.constexpr,
    RUN_DOT: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DMIN: tl.constexpr,
    NEED_DMOUT: tl.constexpr,
    NEED_COLSUM: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    """One [BLOCK_N, BLOCK_K] tile of H0 = dy^T x, and everything its epilogue gives.

    Writes the dW tile, this tile's partial row of dm_in (row pid_n of dmin_part), its
    partial column of dm_out (row pid_k of dmout_part) and, from the pid_k == 0 column of
    programs, sum_rows(dy) (for db and the bias term of dm_out).
    """
    pid = tl.program_id(0).to(tl.int64)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    pid_n, pid_k = _grouped_pid(pid, tl.cdiv(N, BLOCK_N), num_pid_k, GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    k_ok = offs_k < K

    # Liveness of this tile, decided on the loaded masks (no host sync). `pid >= 0` is a
    # runtime "true" so that the flags have one type whichever masks exist.
    n_live = pid >= 0
    dot_on = pid >= 0
    if not RUN_DOT:
        dot_on = pid < 0
    if HAS_MOUT:
        mo = tl.load(mout_ptr + offs_n, mask=n_ok, other=0.0).to(ACC_DTYPE)
        n_live = tl.sum((mo != 0).to(tl.int32), axis=0) > 0
        dot_on = dot_on & n_live
    if HAS_MIN:
        mi = tl.load(min_ptr + offs_k // MIN_GROUP, mask=k_ok, other=0.0).to(ACC_DTYPE)
        dot_on = dot_on & (tl.sum((mi != 0).to(tl.int32), axis=0) > 0)
    # Liveness is uniform over the M loop, so the loop stays branch-free (software-pipelined).
    m_end = tl.where(dot_on, M, 0)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DTYPE)
    cs = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    for m0 in range(0, m_end, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)  # m * N can pass 2^31
        m_ok = offs_m < M
        dyt = tl.load(
            dy_ptr + offs_n[:, None] * stride_dyn + offs_m[None, :] * stride_dym,
            mask=n_ok[:, None] & m_ok[None, :],
            other=0.0,
        )
        xt = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        if NEED_COLSUM:
            cs += tl.sum(dyt.to(ACC_DTYPE), axis=1)
        if UPCAST:
            dyt = dyt.to(tl.float32)
            xt = xt.to(tl.float32)
        acc = tl.dot(dyt, xt, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    if NEED_COLSUM:
        # The pid_k == 0 column of programs owns sum_rows(dy). Where its own tile is dead (its
        # m_in block is all zero, or no dot is needed) the loop above did not run: sum dy alone.
        cs_end = tl.where(n_live & (pid_k == 0) & (m_end == 0), M, 0)
        for m0 in range(0, cs_end, BLOCK_M):
            offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
            dyt = tl.load(
                dy_ptr + offs_n[:, None] * stride_dyn + offs_m[None, :] * stride_dym,
                mask=n_ok[:, None] & (offs_m < M)[None, :],
                other=0.0,
            )
            cs += tl.sum(dyt.to(ACC_DTYPE), axis=1)
        if pid_k == 0:
            tl.store(colsum_ptr + offs_n, cs, mask=n_ok)

    if HAS_MOUT:
        if SCALE_MOUT:
            mo_eff = mo
        else:
            mo_eff = (mo != 0).to(ACC_DTYPE)
    if HAS_MIN:
        if SCALE_MIN:
            mi_eff = mi
        else:
            mi_eff = (mi != 0).to(ACC_DTYPE)

    if NEED_DW:
        dw = acc
        if HAS_MOUT:
            dw = dw * mo_eff[:, None]
        if HAS_MIN:
            dw = dw * mi_eff[None, :]
        tl.store(
            dw_ptr + offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk,
            dw.to(dw_ptr.dtype.element_ty),
            mask=n_ok[:, None] & k_ok[None, :],
        )
    if NEED_DMIN or NEED_DMOUT:
        # P0 = W * H0; a dead tile reads no W (the load is masked off) and gives zeros.
        w = tl.load(
            w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
            mask=n_ok[:, None] & (offs_k < tl.where(dot_on, K, 0))[None, :],
            other=0.0,
        ).to(ACC_DTYPE)
        p = w * acc
        if NEED_DMIN:
            q = p
            if HAS_MOUT:
                q = q * mo_eff[:, None]
            tl.store(dmin_part_ptr + pid_n * K + offs_k, tl.sum(q, axis=0), mask=k_ok)
        if NEED_DMOUT:
            r = p
            if HAS_MIN:
                r = r * mi_eff[None, :]
            tl.store(dmout_part_ptr + pid_k * N + offs_n, tl.sum(r, axis=1), mask=n_ok)


# --------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------


def _mask_group(mask: torch.Tensor | None, size: int, name: str, grouped: bool = False) -> int:
    """Columns per mask entry: 1 for a ``[size]`` mask; ``size // n`` for a grouped ``[n]`` one."""
    if mask is None:
        return 1
    n = mask.numel()
    if mask.dim() != 1 or not (n == size or (grouped and n > 0 and size % n == 0)):
        want = f"({size},) or (n,) with {size} % n == 0" if grouped else f"({size},)"
        raise ValueError(f"{name} must have shape {want}, got {tuple(mask.shape)}")
    return size // n


def _live_blocks(mask: torch.Tensor, block: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the blocks of columns holding a non-zero mask entry, listed first, and their count.

    A few tiny device ops (no host sync): the kernel loops over ``count`` entries of the list.
    """
    n = mask.numel() * group
    nb = triton.cdiv(n, block)
    nz = torch.zeros(nb * block, dtype=torch.bool, device=mask.device)
    nz[:n] = (mask != 0).repeat_interleave(group)
    live = nz.view(nb, block).any(1)
    order = torch.argsort(live.logical_not().to(torch.uint8), stable=True).to(torch.int32)
    return order, live.sum(dtype=torch.int32).reshape(1)


def _launch_gemm(
    a: torch.Tensor,
    b_kn: torch.Tensor,
    out: torch.Tensor,
    bias: torch.Tensor | None,
    m_red: torch.Tensor | None,
    m_col: torch.Tensor | None,
    scale_red: bool,
    scale_col: bool,
    accumulate: bool,
    block_sizes: tuple[int, int, int] | None,
) -> torch.Tensor:
    """out[M, N] (+)= ((a * m_red) b_kn + bias) * m_col; b_kn is a (possibly transposed) view."""
    M, K = a.shape
    N = b_kn.shape[1]
    if M == 0 or N == 0:
        return out
    BM, BN, BK, num_warps, num_stages = gemm_config(M, N, K, a.dtype, block_sizes)
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    dummy = out  # never read: the matching HAS_* flag is False
    red_group = K // m_red.numel() if m_red is not None else 1
    col_group = N // m_col.numel() if m_col is not None else 1
    kidx, kcnt = _live_blocks(m_red, BK, red_group) if m_red is not None else (dummy, dummy)
    _masked_linear_forward_kernel[grid](
        a,
        b_kn,
        bias if bias is not None else dummy,
        m_red if m_red is not None else dummy,
        m_col if m_col is not None else dummy,
        kidx,
        kcnt,
        out,
        M,
        N,
        K,
        a.stride(0),
        a.stride(1),
        b_kn.stride(0),
        b_kn.stride(1),
        out.stride(0),
        out.stride(1),
        HAS_BIAS=bias is not None,
        HAS_MIN=m_red is not None,
        SCALE_MIN=scale_red,
        MIN_GROUP=red_group,
        HAS_MOUT=m_col is not None,
        SCALE_MOUT=scale_col,
        MOUT_GROUP=col_group,
        ACCUMULATE=accumulate,
        BLOCK_M=BM,
        BLOCK_N=BN,
        BLOCK_K=BK,
        GROUP_M=8,
        num_warps=num_warps,
        num_stages=num_stages,
        **dot_flags(a.dtype),
    )
    return out


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------


def masked_linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    m_in: torch.Tensor | None = None,
    m_out: torch.Tensor | None = None,
    *,
    scale_in: bool = True,
    scale_out: bool = True,
    out: torch.Tensor | None = None,
    block_sizes: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Launch the forward GEMM: ``((x * m_in) W^T + b) * m_out``.

    Args:
        x: ``[M, K]`` (2-D; the autograd Function flattens leading dimensions).
        weight: ``[N, K]``, same dtype as x.
        bias: optional ``[N]``.
        m_in: optional input-feature mask, ``[K]`` or one entry per group of ``K // n``
            consecutive features (``[n]``: a head mask on o_proj); all-zero K-blocks are skipped.
        m_out: optional ``[N]`` output-feature mask; all-zero N-blocks are written as zeros.
        scale_in: False uses m_in only as the support indicator ``m_in != 0``.
        scale_out: False uses m_out only as the support indicator ``m_out != 0``.
        out: optional preallocated ``[M, N]`` output (every element is written).
        block_sizes: optional (BLOCK_M, BLOCK_N, BLOCK_K) override (tests).

    Returns:
        ``[M, N]`` in x's dtype.
    """
    check_launchable(x, weight, bias, m_in, m_out)
    M, K = x.shape
    N = weight.shape[0]
    if weight.shape[1] != K or weight.dtype != x.dtype:
        raise ValueError(
            f"weight {tuple(weight.shape)} {weight.dtype} does not fit x {tuple(x.shape)} {x.dtype}"
        )
    _mask_group(m_in, K, "m_in", grouped=True)
    _mask_group(m_out, N, "m_out")
    if out is None:
        out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    return _launch_gemm(x, weight.t(), out, bias, m_in, m_out, scale_in, scale_out, False, block_sizes)


def masked_linear_backward_input(
    dy: torch.Tensor,
    weight: torch.Tensor,
    m_in: torch.Tensor | None = None,
    m_out: torch.Tensor | None = None,
    *,
    scale_in: bool = True,
    scale_out: bool = True,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    block_sizes: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Launch the dx GEMM: ``dx = ((dy * m_out) W) * m_in``.

    Dead N-blocks of m_out are skipped in the reduction; dead K-blocks of m_in are written
    as zeros (or left at their accumulated value).

    Args:
        dy: ``[M, N]`` upstream gradient.
        weight: ``[N, K]``.
        m_in, m_out, scale_in, scale_out: as in :func:`masked_linear_forward`.
        out: optional preallocated ``[M, K]`` output.
        accumulate: add into ``out`` instead of overwriting it.
        block_sizes: optional (BLOCK_M, BLOCK_K, BLOCK_N) override (tests).

    Returns:
        ``[M, K]`` in dy's dtype.
    """
    check_launchable(dy, weight, m_in, m_out)
    M, N = dy.shape
    K = weight.shape[1]
    _mask_group(m_in, K, "m_in", grouped=True)
    _mask_group(m_out, N, "m_out")
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True needs out")
        out = torch.empty(M, K, device=dy.device, dtype=dy.dtype)
    return _launch_gemm(dy, weight, out, None, m_out, m_in, scale_out, scale_in, accumulate, block_sizes)


def masked_linear_backward_weight(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    m_in: torch.Tensor | None = None,
    m_out: torch.Tensor | None = None,
    *,
    scale_in: bool = True,
    scale_out: bool = True,
    need_dw: bool = True,
    need_db: bool | None = None,
    need_dm_in: bool | None = None,
    need_dm_out: bool | None = None,
    dw_out: torch.Tensor | None = None,
    block_sizes: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Launch the dW GEMM ``H0 = dy^T x`` with dW, db, dm_in and dm_out from its epilogue.

    Args:
        dy: ``[M, N]`` upstream gradient (raw: m_out is applied in the epilogue).
        x: ``[M, K]`` the layer's input (raw: m_in is applied in the epilogue).
        weight: ``[N, K]`` (read only for the mask gradients).
        bias: optional ``[N]``; gives dm_out its ``b * sum_rows(dy)`` term.
        m_in, m_out, scale_in, scale_out: as in :func:`masked_linear_forward`.
        need_dw: compute dW.
        need_db: compute db (default: bias is given).
        need_dm_in: compute dm_in (default: m_in is given and scales).
        need_dm_out: compute dm_out (default: m_out is given and scales).
        dw_out: optional preallocated ``[N, K]`` for dW.
        block_sizes: optional (BLOCK_N, BLOCK_K, BLOCK_M) override (tests).

    Returns:
        ``(dW, db, dm_in, dm_out)``, None where not computed; dm entries whose mask is
        exactly 0 are 0 (module docstring).
    """
    check_launchable(dy, x, weight, bias, m_in, m_out)
    M, N = dy.shape
    K = x.shape[1]
    min_group = _mask_group(m_in, K, "m_in", grouped=True)
    _mask_group(m_out, N, "m_out")
    need_db = bias is not None if need_db is None else need_db
    need_dm_in = (m_in is not None and scale_in) if need_dm_in is None else need_dm_in
    need_dm_out = (m_out is not None and scale_out) if need_dm_out is None else need_dm_out
    if need_dm_in and (m_in is None or not scale_in):
        raise ValueError("dm_in needs a scaling m_in")
    if need_dm_out and (m_out is None or not scale_out):
        raise ValueError("dm_out needs a scaling m_out")
    run_dot = need_dw or need_dm_in or need_dm_out
    need_colsum = need_db or (need_dm_out and bias is not None)
    if not (run_dot or need_colsum):
        return None, None, None, None

    BN, BK, BM, num_warps, num_stages = gemm_config(N, K, M, dy.dtype, block_sizes)
    num_pid_n, num_pid_k = triton.cdiv(N, BN), triton.cdiv(K, BK)
    dev = dy.device
    acc_dtype = torch.float64 if dy.dtype == torch.float64 else torch.float32
    dw = None
    if need_dw:
        dw = dw_out if dw_out is not None else torch.empty(N, K, device=dev, dtype=weight.dtype)
    # Every program writes its own slot of the partial buffers (zeros when skipped): empty is enough.
    dmin_part = torch.empty(num_pid_n, K, device=dev, dtype=acc_dtype) if need_dm_in else None
    dmout_part = torch.empty(num_pid_k, N, device=dev, dtype=acc_dtype) if need_dm_out else None
    colsum = torch.empty(N, device=dev, dtype=acc_dtype) if need_colsum else None
    dummy = dy
    if N > 0 and K > 0:
        if M == 0:
            for t in (dw, dmin_part, dmout_part, colsum):
                if t is not None:
                    t.zero_()
        else:
            _masked_linear_backward_kernel[(num_pid_n * num_pid_k,)](
                dy,
                x,
                weight,
                m_in if m_in is not None else dummy,
                m_out if m_out is not None else dummy,
                dw if dw is not None else dummy,
                dmin_part if dmin_part is not None else dummy,
                dmout_part if dmout_part is not None else dummy,
                colsum if colsum is not None else dummy,
                M,
                N,
                K,
                dy.stride(0),
                dy.stride(1),
                x.stride(0),
                x.stride(1),
                weight.stride(0),
                weight.stride(1),
                dw.stride(0) if dw is not None else 0,
                dw.stride(1) if dw is not None else 0,
                HAS_MIN=m_in is not None,
                SCALE_MIN=scale_in,
                MIN_GROUP=min_group,
                HAS_MOUT=m_out is not None,
                SCALE_MOUT=scale_out,
                RUN_DOT=run_dot,
                NEED_DW=need_dw,
                NEED_DMIN=need_dm_in,
                NEED_DMOUT=need_dm_out,
                NEED_COLSUM=need_colsum,
                BLOCK_N=BN,
                BLOCK_K=BK,
                BLOCK_M=BM,
                GROUP_N=8,
                num_warps=num_warps,
                num_stages=num_stages,
                **dot_flags(dy.dtype),
            )

    db = dm_in = dm_out = None
    if need_db:
        db = colsum
        if m_out is not None:
            db = db * (m_out if scale_out else (m_out != 0)).to(acc_dtype)
        db = db.to(bias.dtype if bias is not None else dy.dtype)
    if need_dm_in:
        # Convention: the gradient of a mask entry that is exactly 0 is 0.
        # a grouped mask (one entry per head) gets the sum over its group's columns
        g = dmin_part.sum(0).view(m_in.numel(), min_group).sum(1)
        dm_in = torch.where(m_in != 0, g, 0.0).to(m_in.dtype)
    if need_dm_out:
        g = dmout_part.sum(0)
        if bias is not None:
            g = g + bias.to(acc_dtype) * colsum
        dm_out = torch.where(m_out != 0, g, 0.0).to(m_out.dtype)
    return dw, db, dm_in, dm_out


def masked_linear_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    m_in: torch.Tensor | None = None,
    m_out: torch.Tensor | None = None,
    *,
    needs: tuple[bool, bool, bool, bool, bool] = (True, True, True, True, True),
    scale_in: bool = True,
    scale_out: bool = True,
    block_sizes: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """All gradients of the masked linear layer (two GEMMs: dx, then dW with its epilogue).

    Args:
        dy: ``[M, N]``; x: ``[M, K]``; weight: ``[N, K]``; bias, m_in, m_out as in the forward.
        needs: which of (dx, dW, db, dm_in, dm_out) to compute (absent inputs are never).
        scale_in, scale_out: as in :func:`masked_linear_forward`.
        block_sizes: optional block override for both GEMMs (tests).

    Returns:
        ``(dx, dW, db, dm_in, dm_out)``, None where not needed.
    """
    need_dx, need_dw, need_db, need_dmi, need_dmo = needs
    dx = None
    if need_dx:
        dx = masked_linear_backward_input(
            dy, weight, m_in, m_out, scale_in=scale_in, scale_out=scale_out, block_sizes=block_sizes
        )
    dw, db, dm_in, dm_out = masked_linear_backward_weight(
        dy,
        x,
        weight,
        bias,
        m_in,
        m_out,
        scale_in=scale_in,
        scale_out=scale_out,
        need_dw=need_dw,
        need_db=need_db and bias is not None,
        need_dm_in=need_dmi and m_in is not None and scale_in,
        need_dm_out=need_dmo and m_out is not None and scale_out,
        block_sizes=block_sizes,
    )
    return dx, dw, db, dm_in, dm_out


# --------------------------------------------------------------------------------------
# autograd, functional API, module
# --------------------------------------------------------------------------------------


class MaskedLinearFunction(torch.autograd.Function):
    """Autograd wrapper: forward and backward through the Triton kernels."""

    @staticmethod
    @ensure_contiguous
    def forward(ctx, x, weight, bias, m_in, m_out):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = masked_linear_forward(x2, weight, bias, m_in, m_out)
        ctx.save_for_backward(x2, weight, bias, m_in, m_out)
        ctx.x_shape = shape
        return y.reshape(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, bias, m_in, m_out = ctx.saved_tensors
        dy2 = dy.reshape(-1, weight.shape[0]).contiguous()
        needs = tuple(bool(n) for n in ctx.needs_input_grad)
        dx, dw, db, dm_in, dm_out = masked_linear_backward(dy2, x2, weight, bias, m_in, m_out, needs=needs)
        if dx is not None:
            dx = dx.reshape(ctx.x_shape)
        return dx, dw, db, dm_in, dm_out


def shear_masked_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    m_in: torch.Tensor | None = None,
    m_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused ``((x * m_in) W^T + b) * m_out``; same signature as :func:`shear.ops.masked_linear`.

    Args:
        x: input ``[..., K]`` (float32, float16 or bfloat16).
        weight: ``[N, K]`` in x's dtype.
        bias: optional ``[N]``.
        m_in: optional mask on input features: ``[K]``, or ``[n]`` with one entry per group
            of ``K // n`` consecutive features (a head mask); its gradient is per entry.
        m_out: optional ``[N]`` mask on output features.

    Returns:
        ``[..., N]`` in x's dtype. Gradients flow to every tensor argument; the gradient of a
        mask entry that is exactly 0 is 0 (module docstring).

    Example:
        >>> y = shear_masked_linear(context, o_proj.weight, None, m_in=head_mask)  # one entry per head
    """
    x, weight, bias = autocast_inputs(x, weight, bias)
    return MaskedLinearFunction.apply(x, weight, bias, m_in, m_out)


class ShearMaskedLinear(MaskedLayer, nn.Linear):
    """``nn.Linear`` with optional input and output feature masks; the masked model's o_proj.

    Runs the fused kernels or the reference op per call (:mod:`shear.dispatch`).
    """

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, m_in: torch.Tensor | None = None, m_out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``((x * m_in) W^T + b) * m_out``.

        Args:
            x: ``[..., in_features]``.
            m_in: optional input mask, ``[in_features]`` or one entry per group of features
                (``[heads]`` on o_proj); from the patched model's slot when there is one.
            m_out: optional ``[out_features]`` mask.

        Returns:
            ``[..., out_features]``.
        """
        m_in, m_out = self._masks(m_in, m_out)
        return dispatch.masked_linear(x, self.weight, self.bias, m_in, m_out)
