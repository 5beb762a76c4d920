"""Causal GQA attention with a head skip mask, the reference for the attention kernel.

``causal_attention`` is eager causal attention without ``repeat_kv`` copies in the caller's
view: query head ``h`` reads KV head ``h // (H // G)`` (the ``repeat_kv`` layout).

The head mask of the masked model multiplies each head's context before o_proj (a masked
linear whose ``m_in`` holds one entry per head of head_dim features), so attention never multiplies by
it. It only tells attention which heads it may skip: a head whose mask is exactly 0 returns
zeros (its context is multiplied by 0 afterwards anyway), so its query gets no gradient and
its KV head no contribution from it. Downstream of o_proj this is exact.
"""

from __future__ import annotations

import torch


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float,
    head_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal grouped-query attention; heads whose mask is exactly 0 are skipped (zeros).

    Args:
        q: queries ``[B, H, S, D]``.
        k: keys ``[B, G, S, D]`` with ``H % G == 0``; query head ``h`` uses KV head
            ``h // (H // G)``.
        v: values ``[B, G, S, D]``.
        scaling: factor on ``q k^T`` (usually ``D ** -0.5``).
        head_mask: optional ``[H]``. Only its zeros matter: those heads return zeros and
            receive / pass on no gradient. Other heads are NOT multiplied by it. It gets no
            gradient through this op (its gradient flows through o_proj's masked linear).

    Returns:
        ``[B, S, H, D]`` (the layout Hugging Face attention functions return), in q's dtype;
        the softmax runs in float32 (or wider for float64 inputs).
    """
    B, H, S, D = q.shape
    G = k.shape[1]
    if H % G != 0 or k.shape != (B, G, S, D) or v.shape != (B, G, S, D):
        raise ValueError(
            f"causal_attention: bad shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    n_rep = H // G
    # Same as repeat_kv: query head h reads KV head h // n_rep.
    k = k.repeat_interleave(n_rep, dim=1)
    v = v.repeat_interleave(n_rep, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    out = torch.matmul(probs, v)
    if head_mask is not None:
        # where (not a product): skipped heads are exactly 0 even if q holds inf / nan there.
        keep = (head_mask != 0).view(1, H, 1, 1)
        out = torch.where(keep, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out.transpose(1, 2).contiguous()
