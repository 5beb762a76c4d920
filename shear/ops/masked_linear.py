"""Masked linear: y = ((x * m_in) W^T + b) * m_out, the reference for the fused kernel.

Masks are optional: ``None`` means "no mask on that side". They are cast to the input's
dtype so that a float32 mask never promotes bf16/fp16 activations. The input mask may hold
one entry per group of consecutive features (a head mask on o_proj: one entry per head of
``head_dim`` features), so its gradient comes out per head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    m_in: torch.Tensor | None = None,
    m_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Linear layer with an input-feature mask and an output-feature mask.

    Args:
        x: input ``[..., K]``.
        weight: ``[N, K]``.
        bias: optional ``[N]``; it sits inside the output mask.
        m_in: optional mask on input features: ``[K]``, or ``[n]`` with ``K % n == 0``, one
            entry per group of ``K // n`` consecutive features (e.g. a head mask before o_proj).
        m_out: optional ``[N]`` mask on output features (e.g. the intermediate mask on
            up_proj, or layer * hidden masks on o_proj / down_proj).

    Returns:
        ``[..., N]`` in the dtype of ``x``.
    """
    if m_in is not None:
        K, n = x.shape[-1], m_in.numel()
        if m_in.dim() != 1 or n == 0 or K % n:
            raise ValueError(f"m_in of shape {tuple(m_in.shape)} does not divide {K} input features")
        x = x * m_in.to(x.dtype).repeat_interleave(K // n)
    y = F.linear(x, weight, bias)
    if m_out is not None:
        y = y * m_out.to(y.dtype)
    return y
