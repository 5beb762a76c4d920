"""Causal grouped-query flash attention that skips heads whose mask is exactly 0.

Reference: :func:`shear.ops.causal_attention`. Flash-attention 2 layout of the work, written
as Triton's tutorial 06 (fused attention) writes it: each kernel's loop over blocks is one
``@triton.jit`` function with a ``MASK`` constexpr, called once for the blocks off the
diagonal (no mask) and once for the diagonal blocks (the causal mask).

* forward: one program per (query block, batch x query head); online softmax in exp2 with
  float32 accumulators (float64 for float64 inputs). Key blocks wholly above the diagonal are
  never visited. The log-sum-exp (base 2) of every row is saved for the backward pass. Query
  head ``h`` reads KV head ``h // (H // G)`` in place: ``repeat_kv`` is never materialised.
* backward: ``delta = rowsum(dO * O)`` in a preprocess kernel; then one program per
  (key block, batch x KV head) accumulates dK and dV over the ``H // G`` query heads of its
  group with a loop inside the program (no atomics: deterministic), and one program per
  (query block, batch x query head) computes dQ.

Head skipping (the masked model multiplies each head's context by its mask before o_proj, so
attention only needs the mask's zeros): a head whose ``head_mask`` entry is exactly 0 loads
nothing and does no FLOPs; forward writes zeros, backward writes dQ = 0 for it and adds
nothing to dK / dV. The decision is taken inside the kernels from the loaded mask value (no
host synchronisation). Gradient convention: every output and every gradient of q, k, v equals
the reference; the head mask itself gets no gradient from this op (it is only a skip
indicator here; its gradient flows through o_proj's masked linear, and a mask entry that is
exactly 0 has a zero-derivative clamp behind it anyway).

Block sizes, warps and stages come from :func:`shear.kernels.heuristics.attention_config`:
16 under the interpreter, flash-attention sizes on a GPU; head_dim up to 256 (tuned for
<= 128). The kernels read one memory layout, the one Hugging Face's projections produce
(see the kernels' section below), so no strides travel as arguments.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from shear.kernels.heuristics import attention_config
from shear.kernels.utils import MaskedLayer, autocast_inputs, check_launchable, dot_flags

_LOG2E = 1.4426950408889634
#: Largest head dimension the kernels take (block sizes are tuned for <= 128).
MAX_HEAD_DIM = 256


# --------------------------------------------------------------------------------------
# kernels
#
# Memory layout (the one Hugging Face's projections produce): queries, outputs and their
# gradients live in dense [B, S, H, D] memory, keys, values and theirs in dense [B, S, G, D];
# the launchers hand the kernels nothing else (a tensor in another layout is copied first).
# So no strides travel: row s of head h of batch b lies at ((b * S + s) * heads + h) * D.
# Each program takes a 64-bit pointer to row 0 of its head (_head) and 32-bit offsets within
# it (the launchers check S * heads * D < 2^31): 64-bit offset tiles cost registers.
# --------------------------------------------------------------------------------------


@triton.jit
def _head(ptr, b, head, S, heads, HEAD_DIM: tl.constexpr):
    """Row 0 of ``head`` of batch ``b`` in dense [B, S, heads, D] memory (rows heads * D apart)."""
    return ptr + (b.to(tl.int64) * S * heads + head) * HEAD_DIM


@triton.jit
def _operand(x, UPCAST: tl.constexpr):
    """A tl.dot operand: bf16 upcast to fp32 under the interpreter (utils.dot_flags)."""
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _load_rows(
    head,
    rows,
    n_rows,
    row_stride,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TRANSPOSED: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Rows ``rows`` of one head as a [rows, BLOCK_D] tile ([BLOCK_D, rows] if TRANSPOSED);
    zeros for rows >= ``n_rows`` and columns >= HEAD_DIM."""
    offs_d = tl.arange(0, BLOCK_D)
    if TRANSPOSED:
        ptrs = head + rows[None, :] * row_stride + offs_d[:, None]
        mask = (rows < n_rows)[None, :] & (offs_d < HEAD_DIM)[:, None]
    else:
        ptrs = head + rows[:, None] * row_stride + offs_d[None, :]
        mask = (rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :]
    return _operand(tl.load(ptrs, mask=mask, other=0.0), UPCAST)


