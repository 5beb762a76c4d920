"""Causal grouped-query flash attention that skips heads whose mask is exactly 0.

Reference: :func:`shear.ops.causal_attention`. Flash-attention 2 layout of the work:

* forward: one program per (query block, batch x query head); online softmax in exp2 with
  float32 accumulators (float64 for float64 inputs). Key blocks wholly above the diagonal are
  never visited; key blocks left of the diagonal run unmasked, the diagonal blocks with the
  causal mask. The log-sum-exp (base 2) of every row is saved for the backward pass. Query
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

Block sizes are ``tl.constexpr`` chosen by :func:`attention_block_sizes` (a small heuristic,
no autotune): 16 under the interpreter, flash-attention sizes on a GPU; head_dim up to 256
(tuned for <= 128).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from shear.kernels.utils import check_launchable, interpreter_active, upcast_dots

_LOG2E = 1.4426950408889634


@triton.jit
def _attention_forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    lse_ptr,
    hm_ptr,
    sqb,
    sqh,
    sqs,
    sqd,
    skb,
    skh,
    sks,
    skd,
    svb,
    svh,
    svs,
    svd,
    sob,
    sos,
    soh,
    sod,
    S,
    H,
    N_REP,
    qk_scale,
    HAS_MASK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    g = h // N_REP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    # Causal: keys [0, lo) lie left of the diagonal (no mask), [lo, hi) are the diagonal blocks.
    lo = start_m * BLOCK_M
    hi = tl.minimum(lo + BLOCK_M, S)
    row_ok = offs_m < S
    if HAS_MASK:
        keep = tl.load(hm_ptr + h) != 0
        # A skipped head visits no key block and loads nothing; its output is written as 0.
        lo = tl.where(keep, lo, 0)
        hi = tl.where(keep, hi, 0)
        # A row limit of 0, rather than `& keep`: the interpreter cannot AND a block with a scalar.
        load_rows = offs_m < tl.where(keep, S, 0)
    else:
        load_rows = row_ok

    q = tl.load(
        q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd,
        mask=load_rows[:, None] & d_ok[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + b * skb + g * skh
    v_base = v_ptr + b * svb + g * svh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)

    # Left of the diagonal: every key is valid and visible to every row of the block.
    for start_n in range(0, lo, BLOCK_N):
        cols = start_n + offs_n
        kt = tl.load(k_base + cols[None, :] * sks + offs_d[:, None] * skd, mask=d_ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * svs + offs_d[None, :] * svd, mask=d_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, kt, input_precision=PRECISION, out_dtype=ACC) * qk_scale
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION, out_dtype=ACC)
        m_i = m_new

    # Diagonal blocks: causal mask (which also hides keys >= S). Every row sees at least key
    # `lo` in the first of them, so no row is all -inf there.
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < S
        kt = tl.load(
            k_base + cols[None, :] * sks + offs_d[:, None] * skd,
            mask=col_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        v = tl.load(
            v_base + cols[:, None] * svs + offs_d[None, :] * svd,
            mask=col_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, kt, input_precision=PRECISION, out_dtype=ACC) * qk_scale
        visible = (offs_m[:, None] >= cols[None, :]) & col_ok[None, :]
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION, out_dtype=ACC)
        m_i = m_new

    # l_i == 0 only for a skipped head: acc is 0 there and so is the output.
    empty = l_i == 0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(
        o_ptr + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :] * sod,
        out.to(o_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    lse = tl.where(empty, 0.0, m_i + tl.log2(l_safe))
    tl.store(lse_ptr + bh * S + offs_m, lse, mask=row_ok)


@triton.jit
def _attention_backward_preprocess_kernel(
    o_ptr,
    do_ptr,
    delta_ptr,
    hm_ptr,
    sob,
    sos,
    soh,
    sod,
    sdob,
    sdos,
    sdoh,
    sdod,
    S,
    H,
    HAS_MASK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    ACC: tl.constexpr,
):
    """delta[b, h, i] = sum_d dO * O (zero for a skipped head, which the backward never reads)."""
    start_m = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < S
    load_rows = row_ok
    if HAS_MASK:
        load_rows = offs_m < tl.where(tl.load(hm_ptr + h) != 0, S, 0)
    mask = load_rows[:, None] & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(
        o_ptr + b * sob + h * soh + offs_m[:, None] * sos + offs_d[None, :] * sod, mask=mask, other=0.0
    )
    do = tl.load(
        do_ptr + b * sdob + h * sdoh + offs_m[:, None] * sdos + offs_d[None, :] * sdod, mask=mask, other=0.0
    )
    delta = tl.sum(o.to(ACC) * do.to(ACC), axis=1)
    tl.store(delta_ptr + bh * S + offs_m, delta, mask=row_ok)


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
    sqb,
    sqh,
    sqs,
    sqd,
    skb,
    skh,
    sks,
    skd,
    svb,
    svh,
    svs,
    svd,
    sdob,
    sdos,
    sdoh,
    sdod,
    S,
    H,
    G,
    N_REP,
    qk_scale,
    sm_scale,
    HAS_MASK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dK, dV of one key block of one KV head, summed over the query heads of its group."""
    start_n = tl.program_id(0).to(tl.int64)
    bg = tl.program_id(1).to(tl.int64)
    b = bg // G
    g = bg % G
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    col_ok = offs_n < S
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(
        k_ptr + b * skb + g * skh + offs_n[:, None] * sks + offs_d[None, :] * skd, mask=kv_mask, other=0.0
    )
    v = tl.load(
        v_ptr + b * svb + g * svh + offs_n[:, None] * svs + offs_d[None, :] * svd, mask=kv_mask, other=0.0
    )
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)

    lo = start_n * BLOCK_N
    diag_hi = tl.minimum(lo + BLOCK_N, S)
    for r in range(0, N_REP):
        h = g * N_REP + r
        d_lo = lo
        d_hi = diag_hi
        hi = S
        if HAS_MASK:
            keep = tl.load(hm_ptr + h) != 0
            # A skipped query head contributes nothing: empty query ranges, no loads.
            d_hi = tl.where(keep, d_hi, d_lo)
            hi = tl.where(keep, hi, d_lo)
        q_base = q_ptr + b * sqb + h * sqh
        do_base = do_ptr + b * sdob + h * sdoh
        row_base = (b * H + h) * S

        # Diagonal query blocks: causal mask (rows >= S are masked too).
        for start_m in range(d_lo, d_hi, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < S
            qt = tl.load(
                q_base + rows[None, :] * sqs + offs_d[:, None] * sqd,
                mask=row_ok[None, :] & d_ok[:, None],
                other=0.0,
            )
            do = tl.load(
                do_base + rows[:, None] * sdos + offs_d[None, :] * sdod,
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            if UPCAST:
                qt = qt.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(lse_ptr + row_base + rows, mask=row_ok, other=0.0)
            delta = tl.load(delta_ptr + row_base + rows, mask=row_ok, other=0.0)
            qkt = tl.dot(k, qt, input_precision=PRECISION, out_dtype=ACC) * qk_scale
            pt = tl.exp2(qkt - lse[None, :])
            visible = (rows[None, :] >= offs_n[:, None]) & row_ok[None, :]
            pt = tl.where(visible, pt, 0.0)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION, out_dtype=ACC)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION, out_dtype=ACC)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PRECISION, out_dtype=ACC)

        # Below the diagonal: every row sees every key of the block. Rows >= S (last block)
        # load q = dO = 0 and lse = delta = 0, so they add exactly 0 without a mask.
        for start_m in range(d_hi, hi, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < S
            qt = tl.load(
                q_base + rows[None, :] * sqs + offs_d[:, None] * sqd,
                mask=row_ok[None, :] & d_ok[:, None],
                other=0.0,
            )
            do = tl.load(
                do_base + rows[:, None] * sdos + offs_d[None, :] * sdod,
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            if UPCAST:
                qt = qt.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(lse_ptr + row_base + rows, mask=row_ok, other=0.0)
            delta = tl.load(delta_ptr + row_base + rows, mask=row_ok, other=0.0)
            qkt = tl.dot(k, qt, input_precision=PRECISION, out_dtype=ACC) * qk_scale
            pt = tl.exp2(qkt - lse[None, :])
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION, out_dtype=ACC)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION, out_dtype=ACC)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PRECISION, out_dtype=ACC)

    # dk / dv are contiguous [B, G, S, D].
    out_off = (bg * S + offs_n[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(dk_ptr + out_off, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out_off, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


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
    sqb,
    sqh,
    sqs,
    sqd,
    skb,
    skh,
    sks,
    skd,
    svb,
    svh,
    svs,
    svd,
    sdob,
    sdos,
    sdoh,
    sdod,
    S,
    H,
    N_REP,
    qk_scale,
    sm_scale,
    HAS_MASK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ACC: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dQ of one query block of one query head (zeros for a skipped head)."""
    start_m = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    g = h // N_REP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < S
    lo = start_m * BLOCK_M
    hi = tl.minimum(lo + BLOCK_M, S)
    load_rows = row_ok
    if HAS_MASK:
        keep = tl.load(hm_ptr + h) != 0
        lo = tl.where(keep, lo, 0)
        hi = tl.where(keep, hi, 0)
        load_rows = offs_m < tl.where(keep, S, 0)
    row_mask = load_rows[:, None] & d_ok[None, :]
    q = tl.load(
        q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd, mask=row_mask, other=0.0
    )
    do = tl.load(
        do_ptr + b * sdob + h * sdoh + offs_m[:, None] * sdos + offs_d[None, :] * sdod,
        mask=row_mask,
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(lse_ptr + bh * S + offs_m, mask=load_rows, other=0.0)
    delta = tl.load(delta_ptr + bh * S + offs_m, mask=load_rows, other=0.0)
    k_base = k_ptr + b * skb + g * skh
    v_base = v_ptr + b * svb + g * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)

    for start_n in range(0, lo, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(k_base + cols[:, None] * sks + offs_d[None, :] * skd, mask=d_ok[None, :], other=0.0)
        vt = tl.load(v_base + cols[None, :] * svs + offs_d[:, None] * svd, mask=d_ok[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            vt = vt.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) * qk_scale
        p = tl.exp2(qk - lse[:, None])
        dp = tl.dot(do, vt, input_precision=PRECISION, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION, out_dtype=ACC)

    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < S
        k = tl.load(
            k_base + cols[:, None] * sks + offs_d[None, :] * skd,
            mask=col_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        vt = tl.load(
            v_base + cols[None, :] * svs + offs_d[:, None] * svd,
            mask=col_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
            vt = vt.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) * qk_scale
        p = tl.exp2(qk - lse[:, None])
        visible = (offs_m[:, None] >= cols[None, :]) & col_ok[None, :]
        p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION, out_dtype=ACC)

    # dq is contiguous [B, H, S, D].
    tl.store(
        dq_ptr + (bh * S + offs_m[:, None]) * HEAD_DIM + offs_d[None, :],
        (dq * sm_scale).to(dq_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


def attention_block_sizes(head_dim: int, dtype: torch.dtype, seq_len: int) -> dict[str, Any]:
    """Block sizes and launch options for the attention kernels (a heuristic, no autotune).

    Args:
        head_dim: D.
        dtype: input dtype.
        seq_len: S (blocks never exceed the next power of two >= S, with a floor of 16).

    Returns:
        ``{"BLOCK_D", "fwd": (BLOCK_M, BLOCK_N), "dkdv": (BLOCK_M, BLOCK_N),
        "dq": (BLOCK_M, BLOCK_N), "num_warps", "num_stages"}``. Within each pair one size
        divides the other as the causal split needs (fwd / dq: BLOCK_N | BLOCK_M; dkdv:
        BLOCK_M | BLOCK_N).
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    if interpreter_active():
        # Every program costs ~1 ms in the interpreter, and tl.dot needs dims >= 16.
        return dict(BLOCK_D=block_d, fwd=(16, 16), dkdv=(16, 16), dq=(16, 16), num_warps=4, num_stages=1)
    wide = dtype in (torch.float32, torch.float64) or block_d > 128
    if wide:
        fwd, dkdv, dq = (64, 32), (32, 64), (64, 32)
    else:
        fwd, dkdv, dq = (
            (128, 64),
            (32, 128) if block_d <= 64 else (32, 64),
            (128, 32) if block_d <= 64 else (64, 32),
        )
    cap = max(16, triton.next_power_of_2(seq_len))
    fwd, dkdv, dq = (tuple(min(x, cap) for x in pair) for pair in (fwd, dkdv, dq))
    return dict(
        BLOCK_D=block_d,
        fwd=fwd,
        dkdv=dkdv,
        dq=dq,
        num_warps=4 if block_d <= 64 else 8,
        num_stages=2 if wide or block_d > 64 else 3,
    )


def _kernel_dtypes(dtype: torch.dtype) -> tuple[tl.dtype, str, bool]:
    """(accumulator dtype, tl.dot input precision, upcast bf16 operands before tl.dot)."""
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    # IEEE for fp32 inputs: TF32 would cost fp32 training ~1e-3 relative error.
    precision = "ieee" if dtype in (torch.float32, torch.float64) else "tf32"
    return acc, precision, upcast_dots() and dtype == torch.bfloat16


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
    if D > 256:
        raise ValueError(f"shear_causal_attention: head_dim {D} > 256 is not supported")
    if head_mask is not None and head_mask.shape != (H,):
        raise ValueError(f"shear_causal_attention: head_mask must be [{H}], got {tuple(head_mask.shape)}")
    if head_mask is not None and head_mask.device != q.device:
        raise ValueError(f"shear_causal_attention: head_mask is on {head_mask.device}, q on {q.device}")
    return B, H, G, S, D


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float,
    head_mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel.

    Args:
        q: ``[B, H, S, D]``, any strides.
        k: ``[B, G, S, D]``, any strides.
        v: ``[B, G, S, D]``, any strides.
        scaling: factor on ``q k^T``.
        head_mask: optional ``[H]``; heads where it is exactly 0 are skipped (zeros).
        out: optional preallocated ``[B, S, H, D]`` output (any strides).

    Returns:
        ``(out [B, S, H, D], lse [B, H, S])``; lse is the base-2 log-sum-exp of the scaled
        scores, in the accumulator dtype (0 for skipped heads).
    """
    check_launchable(q, k, v, head_mask)
    B, H, G, S, D = _check_inputs(q, k, v, head_mask)
    if head_mask is not None:
        head_mask = head_mask.contiguous()  # indexed as a dense [H] array in the kernels
    if out is None:
        out = torch.empty((B, S, H, D), dtype=q.dtype, device=q.device)
    acc, precision, upcast = _kernel_dtypes(q.dtype)
    lse = torch.empty((B, H, S), dtype=torch.float64 if acc == tl.float64 else torch.float32, device=q.device)
    if q.numel() == 0:
        return out, lse
    cfg = attention_block_sizes(D, q.dtype, S)
    block_m, block_n = cfg["fwd"]
    grid = (triton.cdiv(S, block_m), B * H)
    _attention_forward_kernel[grid](
        q,
        k,
        v,
        out,
        lse,
        head_mask if head_mask is not None else q,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        S,
        H,
        H // G,
        scaling * _LOG2E,
        HAS_MASK=head_mask is not None,
        HEAD_DIM=D,
        BLOCK_D=cfg["BLOCK_D"],
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        ACC=acc,
        UPCAST=upcast,
        PRECISION=precision,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
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
        do: gradient of the output ``[B, S, H, D]``, any strides.
        q: forward queries ``[B, H, S, D]``.
        k: forward keys ``[B, G, S, D]``.
        v: forward values ``[B, G, S, D]``.
        out: forward output ``[B, S, H, D]``.
        lse: forward log-sum-exp ``[B, H, S]``.
        scaling: factor on ``q k^T``.
        head_mask: optional ``[H]``, as in the forward.

    Returns:
        ``(dq, dk, dv)``, contiguous, in the inputs' dtype; dq is 0 on skipped heads.
    """
    check_launchable(do, q, k, v, out, head_mask)
    B, H, G, S, D = _check_inputs(q, k, v, head_mask)
    if head_mask is not None:
        head_mask = head_mask.contiguous()  # indexed as a dense [H] array in the kernels
    dq = torch.empty((B, H, S, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, G, S, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, G, S, D), dtype=v.dtype, device=v.device)
    if q.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    acc, precision, upcast = _kernel_dtypes(q.dtype)
    cfg = attention_block_sizes(D, q.dtype, S)
    hm = head_mask if head_mask is not None else q
    has_mask = head_mask is not None
    delta = torch.empty_like(lse)
    pre_m = cfg["dq"][0]
    _attention_backward_preprocess_kernel[(triton.cdiv(S, pre_m), B * H)](
        out,
        do,
        delta,
        hm,
        *out.stride(),
        *do.stride(),
        S,
        H,
        HAS_MASK=has_mask,
        HEAD_DIM=D,
        BLOCK_D=cfg["BLOCK_D"],
        BLOCK_M=pre_m,
        ACC=acc,
    )
    common = dict(
        HAS_MASK=has_mask,
        HEAD_DIM=D,
        BLOCK_D=cfg["BLOCK_D"],
        ACC=acc,
        UPCAST=upcast,
        PRECISION=precision,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    block_m, block_n = cfg["dkdv"]
    _attention_backward_dkdv_kernel[(triton.cdiv(S, block_n), B * G)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dk,
        dv,
        hm,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *do.stride(),
        S,
        H,
        G,
        H // G,
        scaling * _LOG2E,
        scaling,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        **common,
    )
    block_m, block_n = cfg["dq"]
    _attention_backward_dq_kernel[(triton.cdiv(S, block_m), B * H)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dq,
        hm,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *do.stride(),
        S,
        H,
        H // G,
        scaling * _LOG2E,
        scaling,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        **common,
    )
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
    return MaskedAttentionFunction.apply(q, k, v, scaling, head_mask)


def _check_purely_causal(attention_mask: Any, batch: int, q_len: int, kv_len: int) -> None:
    """Raise ValueError unless ``attention_mask`` is None or exactly the causal pattern.

    Reading a tensor mask's values costs a host synchronisation; register a mask function that
    returns None for purely causal masks (as Hugging Face's ``sdpa_mask`` does) to avoid it.
    """
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(
            f"shear attention: unsupported attention_mask of type {type(attention_mask).__name__}; "
            "only None or a purely causal mask is supported (fall back to sdpa / eager)"
        )
    m = attention_mask
    if m.dim() != 4 or m.shape[-2:] != (q_len, kv_len) or m.shape[0] not in (1, batch) or m.shape[1] != 1:
        raise ValueError(
            f"shear attention: attention_mask of shape {tuple(m.shape)} is not a [B, 1, S, S] causal mask; "
            "padding / custom masks are not supported by the kernel (fall back to sdpa / eager)"
        )
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=m.device).tril()
    if m.dtype == torch.bool:
        allowed = m
    else:
        # Additive float mask: 0 where visible, a very negative value (finfo.min or -inf) elsewhere.
        allowed = m == 0
        if not bool((m[..., ~causal] <= torch.finfo(m.dtype).min / 2).all()):
            raise ValueError(
                "shear attention: the additive attention_mask is not purely causal (padding or custom "
                "bias); the kernel supports only causal attention (fall back to sdpa / eager)"
            )
    if not bool((allowed == causal).all()):
        raise ValueError(
            "shear attention: attention_mask is not purely causal (padding or a custom pattern); the "
            "kernel supports only causal attention without padding (fall back to sdpa / eager)"
        )


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
    masks (``transformers.masking_utils.sdpa_mask``); not registered here.

    Args:
        module: the attention module (``LlamaAttention`` and the like).
        query: ``[B, H, S, D]``.
        key: ``[B, G, S, D]``.
        value: ``[B, G, S, D]``.
        attention_mask: None or a purely causal 4D mask (bool, or additive float).
        scaling: factor on ``q k^T``; ``D ** -0.5`` when None.
        dropout: attention dropout probability; must be 0 while ``module.training``.
        **kwargs: Hugging Face's extra arguments; ``is_causal=False``, ``softcap``, a
            ``sliding_window`` shorter than the sequence and ``output_attentions`` are refused.

    Returns:
        ``(attn_output [B, S, H, D], None)``.

    Raises:
        ValueError: for anything the kernel does not compute (padding or custom masks,
            dropout in training, KV cache with a query shorter than the keys, non-causal
            attention, softcap, sliding windows); the caller should fall back to sdpa / eager.
    """
    B, H, S, D = query.shape
    kv_len = key.shape[2]
    if dropout > 0.0 and getattr(module, "training", True):
        raise ValueError(
            f"shear attention: attention dropout ({dropout}) is not supported in training; "
            "set attention_dropout=0 or fall back to sdpa / eager"
        )
    if kv_len != S:
        raise ValueError(
            f"shear attention: query length {S} != key length {kv_len} (KV cache); the kernel computes "
            "causal attention over a full sequence only (fall back to sdpa / eager)"
        )
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if not is_causal and S > 1:
        raise ValueError("shear attention: non-causal attention is not supported (fall back to sdpa / eager)")
    if kwargs.get("softcap") is not None:
        raise ValueError("shear attention: softcap is not supported (fall back to eager)")
    if kwargs.get("output_attentions", False):
        raise ValueError("shear attention: output_attentions is not supported (fall back to eager)")
    window = kwargs.get("sliding_window")
    if window is not None and kv_len > window:
        raise ValueError(
            f"shear attention: sliding window {window} shorter than the sequence ({kv_len}) is not supported"
        )
    _check_purely_causal(attention_mask, B, S, kv_len)
    if scaling is None:
        scaling = D**-0.5
    head_mask = getattr(module, "shear_head_mask", None)
    if head_mask is not None:
        head_mask = head_mask.to(device=query.device)
    return shear_causal_attention(query, key, value, float(scaling), head_mask), None


__all__ = [
    "MaskedAttentionFunction",
    "attention_backward",
    "attention_block_sizes",
    "attention_forward",
    "shear_attention_interface",
    "shear_causal_attention",
]
