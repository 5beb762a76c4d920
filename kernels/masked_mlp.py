"""Fused masked SwiGLU MLP (LLaMA's MLP with the intermediate and output masks).

Reference: :func:`shear.ops.masked_swiglu_mlp`::

    a   = x Wg^T + bg
    b   = (x Wu^T + bu) * m_int
    h   = silu(a) * b
    out = (h Wd^T + bd) * m_out

Forward, two kernels:

1. ``_masked_mlp_forward_kernel``: one GEMM pass over x computing the gate and up tiles
   together (two accumulators, x loaded once), epilogue ``h = silu(a) * b`` with
   ``b = (x Wu^T + bu) * m_int``. It stores ``a`` and the masked ``b`` for the backward pass
   (as Liger-Kernel does; silu is recomputed there) and ``h`` only as the down projection's
   input: ``h`` is not saved for backward.
2. The down projection: :func:`shear.kernels.masked_linear.masked_linear_forward` with m_out,
   and m_int as a *support* mask on its reduction dimension (h is already zero there).

Backward, reusing the masked-linear launchers for every GEMM::

    dh        = (dy * m_out) Wd                       (masked_linear_backward_input)
    h, da, g  = silu(a) * b, dh * b * silu'(a), dh * silu(a)     (elementwise kernel)
    dWd, dbd, dm_out = epilogue of dy^T h             (masked_linear_backward_weight)
    dx        = da Wg + (g * m_int) Wu                (two dx GEMMs, the second accumulates)
    dWg, dbg  = da^T x ...                            (masked_linear_backward_weight)
    dWu, dbu, dm_int  = m_int * (g^T x) ...           (masked_linear_backward_weight)

``g`` is the gradient with respect to the masked up output ``b``; the up projection is the
masked linear layer ``(x Wu^T + bu) * m_int``, so its backward gives
``dm_int = sum_rows g * (x Wu^T + bu)`` from the dW GEMM's epilogue
(``sum_k Wu * (g^T x) + bu * sum_rows g``) without storing the unmasked up output.

Zero skipping: intermediate channels with ``m_int == 0`` have ``h = 0``. Kernel 1 skips
N-blocks (blocks of intermediate channels) whose m_int block is all zero and writes zeros;
the down projection skips those K-blocks; the backward skips them in dh, the elementwise
kernel, the dx reductions and the dWg / dWu tiles (written as zeros).
Gradient convention (shared with the masked linear layer): every output and every gradient
of x, weights, biases and NON-zero mask entries equals the reference; the gradient of a mask
entry that is exactly 0 is returned as 0 (it never reaches log_alpha: the hard-concrete
clamp and deterministic top-k have zero derivative there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from shear import dispatch
from shear.kernels.heuristics import elementwise_2d_config, gemm_config
from shear.kernels.masked_linear import (
    _grouped_pid,
    masked_linear_backward_input,
    masked_linear_backward_weight,
    masked_linear_forward,
)
from shear.kernels.utils import MaskedLayer, autocast_inputs, check_launchable, dot_flags, ensure_contiguous

__all__ = [
    "MaskedSwiGLUMLPFunction",
    "ShearMaskedSwiGLUMLP",
    "masked_swiglu_mlp_backward",
    "masked_swiglu_mlp_forward",
    "shear_masked_swiglu_mlp",
]


@triton.jit
def _masked_mlp_forward_kernel(
    x_ptr,
    wg_ptr,
    wu_ptr,
    bg_ptr,
    bu_ptr,
    mint_ptr,
    a_ptr,
    b_ptr,
    h_ptr,
    M,
    N_INT,
    D,
    stride_xm,
    stride_xd,
    stride_wgi,
    stride_wgd,
    stride_wui,
    stride_wud,
    stride_om,
    stride_oi,
    HAS_GBIAS: tl.constexpr,
    HAS_UBIAS: tl.constexpr,
    HAS_MINT: tl.constexpr,
    STORE_AB: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_I] tile of a = x Wg^T + bg, b = (x Wu^T + bu) * m_int, h = silu(a) b.

    a, b and h share one layout (strides stride_om, stride_oi). In a skipped tile (m_int all
    zero) b and h are 0 and a holds only the bias: the backward never reads a where b is 0.
    """
    pid = tl.program_id(0).to(tl.int64)
    pid_m, pid_i = _grouped_pid(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N_INT, BLOCK_I), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    m_ok = offs_m < M
    i_ok = offs_i < N_INT

    # Channels whose m_int is 0 give h = 0: a dead block runs its D loop zero times.
    d_end = D
    if HAS_MINT:
        mi = tl.load(mint_ptr + offs_i, mask=i_ok, other=0.0).to(ACC_DTYPE)
        d_end = tl.where(tl.sum((mi != 0).to(tl.int32), axis=0) > 0, D, 0)

    acc_g = tl.zeros((BLOCK_M, BLOCK_I), dtype=ACC_DTYPE)
    acc_u = tl.zeros((BLOCK_M, BLOCK_I), dtype=ACC_DTYPE)
    for d0 in range(0, d_end, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_d[None, :] * stride_xd,
            mask=m_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        w_mask = d_ok[:, None] & i_ok[None, :]
        wg = tl.load(
            wg_ptr + offs_d[:, None] * stride_wgd + offs_i[None, :] * stride_wgi, mask=w_mask, other=0.0
        )
        wu = tl.load(
            wu_ptr + offs_d[:, None] * stride_wud + offs_i[None, :] * stride_wui, mask=w_mask, other=0.0
        )
        if UPCAST:
            x = x.to(tl.float32)
            wg = wg.to(tl.float32)
            wu = wu.to(tl.float32)
        acc_g = tl.dot(x, wg, acc_g, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        acc_u = tl.dot(x, wu, acc_u, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    if HAS_GBIAS:
        acc_g += tl.load(bg_ptr + offs_i, mask=i_ok, other=0.0).to(ACC_DTYPE)[None, :]
    if HAS_UBIAS:
        acc_u += tl.load(bu_ptr + offs_i, mask=i_ok, other=0.0).to(ACC_DTYPE)[None, :]
    if HAS_MINT:
        acc_u = acc_u * mi[None, :]
    # Round a and b to the storage dtype first, so that h is computed from exactly what the
    # backward pass will read back (and as the reference rounds them).
    out_ty = h_ptr.dtype.element_ty
    a_s = acc_g.to(out_ty)
    b_s = acc_u.to(out_ty)
    af = a_s.to(ACC_DTYPE)
    h = af / (1.0 + tl.exp(-af)) * b_s.to(ACC_DTYPE)
    offs = offs_m[:, None] * stride_om + offs_i[None, :] * stride_oi
    o_mask = m_ok[:, None] & i_ok[None, :]
    tl.store(h_ptr + offs, h.to(out_ty), mask=o_mask)
    if STORE_AB:
        tl.store(a_ptr + offs, a_s, mask=o_mask)
        tl.store(b_ptr + offs, b_s, mask=o_mask)


@triton.jit
def _masked_mlp_backward_kernel(
    dh_ptr,
    a_ptr,
    b_ptr,
    mint_ptr,
    da_ptr,
    g_ptr,
    M,
    N_INT,
    HAS_MINT: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    """Elementwise SwiGLU backward on contiguous [M, N_INT] tensors.

    Reads dh, a, b; writes h = silu(a) b over dh (in place: dh is a scratch buffer and h is
    the down projection's dW operand), da = dh b silu'(a) and g = dh silu(a) (the gradient of
    the masked up output). Blocks whose m_int block is all zero load nothing and write zeros.
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_i = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = offs_i < N_INT
    m_lim = M
    if HAS_MINT:
        mi = tl.load(mint_ptr + offs_i, mask=i_ok, other=0.0)
        m_lim = tl.where(tl.sum((mi != 0).to(tl.int32), axis=0) > 0, M, 0)
    load_mask = (offs_m < m_lim)[:, None] & i_ok[None, :]
    offs = offs_m[:, None] * N_INT + offs_i[None, :]
    dh = tl.load(dh_ptr + offs, mask=load_mask, other=0.0).to(ACC_DTYPE)
    a = tl.load(a_ptr + offs, mask=load_mask, other=0.0).to(ACC_DTYPE)
    b = tl.load(b_ptr + offs, mask=load_mask, other=0.0).to(ACC_DTYPE)
    sig = 1.0 / (1.0 + tl.exp(-a))
    silu = a * sig
    # silu'(a) = sig * (1 + a * (1 - sig))
    da = dh * b * sig * (1.0 + a * (1.0 - sig))
    g = dh * silu
    h = silu * b
    store_mask = (offs_m < M)[:, None] & i_ok[None, :]
    out_ty = dh_ptr.dtype.element_ty
    tl.store(dh_ptr + offs, h.to(out_ty), mask=store_mask)
    tl.store(da_ptr + offs, da.to(out_ty), mask=store_mask)
    tl.store(g_ptr + offs, g.to(out_ty), mask=store_mask)


def masked_swiglu_mlp_forward(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    m_int: torch.Tensor | None = None,
    m_out: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    *,
    store_ab: bool = True,
    block_sizes: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch the fused gate/up kernel, then the masked down projection.

    Args:
        x: ``[M, D]`` (2-D; the autograd Function flattens leading dimensions).
        gate_weight, up_weight: ``[I, D]``; down_weight: ``[D_out, I]``; all in x's dtype.
        m_int: optional ``[I]`` intermediate mask; m_out: optional ``[D_out]`` output mask.
        gate_bias, up_bias: optional ``[I]``; down_bias: optional ``[D_out]``.
        store_ab: also return ``a`` and the masked ``b`` (needed for backward).
        block_sizes: optional (BLOCK_M, BLOCK_I, BLOCK_D) override for kernel 1 and
            (BLOCK_M, BLOCK_DOUT, BLOCK_I) for the down projection (tests).

    Returns:
        ``(out [M, D_out], a [M, I] or None, b [M, I] or None)``.
    """
    check_launchable(x, gate_weight, up_weight, down_weight, m_int, m_out, gate_bias, up_bias, down_bias)
    M, D = x.shape
    inter = gate_weight.shape[0]
    if up_weight.shape != gate_weight.shape or gate_weight.shape[1] != D or down_weight.shape[1] != inter:
        raise ValueError(
            f"weights do not fit: x {tuple(x.shape)}, gate {tuple(gate_weight.shape)}, "
            f"up {tuple(up_weight.shape)}, down {tuple(down_weight.shape)}"
        )
    if any(w.dtype != x.dtype for w in (gate_weight, up_weight, down_weight)):
        raise ValueError("the weights must have x's dtype")
    if m_int is not None and m_int.shape != (inter,):
        raise ValueError(f"m_int must have shape ({inter},), got {tuple(m_int.shape)}")
    dev = x.device
    h = torch.empty(M, inter, device=dev, dtype=x.dtype)
    a = torch.empty_like(h) if store_ab else None
    b = torch.empty_like(h) if store_ab else None
    if M > 0 and inter > 0:
        # two accumulators per program (gate and up)
        BM, BI, BD, num_warps, num_stages = gemm_config(M, inter, D, x.dtype, block_sizes, accumulators=2)
        _masked_mlp_forward_kernel[(triton.cdiv(M, BM) * triton.cdiv(inter, BI),)](
            x,
            gate_weight,
            up_weight,
            gate_bias if gate_bias is not None else h,
            up_bias if up_bias is not None else h,
            m_int if m_int is not None else h,
            a if a is not None else h,
            b if b is not None else h,
            h,
            M,
            inter,
            D,
            x.stride(0),
            x.stride(1),
            gate_weight.stride(0),
            gate_weight.stride(1),
            up_weight.stride(0),
            up_weight.stride(1),
            h.stride(0),
            h.stride(1),
            HAS_GBIAS=gate_bias is not None,
            HAS_UBIAS=up_bias is not None,
            HAS_MINT=m_int is not None,
            STORE_AB=store_ab,
            BLOCK_M=BM,
            BLOCK_I=BI,
            BLOCK_D=BD,
            GROUP_M=8,
            num_warps=num_warps,
            num_stages=num_stages,
            **dot_flags(x.dtype),
        )
    down_blocks = None if block_sizes is None else (block_sizes[0], block_sizes[2], block_sizes[1])
    out = masked_linear_forward(
        h, down_weight, down_bias, m_in=m_int, m_out=m_out, scale_in=False, block_sizes=down_blocks
    )
    return out, a, b


def _swiglu_backward(
    dh: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    m_int: torch.Tensor | None,
    block_sizes: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Elementwise kernel: returns (h, da, g); h is written over dh."""
    M, inter = dh.shape
    da = torch.empty_like(dh)
    g = torch.empty_like(dh)
    if M > 0 and inter > 0:
        BM, BI, num_warps = elementwise_2d_config(M, inter, block_sizes)
        _masked_mlp_backward_kernel[(triton.cdiv(M, BM), triton.cdiv(inter, BI))](
            dh,
            a,
            b,
            m_int if m_int is not None else dh,
            da,
            g,
            M,
            inter,
            HAS_MINT=m_int is not None,
            ACC_DTYPE=tl.float64 if dh.dtype == torch.float64 else tl.float32,
            BLOCK_M=BM,
            BLOCK_I=BI,
            num_warps=num_warps,
        )
    return dh, da, g


def masked_swiglu_mlp_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    m_int: torch.Tensor | None,
    m_out: torch.Tensor | None,
    gate_bias: torch.Tensor | None,
    up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    needs: tuple[bool, ...] = (True,) * 9,
    block_sizes: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Every gradient of the masked SwiGLU MLP, from ``a`` and ``b`` saved by the forward.

    Args:
        dy: ``[M, D_out]`` upstream gradient.
        x, weights, masks, biases: as in :func:`masked_swiglu_mlp_forward`.
        a, b: the forward's saved gate output and masked up output, ``[M, I]`` contiguous.
        needs: which gradients to compute, in the argument order (x, gate_weight, up_weight,
            down_weight, m_int, m_out, gate_bias, up_bias, down_bias).
        block_sizes: optional block override passed to every GEMM (tests).

    Returns:
        The 9 gradients in argument order, None where not needed or the input is absent.
    """
    n_x, n_wg, n_wu, n_wd, n_mint, n_mout, n_bg, n_bu, n_bd = needs
    n_mint = n_mint and m_int is not None
    n_mout = n_mout and m_out is not None
    kw = dict(block_sizes=block_sizes)
    grads_up_or_gate = n_x or n_wg or n_wu or n_mint or n_bg or n_bu
    dx = dwg = dwu = dwd = dm_int = dm_out = dbg = dbu = dbd = None

    h = None
    if grads_up_or_gate or n_wd or n_mout:
        # dh (only the live intermediate channels: the rest is multiplied by b = 0)
        dh = masked_linear_backward_input(dy, down_weight, m_int, m_out, scale_in=False, **kw)
        h, da, g = _swiglu_backward(dh, a, b, m_int, None if block_sizes is None else block_sizes[:2])
    dwd, dbd, _, dm_out = masked_linear_backward_weight(
        dy,
        h if h is not None else a,  # never read when h is None: only the colsum runs
        down_weight,
        down_bias,
        m_int,
        m_out,
        scale_in=False,
        need_dw=bool(n_wd),
        need_db=bool(n_bd and down_bias is not None),
        need_dm_in=False,
        need_dm_out=bool(n_mout),
        **kw,
    )
    if not grads_up_or_gate:
        return None, None, None, dwd, None, dm_out, None, None, dbd
    if n_x:
        dx = masked_linear_backward_input(da, gate_weight, None, m_int, scale_out=False, **kw)
        masked_linear_backward_input(g, up_weight, None, m_int, out=dx, accumulate=True, **kw)
    dwg, dbg, _, _ = masked_linear_backward_weight(
        da,
        x,
        gate_weight,
        gate_bias,
        None,
        m_int,
        scale_out=False,
        need_dw=bool(n_wg),
        need_db=bool(n_bg and gate_bias is not None),
        need_dm_out=False,
        **kw,
    )
    dwu, dbu, _, dm_int = masked_linear_backward_weight(
        g,
        x,
        up_weight,
        up_bias,
        None,
        m_int,
        need_dw=bool(n_wu),
        need_db=bool(n_bu and up_bias is not None),
        need_dm_out=bool(n_mint),
        **kw,
    )
    return dx, dwg, dwu, dwd, dm_int, dm_out, dbg, dbu, dbd


class MaskedSwiGLUMLPFunction(torch.autograd.Function):
    """Autograd wrapper: saves x, the weights and a, b (not h); silu is recomputed."""

    @staticmethod
    @ensure_contiguous
    def forward(ctx, x, gate_weight, up_weight, down_weight, m_int, m_out, gate_bias, up_bias, down_bias):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        out, a, b = masked_swiglu_mlp_forward(
            x2, gate_weight, up_weight, down_weight, m_int, m_out, gate_bias, up_bias, down_bias
        )
        ctx.save_for_backward(
            x2, gate_weight, up_weight, down_weight, m_int, m_out, gate_bias, up_bias, down_bias, a, b
        )
        ctx.x_shape = shape
        return out.reshape(*shape[:-1], down_weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, wg, wu, wd, m_int, m_out, bg, bu, bd, a, b = ctx.saved_tensors
        dy2 = dy.reshape(-1, wd.shape[0]).contiguous()
        needs = tuple(bool(n) for n in ctx.needs_input_grad)
        grads = masked_swiglu_mlp_backward(dy2, x2, wg, wu, wd, m_int, m_out, bg, bu, bd, a, b, needs=needs)
        dx = grads[0]
        if dx is not None:
            dx = dx.reshape(ctx.x_shape)
        return (dx, *grads[1:])


def shear_masked_swiglu_mlp(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    m_int: torch.Tensor | None = None,
    m_out: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused masked SwiGLU MLP; same signature as :func:`shear.ops.masked_swiglu_mlp`.

    Args:
        x: input ``[..., D]`` (float32, float16 or bfloat16).
        gate_weight, up_weight: ``[I, D]``; down_weight: ``[D_out, I]``; in x's dtype.
        m_int: optional ``[I]`` mask on up_proj's output.
        m_out: optional ``[D_out]`` mask on down_proj's output.
        gate_bias, up_bias: optional ``[I]``; down_bias: optional ``[D_out]``.

    Returns:
        ``[..., D_out]`` in x's dtype. Gradients flow to every tensor argument; the gradient
        of a mask entry that is exactly 0 is 0 (module docstring).

    Example:
        >>> out = shear_masked_swiglu_mlp(x, mlp.gate_proj.weight, mlp.up_proj.weight,
        ...                               mlp.down_proj.weight, m_int=z_int, m_out=z_hidden)
    """
    x, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias = autocast_inputs(
        x, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias
    )
    args = (x, gate_weight, up_weight, down_weight, m_int, m_out, gate_bias, up_bias, down_bias)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args)):
        # Inference: no autograd node, and a, b are never written (only h and the output).
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        rest = [t.contiguous() if t is not None else None for t in args[1:]]
        out, _, _ = masked_swiglu_mlp_forward(x2, *rest, store_ab=False)
        return out.reshape(*x.shape[:-1], down_weight.shape[0])
    return MaskedSwiGLUMLPFunction.apply(*args)


class ShearMaskedSwiGLUMLP(MaskedLayer, nn.Module):
    """LLaMA-style MLP (``gate_proj``, ``up_proj``, ``down_proj``; silu) under its two masks.

    The masked model's MLPs: the children are named like Hugging Face's ``LlamaMLP``, so a
    LlamaMLP's state dict loads as is. One op for the whole block, so that the Triton path
    fuses it (gate and up in one GEMM pass, the activation in its epilogue, zero channels
    skipped); the fused kernels or the reference op run per call (:mod:`shear.dispatch`).
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Build the three Linear layers (Hugging Face's layout and initialisation).

        Args:
            hidden_size: D.
            intermediate_size: I.
            bias: biases on all three projections (``mlp_bias``).
            device: device of the weights.
            dtype: dtype of the weights.
        """
        super().__init__()
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)

    def forward(
        self, x: torch.Tensor, m_int: torch.Tensor | None = None, m_out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(silu(gate(x)) * up(x) * m_int) -> down -> * m_out``.

        Args:
            x: ``[..., hidden_size]``.
            m_int: optional ``[intermediate_size]`` mask (from the patched model's slot when
                there is one, as m_out).
            m_out: optional ``[hidden_size]`` mask.

        Returns:
            ``[..., hidden_size]``.
        """
        m_int, m_out = self._masks(m_int, m_out)
        g, u, d = self.gate_proj, self.up_proj, self.down_proj
        return dispatch.masked_swiglu_mlp(
            x, g.weight, u.weight, d.weight, m_int, m_out, gate_bias=g.bias, up_bias=u.bias, down_bias=d.bias
        )
