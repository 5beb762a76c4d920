"""Fused masked RMSNorm against the float64 reference and Hugging Face's LlamaRMSNorm."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import poison_allocations
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from shear.kernels import masked_rms_norm as K
from shear.ops.masked_rms_norm import masked_rms_norm as reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6
SHAPES = [(1, 1), (3, 7), (5, 576), (2, 3, 129), (4, 4096)]

# fp32: the kernel accumulates rows of up to 4096 terms in fp32 (relative error ~d * 6e-8 in
# the worst case, ~1e-6 in practice) against an exact float64 reference; outputs and
# gradients are O(1)-O(10), so 1e-5 absolute / relative is ample but still catches any
# wrong term (those are O(0.1) or larger).
# fp16 / bf16: the inputs are the same rounded values in both paths, so the kernel's only
# extra error is its single final rounding (0.5 ulp, 1 ulp in the interpreter, whose
# fp32 -> bf16 cast truncates); rtol of ~2 ulp (2^-9 fp16, 2^-6 bf16) plus an atol of the
# same size for entries near zero (dx is a difference of two terms). Every atol is further
# multiplied by the tensor's largest entry (see _close).
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every output and partial buffer starts as NaN, so an element a kernel does not write shows."""
    poison_allocations(monkeypatch, K)


def _mask(d: int, kind: str, seed: int) -> torch.Tensor | None:
    """None, a hard-concrete-like mask with exact zeros and ones, or an all-zero mask."""
    if kind == "none":
        return None
    if kind == "zero":
        return torch.zeros(d, device=DEVICE)
    g = torch.Generator().manual_seed(seed)
    z = (torch.rand(d, generator=g) * 1.4 - 0.2).clamp(0, 1)
    if d >= 3:
        z[0], z[1] = 0.0, 1.0
    return z.to(DEVICE)


def _inputs(shape, dtype, z_kind, z_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    x = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
    w = (torch.rand(d, generator=g) + 0.5).to(dtype).to(DEVICE)
    z = _mask(d, z_kind, seed + 1)
    if z is not None:
        z = z.to(z_dtype or dtype)
    dy = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
    return x, w, z, dy


def _run(fn, x, w, z, dy, cast=None):
    """Forward + backward of fn on leaf copies (cast to ``cast`` first); returns y and grads."""
    leaves = [
        t if t is None else (t.to(cast) if cast else t).detach().requires_grad_(True) for t in (x, w, z)
    ]
    y = fn(leaves[0], leaves[1], leaves[2], EPS)
    y.backward(dy.to(y.dtype))
    return y.detach(), [None if t is None else t.grad for t in leaves]


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: dict, what: str) -> None:
    # atol scales with the tensor's largest entry: sums with cancellation (dx, dweight, dz)
    # carry errors relative to their terms, not to the result (with an all-zero mask,
    # rstd = eps^-1/2 = 1000 makes dz entries O(1000)).
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.double(), expected, atol=tol["atol"] * scale, rtol=tol["rtol"], msg=lambda m: f"{what}: {m}"
    )


def _check(x, w, z, dy, tol):
    y, grads = _run(K.shear_masked_rms_norm, x, w, z, dy)
    y_ref, grads_ref = _run(reference, x, w, z, dy, cast=torch.float64)
    assert y.dtype == torch.promote_types(x.dtype, w.dtype) and y.shape == x.shape
    _close(y, y_ref, tol, "y")
    for name, g, g_ref in zip(("x", "weight", "z"), grads, grads_ref, strict=True):
        if g_ref is None:
            assert g is None
            continue
        _close(g, g_ref, tol, f"d{name}")
    assert grads[0].dtype == x.dtype and grads[1].dtype == w.dtype
    if z is not None:
        assert grads[2].dtype == z.dtype
    if z is not None and z.shape[0] >= 3:
        # z_0 == 0: the pruned dimension's output is 0, yet its mask gradient is the
        # reference's full value (nothing is skipped in RMSNorm).
        assert (y[..., 0] == 0).all()


