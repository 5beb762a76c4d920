"""Distillation loss straight from hidden states: LM head, KL to a teacher and cross-entropy.

With student logits ``s = h_s W_s^T``, teacher logits ``t = h_t W_t^T`` (the teacher's own
hidden size and LM head: tied or not, ``d_t`` may differ from ``d_s``), temperature ``T``,
KL weight ``a`` and the tokens whose label is not ``ignore_index``::

    loss = mean over those tokens of  (1 - a) * CE(s, label) + a * T^2 * KL(p_t || q_s)
    p_t = softmax(t / T),   q_s = softmax(s / T),   CE at temperature 1

``T^2`` keeps the KL gradient's size independent of ``T`` (Hinton et al. 2015), so ``a``
means the same at every temperature. The labels are aligned with the rows of the hidden
states (the caller shifts them for next-token prediction); with every label ignored the
loss is 0. Gradients reach the student's hidden states and LM head only.

Memory: the full ``[N, V]`` logits are never held. :func:`linear_kl` walks the tokens in
chunks; for each chunk it computes both models' logits, the rows' losses and the gradient
of the loss with respect to the student's logits (in place, in the chunk's buffer), and
turns it into the gradients of ``h_s`` and ``W_s`` right away (``dW_s`` accumulates over
the chunks in float32). Backward only scales the stored gradients by the upstream scalar
(Liger-Kernel's fused linear cross-entropy does the same). The per-chunk row work is a
pluggable function: plain PyTorch here (the CPU production path), a Triton kernel with an
online log-sum-exp over the vocabulary in :mod:`shear.kernels.linear_kl`.

:func:`linear_kl_eager` is the same loss on full logits through autograd: the oracle of the
tests (in float64) and the baseline of the benchmark.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

#: ``rows(s, t, labels, count, temperature, kl_weight, ignore_index, loss_out, need_grad)``:
#: writes each row's share of the loss into ``loss_out`` (float32) and, when ``need_grad``,
#: the gradient of the loss with respect to ``s`` into ``s`` itself.
RowsFn = Callable[..., None]


def check_inputs(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float,
    kl_weight: float,
) -> None:
    """Raise ValueError for inputs the loss is not defined on."""
    n, d_s = student_hidden.shape
    if student_weight.dim() != 2 or student_weight.shape[1] != d_s:
        raise ValueError(f"student weight {tuple(student_weight.shape)} does not fit hidden [{n}, {d_s}]")
    if labels.shape != (n,):
        raise ValueError(f"labels {tuple(labels.shape)} must be [{n}]")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not 0 <= kl_weight <= 1:
        raise ValueError(f"kl_weight must be in [0, 1], got {kl_weight}")
    if (teacher_hidden is None) != (teacher_weight is None):
        raise ValueError("give both the teacher's hidden states and its LM head weight, or neither")
    if teacher_hidden is None:
        if kl_weight > 0:
            raise ValueError("kl_weight > 0 needs the teacher's hidden states and LM head weight")
        return
    if teacher_hidden.dim() != 2 or teacher_hidden.shape[0] != n:
        raise ValueError(f"teacher hidden {tuple(teacher_hidden.shape)} must be [{n}, d_t]")
    if teacher_weight.shape != (student_weight.shape[0], teacher_hidden.shape[1]):
        raise ValueError(
            f"teacher weight {tuple(teacher_weight.shape)} must be "
            f"[{student_weight.shape[0]}, {teacher_hidden.shape[1]}] (same vocabulary as the student)"
        )


def default_chunk(n_tokens: int, vocab: int, hidden: int) -> int:
    """Tokens per chunk: a chunk of logits as large as the larger of the student's hidden
    states (Liger-Kernel's rule) and its LM head, so that the loss adds no more than either
    to the step's peak memory (the LM head's gradient is that size anyway).

    At least ``hidden`` tokens per chunk: every chunk adds its part into the whole LM head
    gradient (``[V, d]`` read and written), and with ``d`` tokens that pass does ``d`` flops
    per element it moves, instead of being memory bound (on a CPU, 1-token chunks made the
    loss 20x slower than the full-logits one).
    """
    return max(1, min(n_tokens, max(hidden, math.ceil(n_tokens * hidden / vocab))))


class LinearKLFunction(torch.autograd.Function):
    """The chunked loss; ``rows`` does each chunk's row work (torch or Triton)."""

    @staticmethod
    def forward(
        ctx: Any,
        h_s: torch.Tensor,
        w_s: torch.Tensor,
        h_t: torch.Tensor | None,
        w_t: torch.Tensor | None,
        labels: torch.Tensor,
        temperature: float,
        kl_weight: float,
        ignore_index: int,
        chunk: int,
        rows: RowsFn,
    ) -> torch.Tensor:
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        # the inputs arrive in the dtype to compute in (linear_kl casts them under autocast);
        # meta tensors (the ahead-of-time compile) have no autocast to turn off
        off = torch.autocast(h_s.device.type, enabled=False) if h_s.device.type != "meta" else nullcontext()
        with off:
            loss, dh, dw = chunked_linear_kl(
                rows, h_s, w_s, h_t, w_t, labels, temperature, kl_weight, ignore_index, chunk, need_grad
            )
        ctx.save_for_backward(dh, dw)
        return loss

    @staticmethod
    def backward(ctx: Any, dloss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        dh, dw = ctx.saved_tensors
        # the stored gradients are those of the loss itself; upstream is a scalar (1 in training)
        dh = dh * dloss.to(dh.dtype) if ctx.needs_input_grad[0] else None
        dw = dw * dloss.to(dw.dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None, None, None, None, None, None


def chunked_linear_kl(
    rows: RowsFn,
    h_s: torch.Tensor,
    w_s: torch.Tensor,
    h_t: torch.Tensor | None,
    w_t: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float,
    kl_weight: float,
    ignore_index: int,
    chunk: int,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The loss (and its gradients to ``h_s`` and ``w_s``) one chunk of tokens at a time.

    Args:
        rows: the per-chunk row work (see :data:`RowsFn`).
        h_s, w_s, h_t, w_t, labels: 2-D hidden states ``[N, d]``, LM heads ``[V, d]``, labels ``[N]``.
        temperature, kl_weight, ignore_index: as in :func:`linear_kl`.
        chunk: tokens per chunk.
        need_grad: also compute the gradients.

    Returns:
        ``(loss, dh_s, dw_s)``: a float32 scalar (float64 for float64 inputs), then the
        gradients in the dtypes of ``h_s`` and ``w_s`` (None unless ``need_grad``).
    """
    n = h_s.shape[0]
    acc = torch.float64 if h_s.dtype == torch.float64 else torch.float32
    count = (labels != ignore_index).sum().clamp_min(1).to(acc).reshape(1)  # on the device: no sync
    loss_rows = torch.empty(n, dtype=acc, device=h_s.device)
    dh = torch.empty_like(h_s) if need_grad else None
    dw = torch.zeros(w_s.shape, dtype=acc, device=w_s.device) if need_grad else None
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        hs = h_s[start:end]
        s = hs @ w_s.t()  # one chunk of the student's logits: overwritten by their gradient
        t = None
        if h_t is not None and kl_weight > 0:
            with torch.no_grad():
                t = h_t[start:end] @ w_t.t()
        rows(
            s,
            t,
            labels[start:end],
            count,
            temperature,
            kl_weight,
            ignore_index,
            loss_rows[start:end],
            need_grad,
        )
        if need_grad:
            torch.mm(s, w_s, out=dh[start:end])
            if s.dtype == acc:
                dw.addmm_(s.t(), hs)
            else:  # 16-bit: the chunks' products are summed in float32
                dw += (s.t() @ hs).to(acc)
    loss = loss_rows.sum()
    if need_grad:
        dw = dw.to(w_s.dtype)
    return loss, dh, dw


def linear_kl_rows(
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
    """The row work of one chunk in PyTorch (see :data:`RowsFn`); computed in float32 or wider.

    On CPU this is memory bound, so it works in place in the chunk's own buffers (``s`` and
    ``t`` are scratch: ``s`` ends as the gradient) and makes as few passes over them as it can.
    """
    acc = loss_out.dtype
    a, T = kl_weight, temperature
    valid = labels != ignore_index
    target = torch.where(valid, labels, 0).long()[:, None]
    scale = valid.to(acc) / count
    logits = s.to(acc)  # s itself in float32: changed in place below
    loss = torch.zeros(s.shape[0], dtype=acc, device=s.device)
    grad = q = None
    if a < 1:
        loss += (1 - a) * -logits.gather(1, target)[:, 0]
    if a > 0:
        log_q = logits * (1 / T)
        lse_q = torch.logsumexp(log_q, -1, keepdim=True)
        log_q -= lse_q
        log_p = t.to(acc).mul_(1 / T)  # t is scratch too
        log_p -= torch.logsumexp(log_p, -1, keepdim=True)
        p = log_p.exp()
        kl = (p.unsqueeze(1) @ log_p.sub_(log_q).unsqueeze(2)).view(-1)  # sum p log(p / q), one pass
        loss += a * T * T * kl
        if need_grad:  # a T (q - p)
            q = log_q.exp_()
            grad = torch.sub(q, p).mul_(a * T)
    if a < 1:
        lse1 = lse_q.view(-1) if a > 0 and T == 1 else torch.logsumexp(logits, -1)
        loss += (1 - a) * lse1
        if need_grad:  # (1 - a) (softmax(s) - onehot)
            soft = q if q is not None and T == 1 else logits.sub_(lse1[:, None]).exp_()
            grad = soft.mul(1 - a) if grad is None else grad.add_(soft, alpha=1 - a)
            grad.scatter_add_(1, target, torch.full_like(scale[:, None], a - 1))
    loss_out.copy_(loss * scale)
    if need_grad:
        s.copy_(grad.mul_(scale[:, None]))


def _flatten(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    h_t = None if teacher_hidden is None else teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    return h_s, h_t, labels.reshape(-1)


def linear_kl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
    rows: RowsFn = linear_kl_rows,
) -> torch.Tensor:
    """``(1 - a) * CE + a * T^2 * KL(teacher || student)`` from hidden states, chunked over tokens.

    Args:
        student_hidden: ``[..., d_s]`` the student's final hidden states (after the final
            norm, and the hidden mask when there is one).
        student_weight: ``[V, d_s]`` the student's LM head.
        teacher_hidden: ``[..., d_t]`` the teacher's final hidden states, same tokens; None
            only with ``kl_weight == 0`` (plain cross-entropy).
        teacher_weight: ``[V, d_t]`` the teacher's LM head.
        labels: ``[...]`` target token per position (already shifted), ``ignore_index`` to skip.
        temperature: ``T`` of both softmaxes in the KL term (the CE term uses 1).
        kl_weight: ``a`` in [0, 1].
        ignore_index: label value of positions left out of the mean.
        chunk_size: tokens per chunk (default :func:`default_chunk`).
        rows: the per-chunk row work (the Triton kernel passes its own).

    Returns:
        The mean loss over the non-ignored positions (0 when there are none), a scalar in
        float32 (float64 for float64 inputs); differentiable in ``student_hidden`` and
        ``student_weight`` only. Under ``torch.autocast`` the LM heads run in the autocast
        dtype, as ``F.linear`` would (the gradients reach the originals in their dtypes).
    """
    kind = student_hidden.device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        dtype = torch.get_autocast_dtype(kind)
        student_hidden, student_weight = student_hidden.to(dtype), student_weight.to(dtype)
        if teacher_hidden is not None:
            teacher_hidden, teacher_weight = teacher_hidden.to(dtype), teacher_weight.to(dtype)
    h_s, h_t, flat_labels = _flatten(student_hidden, teacher_hidden, labels)
    check_inputs(h_s, student_weight, h_t, teacher_weight, flat_labels, temperature, kl_weight)
    n = h_s.shape[0]
    chunk = chunk_size or default_chunk(n, student_weight.shape[0], h_s.shape[1])
    return LinearKLFunction.apply(
        h_s,
        student_weight,
        None if h_t is None else h_t.detach(),
        None if teacher_weight is None else teacher_weight.detach(),
        flat_labels,
        float(temperature),
        float(kl_weight),
        int(ignore_index),
        int(chunk),
        rows,
    )


def linear_kl_eager(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """The loss of :func:`linear_kl` on the full logits through autograd (oracle and baseline)."""
    h_s, h_t, flat = _flatten(student_hidden, teacher_hidden, labels)
    check_inputs(h_s, student_weight, h_t, teacher_weight, flat, temperature, kl_weight)
    s = (h_s @ student_weight.t()).to(torch.promote_types(h_s.dtype, torch.float32))
    valid = flat != ignore_index
    count = valid.sum().clamp_min(1)
    per_row = torch.zeros(s.shape[0], dtype=s.dtype, device=s.device)
    if kl_weight < 1:
        ce = F.cross_entropy(s, torch.where(valid, flat, 0).long(), reduction="none")
        per_row = per_row + (1 - kl_weight) * ce
    if kl_weight > 0:
        t = (h_t.detach() @ teacher_weight.detach().t()).to(s.dtype)
        kl = F.kl_div(
            torch.log_softmax(s / temperature, -1),
            torch.log_softmax(t / temperature, -1),
            reduction="none",
            log_target=True,
        ).sum(-1)
        per_row = per_row + kl_weight * temperature**2 * kl
    return (per_row * valid).sum() / count