@triton.jit
def _store_rows(head, rows, n_rows, row_stride, tile, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store a [rows, BLOCK_D] tile into rows ``rows`` (< ``n_rows``) of one head."""
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(head + rows[:, None] * row_stride + offs_d[None, :], tile.to(head.dtype.element_ty), mask=mask)


@triton.jit
def _query_block(start_m, h, S, hm_ptr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr):
    """(lo, hi, n_load) of query block ``start_m`` of head ``h``: keys [0, lo) lie left of the
    diagonal, [lo, hi) are the diagonal blocks, rows < n_load are loaded. A skipped head
    (mask exactly 0) gets empty ranges: it loads nothing and its outputs are written as 0."""
    lo = start_m * BLOCK_M
    hi = tl.minimum(lo + BLOCK_M, S)
    n_load = S
    if HAS_MASK:
        keep = tl.load(hm_ptr + h) != 0
        # Limits of 0, rather than `& keep` on blocks: the interpreter cannot AND a block with a scalar.
        lo = tl.where(keep, lo, 0)
        hi = tl.where(keep, hi, 0)
        n_load = tl.where(keep, S, 0)
    return lo, hi, n_load


@triton.jit
def _attention_forward_inner(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    kv_stride,
    lo,
    hi,
    offs_m,
    S,
    qk_scale,
    MASK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """Online softmax of one query block over the key blocks [lo, hi) (Triton tutorial 06).

    MASK: the diagonal blocks, under the causal mask (which also hides keys >= S); every row
    sees at least key ``lo`` there, so no row is all -inf. Without MASK (left of the
    diagonal) every row sees every key.
    """
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kt = _load_rows(k_base, cols, S, kv_stride, HEAD_DIM, BLOCK_D, True, UPCAST)
        v = _load_rows(v_base, cols, S, kv_stride, HEAD_DIM, BLOCK_D, False, UPCAST)
        qk = tl.dot(q, kt, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE) * qk_scale
        if MASK:
            qk = tl.where((offs_m[:, None] >= cols[None, :]) & (cols < S)[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(
            p.to(v.dtype), v, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE
        )
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attention_forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    lse_ptr,
    hm_ptr,
    S,
    H,
    G,
    qk_scale,
    HAS_MASK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """Output and base-2 log-sum-exp of one query block of one query head."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    g = h // (H // G)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    lo, hi, n_load = _query_block(start_m, h, S, hm_ptr, HAS_MASK, BLOCK_M)
    q_stride = H * HEAD_DIM
    q = _load_rows(
        _head(q_ptr, b, h, S, H, HEAD_DIM), offs_m, n_load, q_stride, HEAD_DIM, BLOCK_D, False, UPCAST
    )

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    kv = (_head(k_ptr, b, g, S, G, HEAD_DIM), _head(v_ptr, b, g, S, G, HEAD_DIM), G * HEAD_DIM)
    acc, l_i, m_i = _attention_forward_inner(
        acc, l_i, m_i, q, *kv, 0, lo, offs_m, S, qk_scale, False,
        HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, INPUT_PRECISION, ACC_DTYPE,
    )  # fmt: skip
    acc, l_i, m_i = _attention_forward_inner(
        acc, l_i, m_i, q, *kv, lo, hi, offs_m, S, qk_scale, True,
        HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, INPUT_PRECISION, ACC_DTYPE,
    )  # fmt: skip

    # l_i == 0 only for a skipped head: acc is 0 there and so is the output.
    empty = l_i == 0
    l_safe = tl.where(empty, 1.0, l_i)
    _store_rows(
        _head(o_ptr, b, h, S, H, HEAD_DIM), offs_m, S, q_stride, acc / l_safe[:, None], HEAD_DIM, BLOCK_D
    )
    lse = tl.where(empty, 0.0, m_i + tl.log2(l_safe))
    tl.store(lse_ptr + bh.to(tl.int64) * S + offs_m, lse, mask=offs_m < S)


@triton.jit
def _attention_backward_preprocess_kernel(
    o_ptr,
    do_ptr,
    delta_ptr,
    hm_ptr,
    S,
    H,
    HAS_MASK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """delta[b, h, i] = sum_d dO * O (zero for a skipped head, which the backward never reads)."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    _, _, n_load = _query_block(start_m, h, S, hm_ptr, HAS_MASK, BLOCK_M)
    o = _load_rows(
        _head(o_ptr, b, h, S, H, HEAD_DIM), offs_m, n_load, H * HEAD_DIM, HEAD_DIM, BLOCK_D, False, False
    )
    do = _load_rows(
        _head(do_ptr, b, h, S, H, HEAD_DIM), offs_m, n_load, H * HEAD_DIM, HEAD_DIM, BLOCK_D, False, False
    )
    delta = tl.sum(o.to(ACC_DTYPE) * do.to(ACC_DTYPE), axis=1)
    tl.store(delta_ptr + bh.to(tl.int64) * S + offs_m, delta, mask=offs_m < S)


@triton.jit
def _attention_dkdv_inner(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_ptr,
    delta_ptr,
    q_stride,
    lo,
    hi,
    offs_n,
    S,
    qk_scale,
    MASK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """dK, dV of one key block from the query blocks [lo, hi) of one query head.

    ``lse_ptr`` / ``delta_ptr`` point at that head's rows. MASK: the diagonal query blocks,
    under the causal mask (which also hides rows >= S). Without MASK (below the diagonal)
    every row sees every key of the block; rows >= S of the last block load q = dO = 0 and
    lse = delta = 0, so they add exactly 0.
    """
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < S
        qt = _load_rows(q_base, rows, S, q_stride, HEAD_DIM, BLOCK_D, True, UPCAST)
        do = _load_rows(do_base, rows, S, q_stride, HEAD_DIM, BLOCK_D, False, UPCAST)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
        pt = tl.exp2(
            tl.dot(k, qt, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE) * qk_scale - lse[None, :]
        )
        if MASK:
            pt = tl.where((rows[None, :] >= offs_n[:, None]) & row_ok[None, :], pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        dpt = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    return dk, dv


@triton.jit
def _attention_backward_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    hm_ptr,
    S,
    H,
    G,
    qk_scale,
    sm_scale,
    HAS_MASK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """dK, dV of one key block of one KV head, summed over the query heads of its group."""
    start_n = tl.program_id(0)
    bg = tl.program_id(1)
    b = bg // G
    g = bg % G
    n_rep = H // G
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kv_stride = G * HEAD_DIM
    k = _load_rows(_head(k_ptr, b, g, S, G, HEAD_DIM), offs_n, S, kv_stride, HEAD_DIM, BLOCK_D, False, UPCAST)
    v = _load_rows(_head(v_ptr, b, g, S, G, HEAD_DIM), offs_n, S, kv_stride, HEAD_DIM, BLOCK_D, False, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)

    lo = start_n * BLOCK_N
    diag_hi = tl.minimum(lo + BLOCK_N, S)
    for r in range(0, n_rep):
        h = g * n_rep + r
        d_hi = diag_hi
        hi = S
        if HAS_MASK:
            keep = tl.load(hm_ptr + h) != 0
            # A skipped query head contributes nothing: empty query ranges, no loads.
            d_hi = tl.where(keep, d_hi, lo)
            hi = tl.where(keep, hi, lo)
        rows = (b * H + h).to(tl.int64) * S
        head = (
            _head(q_ptr, b, h, S, H, HEAD_DIM),
            _head(do_ptr, b, h, S, H, HEAD_DIM),
            lse_ptr + rows,
            delta_ptr + rows,
            H * HEAD_DIM,
        )
        dk, dv = _attention_dkdv_inner(
            dk, dv, k, v, *head, lo, d_hi, offs_n, S, qk_scale, True,
            HEAD_DIM, BLOCK_D, BLOCK_M, UPCAST, INPUT_PRECISION, ACC_DTYPE,
        )  # fmt: skip
        dk, dv = _attention_dkdv_inner(
            dk, dv, k, v, *head, d_hi, hi, offs_n, S, qk_scale, False,
            HEAD_DIM, BLOCK_D, BLOCK_M, UPCAST, INPUT_PRECISION, ACC_DTYPE,
        )  # fmt: skip

    _store_rows(_head(dk_ptr, b, g, S, G, HEAD_DIM), offs_n, S, kv_stride, dk * sm_scale, HEAD_DIM, BLOCK_D)
    _store_rows(_head(dv_ptr, b, g, S, G, HEAD_DIM), offs_n, S, kv_stride, dv, HEAD_DIM, BLOCK_D)


@triton.jit
def _attention_dq_inner(
    dq,
    q,
    do,
    lse,
    delta,
    k_base,
    v_base,
    kv_stride,
    lo,
    hi,
    offs_m,
    S,
    qk_scale,
    MASK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """dQ of one query block from the key blocks [lo, hi); MASK as in the forward's inner loop."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(k_base, cols, S, kv_stride, HEAD_DIM, BLOCK_D, False, UPCAST)
        vt = _load_rows(v_base, cols, S, kv_stride, HEAD_DIM, BLOCK_D, True, UPCAST)
        p = tl.exp2(
            tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE) * qk_scale
            - lse[:, None]
        )
        if MASK:
            p = tl.where((offs_m[:, None] >= cols[None, :]) & (cols < S)[None, :], p, 0.0)
        dp = tl.dot(do, vt, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    return dq


@triton.jit
def _attention_backward_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    hm_ptr,
    S,
    H,
    G,
    qk_scale,
    sm_scale,
    HAS_MASK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """dQ of one query block of one query head (zeros for a skipped head)."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    g = h // (H // G)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    lo, hi, n_load = _query_block(start_m, h, S, hm_ptr, HAS_MASK, BLOCK_M)
    q_stride = H * HEAD_DIM
    q = _load_rows(
        _head(q_ptr, b, h, S, H, HEAD_DIM), offs_m, n_load, q_stride, HEAD_DIM, BLOCK_D, False, UPCAST
    )
    do = _load_rows(
        _head(do_ptr, b, h, S, H, HEAD_DIM), offs_m, n_load, q_stride, HEAD_DIM, BLOCK_D, False, UPCAST
    )
    lse = tl.load(lse_ptr + bh.to(tl.int64) * S + offs_m, mask=offs_m < n_load, other=0.0)
    delta = tl.load(delta_ptr + bh.to(tl.int64) * S + offs_m, mask=offs_m < n_load, other=0.0)
    kv = (_head(k_ptr, b, g, S, G, HEAD_DIM), _head(v_ptr, b, g, S, G, HEAD_DIM), G * HEAD_DIM)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    dq = _attention_dq_inner(
        dq, q, do, lse, delta, *kv, 0, lo, offs_m, S, qk_scale, False,
        HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, INPUT_PRECISION, ACC_DTYPE,
    )  # fmt: skip
    dq = _attention_dq_inner(
        dq, q, do, lse, delta, *kv, lo, hi, offs_m, S, qk_scale, True,
        HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, INPUT_PRECISION, ACC_DTYPE,
    )  # fmt: skip
    _store_rows(_head(dq_ptr, b, h, S, H, HEAD_DIM), offs_m, S, q_stride, dq * sm_scale, HEAD_DIM, BLOCK_D)


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_mask: torch.Tensor | None) -> tuple:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("shear_causal_attention: q, k, v must be [B, heads, S, D]")
    B, H, S, D = q.shape
    G = k.shape[1]
    if G == 0 or H % G != 0 or k.shape != (B, G, S, D) or v.shape != (B, G, S, D):
        raise ValueError(
            f"shear_causal_attention: need q [B, H, S, D], k and v [B, G, S, D] with H % G == 0; "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"shear_causal_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"shear_causal_attention: head_dim {D} > {MAX_HEAD_DIM} is not supported")
    if S * H * D >= 2**31:
        raise ValueError(
            f"shear_causal_attention: S * H * D = {S * H * D} needs 64-bit offsets within a sequence"
        )
    if head_mask is not None and head_mask.shape != (H,):
        raise ValueError(f"shear_causal_attention: head_mask must be [{H}], got {tuple(head_mask.shape)}")
    if head_mask is not None and head_mask.device != q.device:
        raise ValueError(f"shear_causal_attention: head_mask is on {head_mask.device}, q on {q.device}")
    return B, H, G, S, D


def _bshd(t: torch.Tensor) -> torch.Tensor:
    """``t`` ([B, heads, S, D]) as a view of dense [B, S, heads, D] memory: as is when it already
    is one (Hugging Face's projections, after RoPE too), else a copy."""
    B, n, S, D = t.shape
    want = (S * n * D, D, n * D, 1)
    if all(size == 1 or st == w for size, st, w in zip(t.shape, t.stride(), want, strict=True)):
        return t
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _empty_bshd(B: int, n: int, S: int, D: int, like: torch.Tensor) -> torch.Tensor:
    return torch.empty((B, S, n, D), dtype=like.dtype, device=like.device).transpose(1, 2)


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float,
    head_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel.

    Args:
        q: ``[B, H, S, D]``; read in place when it views dense ``[B, S, H, D]`` memory (as
            Hugging Face's attention hands it over), copied into that layout otherwise.
        k: ``[B, G, S, D]``, likewise.
        v: ``[B, G, S, D]``, likewise.
        scaling: factor on ``q k^T``.
        head_mask: optional ``[H]``; heads where it is exactly 0 are skipped (zeros).

    Returns:
        ``(out [B, S, H, D] contiguous, lse [B, H, S])``; lse is the base-2 log-sum-exp of
        the scaled scores, in the accumulator dtype (0 for skipped heads).
    """
    check_launchable(q, k, v, head_mask)
    B, H, G, S, D = _check_inputs(q, k, v, head_mask)
    out = torch.empty((B, S, H, D), dtype=q.dtype, device=q.device)
    flags = dot_flags(q.dtype)
    lse = torch.empty(
        (B, H, S), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32, device=q.device
    )
    if q.numel() == 0:
        return out, lse
    cfg = attention_config(D, q.dtype, S)
    f = cfg.fwd
    _attention_forward_kernel[(triton.cdiv(S, f.block_m), B * H)](
        _bshd(q), _bshd(k), _bshd(v), out, lse,
        head_mask.contiguous() if head_mask is not None else q,
        S, H, G, scaling * _LOG2E,
        HAS_MASK=head_mask is not None, HEAD_DIM=D, BLOCK_D=cfg.block_d, BLOCK_M=f.block_m,
        BLOCK_N=f.block_n, num_warps=f.num_warps, num_stages=f.num_stages, **flags,
    )  # fmt: skip
    return out, lse


def attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scaling: float,
    head_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels (preprocess, dK/dV, dQ).

    Args:
        do: gradient of the output ``[B, S, H, D]``.
        q, k, v: the forward's inputs (layouts as in :func:`attention_forward`).
        out: forward output ``[B, S, H, D]``.
        lse: forward log-sum-exp ``[B, H, S]``.
        scaling: factor on ``q k^T``.
        head_mask: optional ``[H]``, as in the forward.

    Returns:
        ``(dq [B, H, S, D], dk, dv [B, G, S, D])`` in the inputs' dtype, each a view of dense
        ``[B, S, heads, D]`` memory (the layout of Hugging Face's q, k, v); dq is 0 on
        skipped heads.
    """
    check_launchable(do, q, k, v, out, head_mask)
    B, H, G, S, D = _check_inputs(q, k, v, head_mask)
    dq, dk, dv = _empty_bshd(B, H, S, D, q), _empty_bshd(B, G, S, D, k), _empty_bshd(B, G, S, D, v)
    if q.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    q, k, v = _bshd(q), _bshd(k), _bshd(v)
    do, out = do.contiguous(), out.contiguous()
    hm = head_mask.contiguous() if head_mask is not None else q
    flags = dot_flags(q.dtype)
    cfg = attention_config(D, q.dtype, S)
    common = dict(HAS_MASK=head_mask is not None, HEAD_DIM=D, BLOCK_D=cfg.block_d)
    delta = torch.empty_like(lse)
    pre_m = cfg.dq.block_m
    _attention_backward_preprocess_kernel[(triton.cdiv(S, pre_m), B * H)](
        out, do, delta, hm, S, H, BLOCK_M=pre_m, ACC_DTYPE=flags["ACC_DTYPE"], **common
    )
    args = (lse, delta)
    scales = (scaling * _LOG2E, scaling)
    c = cfg.dkdv
    _attention_backward_dkdv_kernel[(triton.cdiv(S, c.block_n), B * G)](
        q, k, v, do, *args, dk, dv, hm, S, H, G, *scales, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
        num_warps=c.num_warps, num_stages=c.num_stages, **common, **flags,
    )  # fmt: skip
    c = cfg.dq
    _attention_backward_dq_kernel[(triton.cdiv(S, c.block_m), B * H)](
        q, k, v, do, *args, dq, hm, S, H, G, *scales, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
        num_warps=c.num_warps, num_stages=c.num_stages, **common, **flags,
    )  # fmt: skip
    return dq, dk, dv


class MaskedAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: flash forward (saves the log-sum-exp), FA2-style backward."""

    @staticmethod
    def forward(
        ctx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scaling: float,
        head_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        if head_mask is not None:
            # the kernel indexes the mask as a dense [H] array: a strided view (such as one
            # element per head taken from a per-channel mask) would be read wrongly
            head_mask = head_mask.detach().contiguous()
        out, lse = attention_forward(q, k, v, scaling, head_mask)
        ctx.scaling = scaling
        ctx.has_mask = head_mask is not None
        ctx.save_for_backward(q, k, v, out, lse, *([head_mask] if head_mask is not None else []))
        return out

    @staticmethod
    def backward(ctx, do: torch.Tensor):
        q, k, v, out, lse, *rest = ctx.saved_tensors
        head_mask = rest[0] if ctx.has_mask else None
        dq, dk, dv = attention_backward(do, q, k, v, out, lse, ctx.scaling, head_mask)
        # The head mask is only a skip indicator here: no gradient (see the module docstring).
        return dq, dk, dv, None, None


def shear_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float,
    head_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal GQA flash attention with head skipping (Triton).

    Same signature and semantics as :func:`shear.ops.causal_attention`.

    Args:
        q: queries ``[B, H, S, D]`` (any strides).
        k: keys ``[B, G, S, D]``, ``H % G == 0``; query head h uses KV head ``h // (H // G)``.
        v: values ``[B, G, S, D]``.
        scaling: factor on ``q k^T``.
        head_mask: optional ``[H]``; heads where it is exactly 0 do no work and return
            zeros (dq = 0, no dk / dv contribution); other heads are NOT scaled by it. It
            receives no gradient from this op.

    Returns:
        ``[B, S, H, D]`` contiguous, in q's dtype.

    Examples:
        >>> out = shear_causal_attention(q, k, v, q.shape[-1] ** -0.5, head_mask=z_head)  # doctest: +SKIP
    """
    q, k, v = autocast_inputs(q, k, v)
    return MaskedAttentionFunction.apply(q, k, v, scaling, head_mask)


def _mask_problem(attention_mask: Any, batch: int, q_len: int, kv_len: int) -> str | None:
    """Why ``attention_mask`` is not purely causal, or None when it is None or exactly causal.

    Reading a tensor mask's values costs a host synchronisation; a mask function returning None
    for purely causal masks (Hugging Face's ``sdpa_mask``) avoids it.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        return f"an attention_mask of type {type(attention_mask).__name__}"
    m = attention_mask
    if m.dim() != 4 or m.shape[-2:] != (q_len, kv_len) or m.shape[0] not in (1, batch) or m.shape[1] != 1:
        return (
            f"an attention_mask of shape {tuple(m.shape)}, not a [B, 1, S, S] causal mask (padding, custom)"
        )
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=m.device).tril()
    if m.dtype == torch.bool:
        allowed = m
    else:
        # Additive float mask: 0 where visible, a very negative value (finfo.min or -inf) elsewhere.
        allowed = m == 0
        if not bool((m[..., ~causal] <= torch.finfo(m.dtype).min / 2).all()):
            return "an additive attention_mask that is not purely causal (padding or a custom bias)"
    if not bool((allowed == causal).all()):
        return "an attention_mask that is not purely causal (padding or a custom pattern)"
    return None


def unsupported_reason(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    **kwargs: Any,
) -> str | None:
    """Why the kernel cannot compute this Hugging Face attention call, or None when it can.

    The one statement of the kernel's limits: :func:`shear.dispatch.attention` falls back to
    SDPA when there is a reason, :func:`shear_attention_interface` raises it.

    Args:
        module, query, key, attention_mask, dropout, kwargs: as transformers passes them to
            an attention function (query ``[B, H, S, D]``, key ``[B, G, S_kv, D]``).
    """
    B, H, S, D = query.shape
    kv_len = key.shape[2]
    if D > MAX_HEAD_DIM:
        return f"head_dim {D} > {MAX_HEAD_DIM}"
    if dropout > 0.0 and getattr(module, "training", True):
        return f"attention dropout ({dropout}) in training"
    if kv_len != S:
        return f"a query length {S} != key length {kv_len} (KV cache)"
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if not is_causal and S > 1:
        return "non-causal attention"
    if kwargs.get("softcap") is not None:
        return "softcap"
    if kwargs.get("output_attentions", False):
        return "output_attentions"
    window = kwargs.get("sliding_window")
    if window is not None and kv_len > window:
        return f"a sliding window ({window}) shorter than the sequence ({kv_len})"
    return _mask_problem(attention_mask, B, S, kv_len)


def shear_attention_interface(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function (``AttentionInterface``) running the Triton kernel.

    Reads an optional per-query-head skip mask from ``module.shear_head_mask`` (``[H]``).
    Register it with ``AttentionInterface.register(name, shear_attention_interface)`` and an
    ``AttentionMaskInterface`` entry for the same name that returns None for purely causal
    masks (``transformers.masking_utils.sdpa_mask``). The masked model registers
    :func:`shear.dispatch.attention` instead, which falls back to SDPA where this raises.

    Args:
        module: the attention module (``LlamaAttention`` and the like).
        query: ``[B, H, S, D]``.
        key: ``[B, G, S, D]``.
        value: ``[B, G, S, D]``.
        attention_mask: None or a purely causal 4D mask (bool, or additive float).
        scaling: factor on ``q k^T``; ``D ** -0.5`` when None.
        dropout: attention dropout probability; must be 0 while ``module.training``.
        **kwargs: Hugging Face's extra arguments (``is_causal``, ``softcap``,
            ``sliding_window``, ``output_attentions``).

    Returns:
        ``(attn_output [B, S, H, D], None)``.

    Raises:
        ValueError: for anything the kernel does not compute (:func:`unsupported_reason`).
    """
    reason = unsupported_reason(module, query, key, attention_mask, dropout, **kwargs)
    if reason is not None:
        raise ValueError(f"shear attention: {reason} is not supported (fall back to sdpa / eager)")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    head_mask = getattr(module, "shear_head_mask", None)
    if head_mask is not None:
        head_mask = head_mask.to(device=query.device)
    return shear_causal_attention(query, key, value, float(scaling), head_mask), None


class ShearMaskedAttention(MaskedLayer):
    """The masked model's attention: a Hugging Face attention module whose forward stays its own.

    :func:`shear.patch.apply_masks` turns the model's attention modules into this layer and
    registers :func:`shear.dispatch.attention` as the model's attention function; that
    function reads ``shear_head_mask`` to skip the query heads whose mask is exactly 0 (the
    mask multiplies the heads in o_proj, a :class:`~shear.kernels.masked_linear.ShearMaskedLinear`).
    """

    @property
    def shear_head_mask(self) -> torch.Tensor | None:
        """``[H]``: one entry per query head, or None without head masks."""
        (m,) = self._masks(None)
        return m


__all__ = [
    "MAX_HEAD_DIM",
    "MaskedAttentionFunction",
    "ShearMaskedAttention",
    "attention_backward",
    "attention_forward",
    "shear_attention_interface",
    "shear_causal_attention",
    "unsupported_reason",
]
