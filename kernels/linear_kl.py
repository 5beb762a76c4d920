"""Fused linear KL distillation loss (with an optional cross-entropy term) in Triton.

Reference: :func:`shear.ops.linear_kl.linear_kl` (the math, the chunking and the gradient
convention are documented there). With ``s``, ``t`` one token's student and teacher logits,
``T`` the temperature and ``a`` the KL weight::

    loss_row = (1 - a) * (lse(s) - s[label]) + a * T^2 * KL(softmax(t / T) || softmax(s / T))
    dloss_row / ds = (1 - a) * (softmax(s) - onehot(label)) + a * T * (softmax(s / T) - softmax(t / T))

The tokens are walked in chunks (:func:`shear.ops.linear_kl.chunked_linear_kl`): per chunk
both LM-head GEMMs run in torch (cuBLAS, tensor cores), then one program per token row runs
:func:`_linear_kl_forward_kernel`, which reads the row's logits twice:

* pass 1 reduces the vocabulary with an online log-sum-exp, one block at a time, for up to
  three softmaxes at once (student at 1 and at ``T``, teacher at ``T``), and accumulates the
  KL's cross term ``sum_v exp(t_v/T - m_t) (t_v - s_v) / T`` rescaled alongside the teacher's
  sum, so that ``KL = cross / l_t - lse(t/T) + lse(s/T)`` needs no third pass;
* pass 2 (when a gradient is needed) writes ``dloss/ds``, scaled by ``1 / count``, over the
  student's logits in place; the chunk's ``dh = g W_s`` and ``dW_s += g^T h_s`` are torch GEMMs.

So at most one chunk of logits per model exists at a time, and nothing of size
``[N, V]`` is ever allocated. Ignored rows get loss 0 and a zero gradient row. The row losses
are stored in float32 and summed by torch (deterministic). The count of non-ignored tokens
stays on the device (no host sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from shear import dispatch
from shear.kernels.heuristics import vocab_config
from shear.kernels.utils import check_launchable
from shear.ops.linear_kl import IGNORE_INDEX, linear_kl

__all__ = ["ShearLinearKL", "linear_kl_rows_forward", "shear_linear_kl"]


@triton.jit
def _online_lse(m, total, x):
    """One block's step of an online log-sum-exp: returns the new (max, sum of exp(x - max))."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    return m_new, total * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)


