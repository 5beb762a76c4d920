"""Rotary position embedding on queries and keys in one Triton launch.

Reference: :func:`shear.ops.apply_rope` (Hugging Face's ``apply_rotary_pos_emb``, rotate-half
convention). One program per (batch, position) loads that position's cos / sin row once and
rotates every query head and every key head there, so q and k share a launch. Math in
float32 (float64 for float64 inputs); any strides (Hugging Face hands over transposed views).

Backward is the transposed rotation: ``dx1 = g1 c1 + g2 s2``, ``dx2 = g2 c2 - g1 s1`` (the
rotation by ``-sin`` when the two halves of cos / sin agree, as they do for rotary tables).
Gradients of cos / sin are computed only when they require grad (then q and k are saved):
the program owns the whole (batch, position) row, so the sum over heads is deterministic.

There is no ``nn.Module``: RoPE has no parameters and Hugging Face calls a function
(``apply_rotary_pos_emb``), so :func:`shear_apply_rope` is the whole public surface.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shear.kernels.utils import check_launchable


@triton.jit
def _rope_rotate_block(
    x_ptr,
    y_ptr,
    n_heads,
    h0,
    sxh,
    sxd,
    syh,
    syd,
    c1,
    c2,
    s1,
    s2,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    TRANSPOSE: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    """Rotate heads ``[h0, h0 + BLOCK_H)`` of one position; returns both halves of the input."""
    offs_h = h0 + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h[:, None] < n_heads) & (offs_d[None, :] < HALF)
    px = x_ptr + offs_h[:, None] * sxh + offs_d[None, :] * sxd
    x1 = tl.load(px, mask=mask, other=0.0).to(COMPUTE)
    x2 = tl.load(px + HALF * sxd, mask=mask, other=0.0).to(COMPUTE)
    if TRANSPOSE:
        y1 = x1 * c1[None, :] + x2 * s2[None, :]
        y2 = x2 * c2[None, :] - x1 * s1[None, :]
    else:
        y1 = x1 * c1[None, :] - x2 * s1[None, :]
        y2 = x2 * c2[None, :] + x1 * s2[None, :]
    py = y_ptr + offs_h[:, None] * syh + offs_d[None, :] * syd
    tl.store(py, y1.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(py + HALF * syd, y2.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_load_row(ptr, sd, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, COMPUTE: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_HALF)
    m = offs_d < HALF
    a = tl.load(ptr + offs_d * sd, mask=m, other=0.0).to(COMPUTE)
    b = tl.load(ptr + (offs_d + HALF) * sd, mask=m, other=0.0).to(COMPUTE)
    return a, b


@triton.jit
def _rope_forward_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    qo_ptr,
    ko_ptr,
    S,
    H,
    G,
    sqb,
    sqh,
    sqs,
    sqd,
    skb,
    skh,
    sks,
    skd,
    scb,
    scs,
    scd,
    ssb,
    sss,
    ssd,
    sqob,
    sqoh,
    sqos,
    sqod,
    skob,
    skoh,
    skos,
    skod,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // S
    s = pid % S
    c1, c2 = _rope_load_row(cos_ptr + b * scb + s * scs, scd, HALF, BLOCK_HALF, COMPUTE)
    s1, s2 = _rope_load_row(sin_ptr + b * ssb + s * sss, ssd, HALF, BLOCK_HALF, COMPUTE)
    for h0 in range(0, H, BLOCK_H):
        _rope_rotate_block(
            q_ptr + b * sqb + s * sqs,
            qo_ptr + b * sqob + s * sqos,
            H,
            h0,
            sqh,
            sqd,
            sqoh,
            sqod,
            c1,
            c2,
            s1,
            s2,
            HALF,
            BLOCK_H,
            BLOCK_HALF,
            False,
            COMPUTE,
        )
    for h0 in range(0, G, BLOCK_H):
        _rope_rotate_block(
            k_ptr + b * skb + s * sks,
            ko_ptr + b * skob + s * skos,
            G,
            h0,
            skh,
            skd,
            skoh,
            skod,
            c1,
            c2,
            s1,
            s2,
            HALF,
            BLOCK_H,
            BLOCK_HALF,
            False,
            COMPUTE,
        )


@triton.jit
def _rope_cos_sin_grad_block(
    g_ptr,
    x_ptr,
    n_heads,
    h0,
    sgh,
    sgd,
    sxh,
    sxd,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    """Per-position partial sums over heads of g * x (dcos) and g * rotate_half(x) (dsin)."""
    offs_h = h0 + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h[:, None] < n_heads) & (offs_d[None, :] < HALF)
    pg = g_ptr + offs_h[:, None] * sgh + offs_d[None, :] * sgd
    px = x_ptr + offs_h[:, None] * sxh + offs_d[None, :] * sxd
    g1 = tl.load(pg, mask=mask, other=0.0).to(COMPUTE)
    g2 = tl.load(pg + HALF * sgd, mask=mask, other=0.0).to(COMPUTE)
    x1 = tl.load(px, mask=mask, other=0.0).to(COMPUTE)
    x2 = tl.load(px + HALF * sxd, mask=mask, other=0.0).to(COMPUTE)
    return (
        tl.sum(g1 * x1, axis=0),
        tl.sum(g2 * x2, axis=0),
        tl.sum(-g1 * x2, axis=0),
        tl.sum(g2 * x1, axis=0),
    )


@triton.jit
def _rope_backward_kernel(
    dqo_ptr,
    dko_ptr,
    cos_ptr,
    sin_ptr,
    dq_ptr,
    dk_ptr,
    q_ptr,
    k_ptr,
    dcos_ptr,
    dsin_ptr,
    S,
    H,
    G,
    sgqb,
    sgqh,
    sgqs,
    sgqd,
    sgkb,
    sgkh,
    sgks,
    sgkd,
    scb,
    scs,
    scd,
    ssb,
    sss,
    ssd,
    sqb,
    sqh,
    sqs,
    sqd,
    skb,
    skh,
    sks,
    skd,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    COMPUTE: tl.constexpr,
    COS_SIN_GRAD: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // S
    s = pid % S
    c1, c2 = _rope_load_row(cos_ptr + b * scb + s * scs, scd, HALF, BLOCK_HALF, COMPUTE)
    s1, s2 = _rope_load_row(sin_ptr + b * ssb + s * sss, ssd, HALF, BLOCK_HALF, COMPUTE)
    # dq / dk are allocated contiguous [B, H, S, D] / [B, G, S, D].
    D = 2 * HALF
    for h0 in range(0, H, BLOCK_H):
        _rope_rotate_block(
            dqo_ptr + b * sgqb + s * sgqs,
            dq_ptr + b * H * S * D + s * D,
            H,
            h0,
            sgqh,
            sgqd,
            S * D,
            1,
            c1,
            c2,
            s1,
            s2,
            HALF,
            BLOCK_H,
            BLOCK_HALF,
            True,
            COMPUTE,
        )
    for h0 in range(0, G, BLOCK_H):
        _rope_rotate_block(
            dko_ptr + b * sgkb + s * sgks,
            dk_ptr + b * G * S * D + s * D,
            G,
            h0,
            sgkh,
            sgkd,
            S * D,
            1,
            c1,
            c2,
            s1,
            s2,
            HALF,
            BLOCK_H,
            BLOCK_HALF,
            True,
            COMPUTE,
        )
    if COS_SIN_GRAD:
        dc1 = tl.zeros([BLOCK_HALF], dtype=COMPUTE)
        dc2 = tl.zeros([BLOCK_HALF], dtype=COMPUTE)
        ds1 = tl.zeros([BLOCK_HALF], dtype=COMPUTE)
        ds2 = tl.zeros([BLOCK_HALF], dtype=COMPUTE)
        for h0 in range(0, H, BLOCK_H):
            a1, a2, e1, e2 = _rope_cos_sin_grad_block(
                dqo_ptr + b * sgqb + s * sgqs,
                q_ptr + b * sqb + s * sqs,
                H,
                h0,
                sgqh,
                sgqd,
                sqh,
                sqd,
                HALF,
                BLOCK_H,
                BLOCK_HALF,
                COMPUTE,
            )
            dc1 += a1
            dc2 += a2
            ds1 += e1
            ds2 += e2
        for h0 in range(0, G, BLOCK_H):
            a1, a2, e1, e2 = _rope_cos_sin_grad_block(
                dko_ptr + b * sgkb + s * sgks,
                k_ptr + b * skb + s * sks,
                G,
                h0,
                sgkh,
                sgkd,
                skh,
                skd,
                HALF,
                BLOCK_H,
                BLOCK_HALF,
                COMPUTE,
            )
            dc1 += a1
            dc2 += a2
            ds1 += e1
            ds2 += e2
        # dcos / dsin are fp32 (or fp64) contiguous [B, S, D]; the caller reduces broadcast dims.
        offs_d = tl.arange(0, BLOCK_HALF)
        m = offs_d < HALF
        row = (b * S + s) * D
        tl.store(dcos_ptr + row + offs_d, dc1, mask=m)
        tl.store(dcos_ptr + row + HALF + offs_d, dc2, mask=m)
        tl.store(dsin_ptr + row + offs_d, ds1, mask=m)
        tl.store(dsin_ptr + row + HALF + offs_d, ds2, mask=m)


def _compute_dtype(*tensors: torch.Tensor) -> tl.dtype:
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32


def _launch_params(H: int, G: int, D: int) -> tuple[int, int]:
    half = D // 2
    block_half = triton.next_power_of_2(half)
    # About 4K elements per head tile: all heads at once for small models, chunks for big ones.
    block_h = max(1, min(triton.next_power_of_2(max(H, G)), max(1, 4096 // block_half)))
    return block_h, block_half


def _check_shapes(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"shear_apply_rope: q and k must be [B, heads, S, D], got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    B, H, S, D = q.shape
    G = k.shape[1]
    if k.shape[0] != B or k.shape[2:] != (S, D):
        raise ValueError(f"shear_apply_rope: k {tuple(k.shape)} does not match q {tuple(q.shape)}")
    if D % 2 != 0:
        raise ValueError(f"shear_apply_rope: head_dim must be even, got {D}")
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[-2:] != (S, D) or cos.shape[0] not in (1, B):
        raise ValueError(f"shear_apply_rope: cos / sin must be [B or 1, S, D], got {tuple(cos.shape)}")
    return B, H, G, S, D


def rope_forward(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel.

    Args:
        q: ``[B, H, S, D]``, any strides.
        k: ``[B, G, S, D]``, any strides.
        cos: ``[B or 1, S, D]``.
        sin: ``[B or 1, S, D]``.

    Returns:
        Rotated ``(q, k)``, contiguous, in ``promote_types(x.dtype, cos.dtype)`` as the
        reference's arithmetic gives.
    """
    check_launchable(q, k, cos, sin)
    B, H, G, S, D = _check_shapes(q, k, cos, sin)
    cos, sin = cos.expand(B, S, D), sin.expand(B, S, D)
    qo = torch.empty(q.shape, dtype=torch.promote_types(q.dtype, cos.dtype), device=q.device)
    ko = torch.empty(k.shape, dtype=torch.promote_types(k.dtype, cos.dtype), device=k.device)
    if q.numel() + k.numel() == 0:
        return qo, ko
    block_h, block_half = _launch_params(H, G, D)
    _rope_forward_kernel[(B * S,)](
        q,
        k,
        cos,
        sin,
        qo,
        ko,
        S,
        H,
        G,
        *q.stride(),
        *k.stride(),
        *cos.stride(),
        *sin.stride(),
        *qo.stride(),
        *ko.stride(),
        HALF=D // 2,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        COMPUTE=_compute_dtype(q, k, cos, sin),
    )
    return qo, ko