@pytest.mark.parametrize("z_kind", ["none", "hard_concrete", "zero"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp32_matches_float64_reference(shape, z_kind):
    _check(*_inputs(shape, torch.float32, z_kind, seed=len(shape) + shape[-1]), TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("z_dtype", ["same", "fp32"])
@pytest.mark.parametrize("shape", [(3, 7), (2, 3, 129), (4, 4096)], ids=str)
def test_half_precision_matches_float64_reference(shape, dtype, z_dtype):
    # fp32 masks with a bf16 / fp16 model is the training setup (masks are fp32 parameters).
    zd = torch.float32 if z_dtype == "fp32" else dtype
    _check(*_inputs(shape, dtype, "hard_concrete", z_dtype=zd, seed=shape[-1]), TOL[dtype])


def test_mixed_weight_dtype_promotes_like_reference():
    # An fp32 weight on bf16 activations: the reference (and LlamaRMSNorm) return fp32.
    x, w, z, dy = _inputs((3, 33), torch.bfloat16, "hard_concrete", z_dtype=torch.float32)
    _check(x, w.float(), z, dy.float(), TOL[torch.bfloat16])


def test_no_mask_equals_llama_rms_norm(monkeypatch):
    monkeypatch.setenv("SHEAR_KERNELS", "triton")  # the layer dispatches per call
    d = 129
    hf = LlamaRMSNorm(d, eps=EPS).to(DEVICE)
    ours = K.ShearMaskedRMSNorm(d, eps=EPS).to(DEVICE)
    with torch.no_grad():
        hf.weight.uniform_(0.5, 1.5)
    ours.load_state_dict(hf.state_dict())  # same parameter name: "weight"
    assert ours.variance_epsilon == hf.variance_epsilon
    x = torch.randn(2, 5, d, device=DEVICE)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_hf, y = hf(x1), ours(x2)
    dy = torch.randn_like(y)
    y_hf.backward(dy)
    y.backward(dy)
    # Both fp32; only summation order differs.
    torch.testing.assert_close(y, y_hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.weight.grad, hf.weight.grad, atol=1e-4, rtol=1e-5)


def test_module_with_mask_and_1d_input(monkeypatch):
    monkeypatch.setenv("SHEAR_KERNELS", "triton")
    d = 48
    norm = K.ShearMaskedRMSNorm(d).to(DEVICE)
    z = _mask(d, "hard_concrete", 3)
    x = torch.randn(d, device=DEVICE)
    torch.testing.assert_close(norm(x, z), reference(x, norm.weight, z, norm.variance_epsilon))
    assert "eps=1e-06" in repr(norm)
    with pytest.raises(ValueError):
        K.shear_masked_rms_norm(x, norm.weight, z[:-1], EPS)


def test_backward_is_deterministic():
    x, w, z, dy = _inputs((13, 129), torch.float32, "hard_concrete", seed=5)
    _, g1 = _run(K.shear_masked_rms_norm, x, w, z, dy)
    _, g2 = _run(K.shear_masked_rms_norm, x, w, z, dy)
    for a, b in zip(g1, g2, strict=True):
        assert torch.equal(a, b)


def test_launchers_write_every_element_into_poisoned_outputs():
    x, w, z, dy = _inputs((6, 129), torch.float16, "hard_concrete", seed=9)
    y = torch.full(x.shape, float("nan"), dtype=x.dtype, device=DEVICE)
    rstd = torch.full((6,), float("nan"), device=DEVICE)
    K.masked_rms_norm_forward(x, w, z, EPS, y=y, rstd=rstd)
    assert not torch.isnan(y).any() and not torch.isnan(rstd).any()
    dx = torch.full(x.shape, float("nan"), dtype=x.dtype, device=DEVICE)
    _, dw, dz = K.masked_rms_norm_backward(dy, x, w, z, rstd, dx=dx)
    assert not torch.isnan(dx).any() and not torch.isnan(dw).any() and not torch.isnan(dz).any()