@triton.jit
def _linear_kl_forward_kernel(
    s_ptr, t_ptr, labels_ptr, count_ptr, loss_ptr, V, stride_s, stride_t,
    inv_temp, ce_weight, kl_loss_weight, kl_grad_weight, ignore_index,
    HAS_CE: tl.constexpr, HAS_KL: tl.constexpr, NEED_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """One token row: its loss share into loss_ptr[row], its logit gradient over s (NEED_GRAD)."""
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    scale = tl.where(valid, 1.0 / tl.load(count_ptr).to(tl.float32), 0.0)
    cols = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")

    # pass 1: online log-sum-exps (student at 1, student at T, teacher at T) and the KL cross term
    m1 = neg_inf
    l1 = 0.0
    ms = neg_inf
    ls = 0.0
    mt = neg_inf
    lt = 0.0
    cross = 0.0
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + cols
        ok = offs < V
        # masked lanes: 0 in arithmetic, -inf where they would enter a log-sum-exp
        s = tl.load(s_row + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_CE:
            m1, l1 = _online_lse(m1, l1, tl.where(ok, s, neg_inf))
        if HAS_KL:
            t = tl.load(t_row + offs, mask=ok, other=0.0).to(tl.float32)
            ms, ls = _online_lse(ms, ls, tl.where(ok, s * inv_temp, neg_inf))
            tt = tl.where(ok, t * inv_temp, neg_inf)
            mt_new = tl.maximum(mt, tl.max(tt, axis=0))
            et = tl.exp(tt - mt_new)
            alpha = tl.exp(mt - mt_new)
            cross = cross * alpha + tl.sum(et * (t - s) * inv_temp, axis=0)
            lt = lt * alpha + tl.sum(et, axis=0)
            mt = mt_new
    loss = 0.0
    lse1 = 0.0
    lse_s = 0.0
    lse_t = 0.0
    if HAS_CE:
        lse1 = m1 + tl.log(l1)
        s_label = tl.load(s_row + tl.where(valid, label, 0)).to(tl.float32)
        loss += ce_weight * (lse1 - s_label)
    if HAS_KL:
        lse_s = ms + tl.log(ls)
        lse_t = mt + tl.log(lt)
        loss += kl_loss_weight * (cross / lt - lse_t + lse_s)
    tl.store(loss_ptr + row, tl.where(valid, loss * scale, 0.0))

    # pass 2: the gradient with respect to the student's logits, written over them
    if NEED_GRAD:
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + cols
            ok = offs < V
            s = tl.load(s_row + offs, mask=ok, other=0.0).to(tl.float32)
            g = tl.zeros((BLOCK_V,), dtype=tl.float32)
            if HAS_CE:
                g += ce_weight * (tl.exp(s - lse1) - tl.where(offs == label, 1.0, 0.0))
            if HAS_KL:
                t = tl.load(t_row + offs, mask=ok, other=0.0).to(tl.float32)
                g += kl_grad_weight * (tl.exp(s * inv_temp - lse_s) - tl.exp(t * inv_temp - lse_t))
            tl.store(s_row + offs, (g * scale).to(s_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------


def linear_kl_rows_forward(
    s: torch.Tensor,
    t: torch.Tensor | None,
    labels: torch.Tensor,
    count: torch.Tensor,
    temperature: float,
    kl_weight: float,
    ignore_index: int,
    loss_out: torch.Tensor,
    need_grad: bool,
) -> None:
    """The row work of one chunk (:data:`shear.ops.linear_kl.RowsFn`) as one kernel launch.

    Args:
        s: ``[C, V]`` the student's logits (row-contiguous); overwritten by ``dloss/ds``
            when ``need_grad``.
        t: ``[C, V]`` the teacher's logits, or None when ``kl_weight == 0``.
        labels: ``[C]`` integer labels.
        count: ``[1]`` number of non-ignored tokens in the whole batch (at least 1).
        temperature, kl_weight, ignore_index: as in :func:`shear.ops.linear_kl.linear_kl`.
        loss_out: ``[C]`` float32 (or float64) row losses, written.
        need_grad: write the gradient over ``s``.
    """
    rows, vocab = s.shape
    has_kl = kl_weight > 0
    if has_kl and (t is None or t.shape != s.shape):
        raise ValueError(
            f"teacher logits {None if t is None else tuple(t.shape)} must match {tuple(s.shape)}"
        )
    if s.stride(1) != 1 or (has_kl and t.stride(1) != 1):
        raise ValueError("the logits must be contiguous along the vocabulary")
    check_launchable(s, t, count, loss_out)
    if rows == 0:
        return
    block, num_warps = vocab_config(vocab)
    tt = t if has_kl else s  # never read without HAS_KL
    _linear_kl_forward_kernel[(rows,)](
        s, tt, labels.contiguous(), count, loss_out, vocab, s.stride(0), tt.stride(0),
        1.0 / float(temperature), 1.0 - float(kl_weight), float(kl_weight) * float(temperature) ** 2,
        float(kl_weight) * float(temperature), int(ignore_index),
        HAS_CE=kl_weight < 1, HAS_KL=has_kl, NEED_GRAD=need_grad, BLOCK_V=block, num_warps=num_warps,
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# functional API, module (the autograd Function is the reference's LinearKLFunction, which
# takes the row work as an argument: the chunk loop and its GEMMs are the same)
# --------------------------------------------------------------------------------------


def shear_linear_kl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Fused ``(1 - a) * CE + a * T^2 * KL(teacher || student)`` from hidden states.

    Same signature and semantics as :func:`shear.ops.linear_kl.linear_kl`; the row work of
    every chunk runs in :func:`_linear_kl_forward_kernel`.

    Args:
        student_hidden: ``[..., d_s]`` final hidden states of the student.
        student_weight: ``[V, d_s]`` its LM head.
        teacher_hidden: ``[..., d_t]`` the teacher's, or None with ``kl_weight == 0``.
        teacher_weight: ``[V, d_t]`` the teacher's LM head.
        labels: ``[...]`` shifted labels, ``ignore_index`` where none.
        temperature: softmax temperature of the KL term.
        kl_weight: ``a`` in [0, 1].
        ignore_index: label value left out of the mean.
        chunk_size: tokens per chunk (default: logits about the size of the hidden states).

    Returns:
        Scalar float32 loss; gradients to ``student_hidden`` and ``student_weight``. Under
        autocast the operands are cast to its dtype (by :func:`shear.ops.linear_kl.linear_kl`).
    """
    return linear_kl(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, temperature,
        kl_weight, ignore_index, chunk_size, rows=linear_kl_rows_forward,
    )  # fmt: skip


class ShearLinearKL(nn.Module):
    """The distillation loss as a layer: fixed temperature and KL weight, backend per call.

    Args:
        temperature: softmax temperature of the KL term.
        kl_weight: ``a``: the loss is ``(1 - a) * CE + a * T^2 * KL``.
        ignore_index: label value left out of the mean.
    """

    def __init__(self, temperature: float = 1.0, kl_weight: float = 1.0, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.temperature, self.kl_weight, self.ignore_index = temperature, kl_weight, ignore_index

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor | None,
        teacher_weight: torch.Tensor | None,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        """The mean loss over the non-ignored labels (see :func:`shear_linear_kl`)."""
        return dispatch.linear_kl(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
            self.temperature, self.kl_weight, self.ignore_index,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, kl_weight={self.kl_weight}"
