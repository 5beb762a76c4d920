"""The fused masked linear kernels against the float64 reference (shear.ops.masked_linear).

Runs the real Triton kernels: on a GPU when there is one, else in the interpreter on CPU
(tests/conftest.py sets TRITON_INTERPRET=1 before shear.kernels is imported).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import check_close, mask_with_zeros, poison_allocations

import shear.kernels.masked_linear as ml
from shear.kernels.masked_linear import (
    ShearMaskedLinear,
    masked_linear_backward,
    masked_linear_backward_input,
    masked_linear_backward_weight,
    masked_linear_forward,
    shear_masked_linear,
)
from shear.ops import masked_linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Error bounds, relative to the largest magnitude of the reference tensor (max) and to its
# norm (rms). fp32: accumulation in fp32 over <= 128 terms gives ~1e-6; 2e-5 leaves room for
# a GPU's summation order (TF32 stays off unless torch allows it). fp16: operands and outputs
# rounded to 11 bits (2^-11 = 4.9e-4 per rounding, a few roundings on a path). bf16: 8 bits
# (2^-8 = 3.9e-3 per rounding; the interpreter's fp32 -> bf16 casts truncate, one ulp more).
TOL = {
    torch.float32: dict(max=2e-5, rms=1e-5),
    torch.float16: dict(max=2e-3, rms=1e-3),
    torch.bfloat16: dict(max=4e-2, rms=1.5e-2),
}


def _check(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    check_close(actual, expected, TOL[dtype], f"{what} ({dtype})")


def _mask(n: int, g: torch.Generator, zero_block: tuple[int, int] | None = (32, 64)) -> torch.Tensor:
    return mask_with_zeros(n, g, every=5, start=2, zero_block=zero_block)


def _inputs(shape_x, K, N, g, dtype, bias=True, m_in=True, m_out=True):
    """Low-precision inputs (masks stay fp32, as log_alpha's masks are) and a dy."""
    x = torch.randn(*shape_x, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    mi = _mask(K, g) if m_in else None
    mo = _mask(N, g) if m_out else None
    dy = torch.randn(*shape_x, N, generator=g).to(dtype)
    return [x, w, b, mi, mo], dy


def _reference(args, dy):
    """Output and every input gradient of the float64 reference on the same (rounded) values."""
    leaves = [a.detach().double().requires_grad_(True) if a is not None else None for a in args]
    y = masked_linear(*leaves)
    y.backward(dy.double())
    return y.detach(), [lf.grad if lf is not None else None for lf in leaves]


def _kernel(args, dy):
    leaves = [a.detach().clone().to(DEVICE).requires_grad_(True) if a is not None else None for a in args]
    y = shear_masked_linear(*leaves)
    y.backward(dy.to(DEVICE))
    return y.detach(), [lf.grad if lf is not None else None for lf in leaves]


def _compare_all(args, dy, dtype):
    y_ref, g_ref = _reference(args, dy)
    y, grads = _kernel(args, dy)
    assert y.dtype == dtype
    _check(y, y_ref, dtype, "y")
    for name, a, gk, gr in zip(("x", "weight", "bias", "m_in", "m_out"), args, grads, g_ref, strict=True):
        if a is None:
            assert gk is None
            continue
        assert gk.dtype == a.dtype, name
        if name.startswith("m_"):
            # Convention: the gradient of a mask entry that is exactly 0 is 0.
            dead = a == 0
            assert (gk.cpu()[dead] == 0).all(), f"d{name} must be 0 where {name} == 0"
            gr = torch.where(dead, 0.0, gr)
        _check(gk, gr, dtype, f"d{name}")


def _check_launchers(args, dy, y_ref, g_ref, block_sizes) -> None:
    """The forward and backward launchers on (possibly poisoned) fp32 inputs against the
    reference's output and gradients (mask gradients 0 where the mask is 0)."""
    x, w, b, m_in, m_out = [t.to(DEVICE) for t in args]
    y = masked_linear_forward(x, w, b, m_in, m_out, block_sizes=block_sizes)
    grads = masked_linear_backward(dy.to(DEVICE), x, w, b, m_in, m_out, block_sizes=block_sizes)
    _check(y, y_ref, torch.float32, "y")
    for name, got, ref, a in zip(("dx", "dW", "db", "dm_in", "dm_out"), grads, g_ref, args, strict=True):
        if name.startswith("dm_"):
            assert got.shape == a.shape, name
            ref = torch.where(a == 0, 0.0, ref)
        _check(got, ref, torch.float32, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (6, 42, 123), (33, 65, 17), (64, 128, 96)])
def test_forward_and_every_gradient_match_float64(M, K, N, dtype):
    g = torch.Generator().manual_seed(M * 1000 + K * 10 + N)
    args, dy = _inputs((M,), K, N, g, dtype)
    _compare_all(args, dy, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_three_dimensional_input(dtype):
    g = torch.Generator().manual_seed(3)
    args, dy = _inputs((3, 11), 70, 40, g, dtype)
    _compare_all(args, dy, dtype)


@pytest.mark.parametrize(
    "bias,m_in,m_out",
    [(False, True, True), (True, False, True), (True, True, False), (False, False, False)],
    ids=["no_bias", "no_m_in", "no_m_out", "plain"],
)
def test_each_optional_input_absent(bias, m_in, m_out):
    g = torch.Generator().manual_seed(7)
    args, dy = _inputs((33,), 65, 47, g, torch.float32, bias=bias, m_in=m_in, m_out=m_out)
    _compare_all(args, dy, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,head_dim", [(5, 12), (3, 32)])
def test_per_head_input_mask_matches_float64(heads, head_dim, dtype):
    """o_proj's head mask: one m_in entry per head of head_dim columns; dm_in comes out per head."""
    g = torch.Generator().manual_seed(heads * 100 + head_dim)
    args, dy = _inputs((33,), heads * head_dim, 47, g, dtype)
    m = torch.rand(heads, generator=g) * 0.95 + 0.05
    m[1] = 0.0
    args[3] = m
    _compare_all(args, dy, dtype)


def test_per_head_input_mask_skips_dead_heads():
    """Heads whose mask is 0 cover whole K-blocks here: NaN poison in them is never loaded."""
    g = torch.Generator().manual_seed(29)
    heads, head_dim, M, N, blk = 4, 16, 20, 40, (16, 16, 16)
    args, dy = _inputs((M,), heads * head_dim, N, g, torch.float32)
    x, w, b, _, m_out = args
    m_in = torch.tensor([0.7, 0.0, 0.0, 0.4])
    y_ref, g_ref = _reference([x, w, b, m_in, m_out], dy)
    xp, wp = x.clone(), w.clone()
    xp[:, 16:48] = float("nan")
    wp[:, 16:48] = float("nan")
    _check_launchers([xp, wp, b, m_in, m_out], dy, y_ref, g_ref, blk)


def test_input_mask_must_divide_the_features():
    x, w = torch.randn(3, 10), torch.randn(4, 10)
    with pytest.raises(ValueError, match="m_in"):
        masked_linear_forward(x.to(DEVICE), w.to(DEVICE), m_in=torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="m_in"):
        masked_linear(x, w, m_in=torch.ones(3))


def test_fully_zero_output_mask_gives_exact_zeros():
    g = torch.Generator().manual_seed(11)
    args, dy = _inputs((9,), 40, 50, g, torch.float32)
    args[4] = torch.zeros(50)
    _compare_all(args, dy, torch.float32)  # every reference tensor but dx's... is zero: exact zeros
    y, grads = _kernel(args, dy)
    assert (y == 0).all() and (grads[0] == 0).all() and (grads[1] == 0).all() and (grads[2] == 0).all()


def test_skipped_blocks_are_never_loaded():
    """Whole dead blocks are skipped: NaN poison inside them never reaches any result.

    The reference (on the same tensors with the poison replaced by zeros) is what the masked
    layer computes; a kernel that loaded a dead block would turn NaN * 0 into NaN.
    """
    g = torch.Generator().manual_seed(5)
    M, K, N, blk = 20, 64, 80, (16, 16, 16)
    args, dy = _inputs((M,), K, N, g, torch.float32)
    x, w, b, m_in, m_out = args
    m_in[16:48] = 0.0  # K-blocks 1 and 2 dead
    m_out[32:64] = 0.0  # N-blocks 2 and 3 dead
    y_ref, g_ref = _reference(args, dy)
    xp, wp, dyp = x.clone(), w.clone(), dy.clone()
    xp[:, 16:48] = float("nan")
    wp[:, 16:48] = float("nan")
    wp[32:64, :] = float("nan")
    dyp[:, 32:64] = float("nan")
    _check_launchers([xp, wp, b, m_in, m_out], dyp, y_ref, g_ref, blk)


def test_support_masks_skip_and_zero_without_scaling():
    """scale_in / scale_out = False (the fused MLP's use): masks act as the indicator m != 0.

    Checked against the reference run with the indicator masks, with NaN poison in the dead
    blocks (skipped: never loaded) and mixed blocks (zeroed by the indicator).
    """
    g = torch.Generator().manual_seed(53)
    M, K, N, blk = 20, 64, 48, (16, 16, 16)
    args, dy = _inputs((M,), K, N, g, torch.float32)
    x, w, b, m_in, m_out = args
    m_in[16:32] = 0.0
    m_out[32:48] = 0.0
    ind = [x, w, b, (m_in != 0).float(), (m_out != 0).float()]
    y_ref, g_ref = _reference(ind, dy)
    xp = x.clone()
    xp[:, m_in == 0] = float("nan")  # dead and mixed K-blocks of the input
    dev = [t.to(DEVICE) for t in (xp, w, b, m_in, m_out)]
    kw = dict(scale_in=False, scale_out=False, block_sizes=blk)
    y = masked_linear_forward(*dev, **kw)
    _check(y, y_ref, torch.float32, "y")
    dx = masked_linear_backward_input(dy.to(DEVICE), dev[1], dev[3], dev[4], **kw)
    _check(dx, g_ref[0], torch.float32, "dx")
    dw, db, dmi, dmo = masked_linear_backward_weight(dy.to(DEVICE), x.to(DEVICE), *dev[1:], **kw)
    assert dmi is None and dmo is None  # support masks have no gradient
    _check(dw, g_ref[1], torch.float32, "dW")
    _check(db, g_ref[2], torch.float32, "db")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_output_element_is_written(monkeypatch, dtype):
    """Poisoned allocations (outputs, partial buffers) and a poisoned out=: no NaN survives."""
    poison_allocations(monkeypatch, ml)
    g = torch.Generator().manual_seed(13)
    args, dy = _inputs((37,), 70, 50, g, dtype)
    _compare_all(args, dy, dtype)
    out = torch.full((37, 50), float("nan"), dtype=dtype, device=DEVICE)
    dev = [a.to(DEVICE) for a in args]
    y = masked_linear_forward(*dev, out=out)
    assert y is out
    y_ref, _ = _reference(args, dy)
    _check(out, y_ref, dtype, "out=")


def test_mask_gradients_are_deterministic():
    g = torch.Generator().manual_seed(17)
    args, dy = _inputs((40,), 96, 70, g, torch.float32)
    dev = [a.to(DEVICE) for a in args]
    first = masked_linear_backward(dy.to(DEVICE), *dev)
    second = masked_linear_backward(dy.to(DEVICE), *dev)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_module_is_a_drop_in_linear(monkeypatch):
    monkeypatch.setenv("SHEAR_KERNELS", "triton")  # the layer dispatches per call
    calls = []
    real = ml.MaskedLinearFunction.apply
    monkeypatch.setattr(ml.MaskedLinearFunction, "apply", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(19)
    ref = torch.nn.Linear(24, 18)
    layer = ShearMaskedLinear(24, 18).to(DEVICE)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 24, generator=g)
    # No masks: plain F.linear (fp32 accumulation; bound as in TOL).
    torch.testing.assert_close(
        layer(x.to(DEVICE)).cpu(), F.linear(x, ref.weight, ref.bias), rtol=2e-5, atol=2e-5
    )
    m_in, m_out = _mask(24, g), _mask(18, g)
    expect = masked_linear(x, ref.weight, ref.bias, m_in, m_out)
    got = layer(x.to(DEVICE), m_in=m_in.to(DEVICE), m_out=m_out.to(DEVICE))
    torch.testing.assert_close(got.detach().cpu(), expect.detach(), rtol=2e-5, atol=2e-5)
    assert len(calls) == 2
