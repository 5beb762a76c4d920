"""Masked SwiGLU MLP, the reference for the fused kernel.

``out = ((silu(x Wg^T + bg) * ((x Wu^T + bu) * m_int)) Wd^T + bd) * m_out``: exactly
Hugging Face's ``LlamaMLP`` (``act_fn = silu``) with the masks where shear's masked
modules put them: the intermediate mask on up_proj's output and the output mask (layer *
hidden factors) on down_proj's output. It is written with :func:`masked_linear` so that it
*is* that composition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shear.ops.masked_linear import masked_linear


def masked_swiglu_mlp(
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
    """SwiGLU MLP with an intermediate-channel mask and an output-feature mask.

    Args:
        x: input ``[..., D]``.
        gate_weight: ``[I, D]`` (gate_proj).
        up_weight: ``[I, D]`` (up_proj).
        down_weight: ``[D_out, I]`` (down_proj).
        m_int: optional ``[I]`` mask on up_proj's output (the intermediate mask).
        m_out: optional ``[D_out]`` mask on down_proj's output.
        gate_bias, up_bias, down_bias: optional biases (``mlp_bias=True`` models); the
            up and down biases sit inside their masks.

    Returns:
        ``[..., D_out]`` in the dtype of ``x``.
    """
    a = masked_linear(x, gate_weight, gate_bias)
    b = masked_linear(x, up_weight, up_bias, m_out=m_int)
    return masked_linear(F.silu(a) * b, down_weight, down_bias, m_out=m_out)
