"""RMSNorm over the kept hidden dimensions, the reference for the fused kernel.

rms = sqrt(sum_i 1[z_i != 0] x_i^2 / count(z != 0)); y = weight * (x / sqrt(rms^2 + eps)) * z.
The masked sum needs no host synchronisation (the original code used a data-dependent
index_select). With ``z = None`` it is exactly Hugging Face's LlamaRMSNorm.
"""

from __future__ import annotations

import torch


def masked_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, z: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """RMSNorm whose statistics ignore pruned hidden dimensions, then scaled by the mask.

    Args:
        x: input ``[..., d]``.
        weight: ``[d]`` RMSNorm weight.
        z: optional ``[d]`` hidden mask; dimensions where it is exactly 0 are left out
            of the mean of squares, and the output is multiplied by it.
        eps: variance epsilon.

    Returns:
        ``[..., d]`` in the dtype of ``x`` (statistics computed in float32 or wider).
    """
    input_dtype = x.dtype
    h = x.to(torch.promote_types(input_dtype, torch.float32))
    if z is None:
        variance = h.pow(2).mean(-1, keepdim=True)
    else:
        keep = (z != 0).to(h.dtype)
        count = keep.sum().clamp_min(1.0)
        variance = (h.pow(2) * keep).sum(-1, keepdim=True) / count
    h = h * torch.rsqrt(variance + eps)
    y = weight * h.to(input_dtype)
    if z is not None:
        y = y * z.to(y.dtype)
    return y