def rope_backward(
    dqo: torch.Tensor,
    dko: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_dtype: torch.dtype,
    k_dtype: torch.dtype,
    q: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward kernel.

    Args:
        dqo: gradient of the rotated queries ``[B, H, S, D]``.
        dko: gradient of the rotated keys ``[B, G, S, D]``.
        cos: ``[B or 1, S, D]`` as in the forward.
        sin: ``[B or 1, S, D]`` as in the forward.
        q_dtype: dtype of the query gradient (the input's).
        k_dtype: dtype of the key gradient.
        q: the forward's input queries; give q and k to get cos / sin gradients.
        k: the forward's input keys.

    Returns:
        ``(dq, dk, dcos, dsin)``; dcos / dsin are None unless q and k were given, else in
        cos's dtype and shape (summed over a broadcast batch).
    """
    check_launchable(dqo, dko, cos, sin)
    B, H, S, D = dqo.shape
    G = dko.shape[1]
    cos_shape, cos_dtype = cos.shape, cos.dtype
    cos, sin = cos.expand(B, S, D), sin.expand(B, S, D)
    dq = torch.empty((B, H, S, D), dtype=q_dtype, device=dqo.device)
    dk = torch.empty((B, G, S, D), dtype=k_dtype, device=dqo.device)
    grad_cs = q is not None and k is not None
    compute = _compute_dtype(dqo, dko, cos, sin)
    acc_dtype = torch.float64 if compute == tl.float64 else torch.float32
    if grad_cs:
        dcos = torch.empty((B, S, D), dtype=acc_dtype, device=dqo.device)
        dsin = torch.empty((B, S, D), dtype=acc_dtype, device=dqo.device)
    else:
        # Never read: COS_SIN_GRAD is off; any pointer will do.
        q, k, dcos, dsin = dqo, dko, dq, dq
    if dqo.numel() + dko.numel() > 0:
        block_h, block_half = _launch_params(H, G, D)
        _rope_backward_kernel[(B * S,)](
            dqo,
            dko,
            cos,
            sin,
            dq,
            dk,
            q,
            k,
            dcos,
            dsin,
            S,
            H,
            G,
            *dqo.stride(),
            *dko.stride(),
            *cos.stride(),
            *sin.stride(),
            *q.stride(),
            *k.stride(),
            HALF=D // 2,
            BLOCK_H=block_h,
            BLOCK_HALF=block_half,
            COMPUTE=compute,
            COS_SIN_GRAD=grad_cs,
        )
    elif grad_cs:
        dcos.zero_()
        dsin.zero_()
    if not grad_cs:
        return dq, dk, None, None
    dcos = dcos.sum_to_size(cos_shape).to(cos_dtype)
    dsin = dsin.sum_to_size(cos_shape).to(cos_dtype)
    return dq, dk, dcos, dsin


class RopeFunction(torch.autograd.Function):
    """Autograd wrapper: forward and backward kernels; cos / sin gradients only on demand."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        qo, ko = rope_forward(q, k, cos, sin)
        ctx.q_dtype, ctx.k_dtype = q.dtype, k.dtype
        ctx.cos_sin_grad = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        if ctx.cos_sin_grad:
            ctx.save_for_backward(cos, sin, q, k)
        else:
            ctx.save_for_backward(cos, sin)
        return qo, ko

    @staticmethod
    def backward(ctx, dqo: torch.Tensor, dko: torch.Tensor):
        if ctx.cos_sin_grad:
            cos, sin, q, k = ctx.saved_tensors
        else:
            (cos, sin), q, k = ctx.saved_tensors, None, None
        dq, dk, dcos, dsin = rope_backward(dqo, dko, cos, sin, ctx.q_dtype, ctx.k_dtype, q, k)
        return dq, dk, dcos, dsin


def shear_apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding on queries and keys with the Triton kernels (one launch each way).

    Same signature and semantics as :func:`shear.ops.apply_rope` (Hugging Face's
    ``apply_rotary_pos_emb`` with ``unsqueeze_dim=1``).

    Args:
        q: queries ``[B, H, S, D]`` (D even), any strides.
        k: keys ``[B, G, S, D]``, any strides.
        cos: ``[B or 1, S, D]`` cosines.
        sin: ``[B or 1, S, D]`` sines.

    Returns:
        Rotated ``(q, k)``, contiguous ``[B, H, S, D]`` / ``[B, G, S, D]``.

    Examples:
        >>> q_rot, k_rot = shear_apply_rope(q, k, cos, sin)  # doctest: +SKIP
    """
    return RopeFunction.apply(q, k, cos, sin)
