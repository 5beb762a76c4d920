"""Masked linear: y = ((x * m_in) W^T + b) * m_out, the reference for the fused kernel.

Masks are optional: ``None`` means "no mask on that side". They are cast to the input's
dtype so that a float32 mask never promotes bf16/fp16 activations.
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
        m_in: optional ``[K]`` mask on input features (e.g. a head mask before o_proj).
        m_out: optional ``[N]`` mask on output features (e.g. the intermediate mask on
            up_proj, or layer * hidden masks on o_proj / down_proj).

    Returns:
        ``[..., N]`` in the dtype of ``x``.
    """
    if m_in is not None:
        x = x * m_in.to(x.dtype)
    y = F.linear(x, weight, bias)
    if m_out is not None:
        y = y * m_out.to(y.dtype)
    return y
