"""RoPE: the reference against transformers, the Triton kernel against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from shear.kernels.rope import rope_forward, shear_apply_rope
from shear.ops import apply_rope

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (B, H, G, S, D): MHA, GQA, odd S, a head_dim whose half (3) is not a power of two, D = 64.
SHAPES = [(1, 4, 4, 1, 16), (2, 6, 2, 7, 16), (1, 9, 3, 33, 64), (2, 3, 1, 5, 6)]


def _inputs(B, H, G, S, D, dtype, seed, cos_batch=None):
    g = torch.Generator().manual_seed(seed)
    # q as Hugging Face hands it over: a transposed view of [B, S, H, D] (non-contiguous).
    q = torch.randn(B, S, H, D, generator=g, dtype=torch.float64).transpose(1, 2)
    k = torch.randn(B, G, S, D, generator=g, dtype=torch.float64)
    # Arbitrary cos / sin (halves differ) so the kernel cannot lean on rotary-table structure.
    cb = B if cos_batch is None else cos_batch
    cos = torch.randn(cb, S, D, generator=g, dtype=torch.float64)
    sin = torch.randn(cb, S, D, generator=g, dtype=torch.float64)
    return [t.to(DEVICE, dtype) for t in (q, k, cos, sin)]


def _run(fn, tensors, grads):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    outs = fn(*leaves)
    dins = torch.autograd.grad(outs, leaves, grads)
    return [o.detach() for o in outs], list(dins)


def _poison_allocations(monkeypatch):
    """Every float tensor torch.empty hands out is NaN, so an element a kernel misses shows."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


def test_reference_is_transformers_apply_rotary_pos_emb():
    cfg = LlamaConfig(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, rope_theta=10000.0)
    rotary = LlamaRotaryEmbedding(cfg)
    B, H, G, S, D = 2, 6, 2, 11, 8
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, S, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, G, S, D, generator=g, dtype=torch.float64)
    pos = torch.arange(S).expand(B, S)
    cos, sin = rotary(q, pos)
    for c, s in ((cos, sin), (torch.randn_like(cos), torch.randn_like(sin))):
        ours = apply_rope(q, k, c, s)
        theirs = apply_rotary_pos_emb(q, k, c, s)
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_float64_forward_and_every_gradient(shape, monkeypatch):
    _poison_allocations(monkeypatch)
    q, k, cos, sin = _inputs(*shape, torch.float64, seed=sum(shape))
    g = torch.Generator().manual_seed(7)
    grads = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(DEVICE) for t in (q, k)]
    outs, dins = _run(shear_apply_rope, (q, k, cos, sin), grads)
    r_outs, r_dins = _run(apply_rope, (q, k, cos, sin), grads)
    # float64 end to end: only summation order differs (dcos / dsin sum over heads).
    for a, b in zip(outs + dins, r_outs + r_dins, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_kernel_broadcast_cos_sin_and_no_cos_sin_grad():
    B, H, G, S, D = 2, 6, 2, 7, 16
    q, k, cos, sin = _inputs(B, H, G, S, D, torch.float64, seed=3, cos_batch=1)
    g = torch.Generator().manual_seed(8)
    grads = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(DEVICE) for t in (q, k)]
    outs, dins = _run(shear_apply_rope, (q, k, cos, sin), grads)
    r_outs, r_dins = _run(apply_rope, (q, k, cos, sin), grads)
    # dcos / dsin of a batch-1 table are summed over the batch (sum_to_size).
    assert dins[2].shape == cos.shape
    for a, b in zip(outs + dins, r_outs + r_dins, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # The common case: constant tables; only q and k get gradients (q, k are then not saved).
    ql, kl = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    qo, ko = shear_apply_rope(ql, kl, cos, sin)
    dq, dk = torch.autograd.grad((qo, ko), (ql, kl), grads)
    torch.testing.assert_close(dq, r_dins[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dk, r_dins[1], rtol=1e-12, atol=1e-12)


def test_backward_is_rotation_by_minus_sin_for_rotary_tables():
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4)
    rotary = LlamaRotaryEmbedding(cfg)
    B, H, S, D = 1, 4, 9, 16
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, H, S, D, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    k = torch.randn(B, H, S, D, generator=g, dtype=torch.float64).to(DEVICE)
    cos, sin = rotary(q, torch.arange(S, device=DEVICE)[None])
    cos, sin = cos.double(), sin.double()
    dy = torch.randn(B, H, S, D, generator=g, dtype=torch.float64).to(DEVICE)
    (dq,) = torch.autograd.grad(shear_apply_rope(q, k, cos, sin)[0], q, dy)
    expect, _ = apply_rope(dy, k, cos, -sin)
    torch.testing.assert_close(dq, expect, rtol=1e-12, atol=1e-12)


# Tolerances against the float64 reference, for unit-normal inputs and arbitrary (not unit)
# cos / sin, so |out| reaches ~5. The kernel computes in float32 and rounds once on store:
# fp32: a few float32 ulps of |out| <= ~5  -> atol 1e-5 (measured ~1e-6);
# fp16: inputs already rounded (2^-11 relative) plus one rounding of out -> atol 1e-2
#       (measured ~4e-3);
# bf16: same with 2^-8 relative -> atol 8e-2 (measured ~3e-2; one bf16 ulp at 4 is 3e-2).
LOW_PRECISION = [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 8e-2)]


@pytest.mark.parametrize("dtype,atol", LOW_PRECISION)
def test_kernel_low_precision_against_float64(dtype, atol):
    B, H, G, S, D = 2, 6, 2, 7, 16
    q, k, cos, sin = _inputs(B, H, G, S, D, dtype, seed=11)
    g = torch.Generator().manual_seed(12)
    grads = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(DEVICE, dtype) for t in (q, k)]
    outs, dins = _run(shear_apply_rope, (q, k, cos, sin), grads)
    r_outs, r_dins = _run(apply_rope, [t.double() for t in (q, k, cos, sin)], [t.double() for t in grads])
    for a in outs + dins:
        assert a.dtype == dtype
    # dcos / dsin sum 8 heads of products: scale the tolerance by that reduction (~sqrt(8)).
    tols = [atol, atol, atol, atol, 3 * atol, 3 * atol]
    for a, b, tol in zip(outs + dins, r_outs + r_dins, tols, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=tol)


def test_poisoned_output_buffers_are_fully_written(monkeypatch):
    _poison_allocations(monkeypatch)
    q, k, cos, sin = _inputs(1, 9, 3, 33, 64, torch.float32, seed=2)
    qo, ko = rope_forward(q, k, cos, sin)
    assert torch.isfinite(qo).all() and torch.isfinite(ko).all()


def test_rejects_bad_shapes():
    q, k, cos, sin = _inputs(1, 2, 1, 3, 6, torch.float32, seed=0)
    with pytest.raises(ValueError, match="even"):
        shear_apply_rope(q[..., :5], k[..., :5], cos[..., :5], sin[..., :5])
    with pytest.raises(ValueError, match="cos / sin"):
        shear_apply_rope(q, k, cos[:, :2], sin[:, :2])
