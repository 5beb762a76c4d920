"""The fused masked SwiGLU MLP against the float64 reference (shear.ops.masked_swiglu_mlp).

Runs the real Triton kernels: on a GPU when there is one, else in the interpreter on CPU
(tests/conftest.py sets TRITON_INTERPRET=1 before shear.kernels is imported).
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import check_close, mask_with_zeros, poison_allocations
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

import shear.kernels.masked_linear as ml
import shear.kernels.masked_mlp as mm
from shear.kernels.masked_mlp import (
    ShearMaskedSwiGLUMLP,
    masked_swiglu_mlp_backward,
    masked_swiglu_mlp_forward,
    shear_masked_swiglu_mlp,
)
from shear.masked_modules import masked_class
from shear.ops import masked_swiglu_mlp

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = (
    "x",
    "gate_weight",
    "up_weight",
    "down_weight",
    "m_int",
    "m_out",
    "gate_bias",
    "up_bias",
    "down_bias",
)

# Error bounds, relative to the largest magnitude of the reference tensor (max) and to its
# norm (rms). fp32: fp32 accumulation over <= 128 terms, two GEMMs deep, gives ~1e-6; 2e-5
# leaves room for a GPU's summation order (TF32 stays off unless torch allows it). fp16 and
# bf16: besides the operands, the intermediates a, b, h, dh, da, g are stored in the low
# precision (as in any fused MLP), about six roundings on the longest path (dx). fp16 measures
# below torch's own fp16 error (5e-4 rms). bf16: the interpreter's fp32 -> bf16 casts truncate
# (biased, measured -0.2% mean), giving 1.9e-2 rms on dx against 0.6e-2 for torch's
# round-to-nearest; a GPU rounds to nearest.
TOL = {
    torch.float32: dict(max=2e-5, rms=1e-5),
    torch.float16: dict(max=4e-3, rms=2e-3),
    torch.bfloat16: dict(max=6e-2, rms=3e-2),
}


def _check(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    check_close(actual, expected, TOL[dtype], f"{what} ({dtype})")


def _mask(n: int, g: torch.Generator, zero_block: tuple[int, int] | None = (32, 64)) -> torch.Tensor:
    return mask_with_zeros(n, g, every=4, start=1, zero_block=zero_block)


def _inputs(lead, D, inter, g, dtype, bias=True, m_int=True, m_out=True):
    """Low-precision inputs in the reference's argument order (masks stay fp32) and a dy."""
    x = torch.randn(*lead, D, generator=g).to(dtype)
    wg = (torch.randn(inter, D, generator=g) / D**0.5).to(dtype)
    wu = (torch.randn(inter, D, generator=g) / D**0.5).to(dtype)
    wd = (torch.randn(D, inter, generator=g) / inter**0.5).to(dtype)
    mi = _mask(inter, g) if m_int else None
    mo = _mask(D, g) if m_out else None
    biases = [(torch.randn(n, generator=g) * 0.5).to(dtype) if bias else None for n in (inter, inter, D)]
    dy = torch.randn(*lead, D, generator=g).to(dtype)
    return [x, wg, wu, wd, mi, mo, *biases], dy


def _reference(args, dy):
    leaves = [a.detach().double().requires_grad_(True) if a is not None else None for a in args]
    y = masked_swiglu_mlp(*leaves)
    y.backward(dy.double())
    return y.detach(), [lf.grad if lf is not None else None for lf in leaves]


def _kernel(args, dy):
    leaves = [a.detach().clone().to(DEVICE).requires_grad_(True) if a is not None else None for a in args]
    y = shear_masked_swiglu_mlp(*leaves)
    y.backward(dy.to(DEVICE))
    return y.detach(), [lf.grad if lf is not None else None for lf in leaves]


def _compare_all(args, dy, dtype):
    y_ref, g_ref = _reference(args, dy)
    y, grads = _kernel(args, dy)
    assert y.dtype == dtype
    _check(y, y_ref, dtype, "out")
    for name, a, gk, gr in zip(NAMES, args, grads, g_ref, strict=True):
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


@pytest.mark.parametrize("lead", [(1, 1), (2, 5), (3, 33)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("D,inter", [(7, 13), (48, 84), (64, 128)])
def test_forward_and_every_gradient_match_float64(D, inter, lead):
    g = torch.Generator().manual_seed(D * 1000 + inter + lead[1])
    args, dy = _inputs(lead, D, inter, g, torch.float32)
    _compare_all(args, dy, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D,inter,lead", [(7, 13, (2, 5)), (64, 128, (3, 33))])
def test_half_precision_matches_float64(D, inter, lead, dtype):
    g = torch.Generator().manual_seed(inter)
    args, dy = _inputs(lead, D, inter, g, dtype)
    _compare_all(args, dy, dtype)


@pytest.mark.parametrize(
    "bias,m_int,m_out",
    [(False, True, True), (True, False, True), (True, True, False), (False, False, False)],
    ids=["no_bias", "no_m_int", "no_m_out", "plain"],
)
def test_each_optional_input_absent(bias, m_int, m_out):
    g = torch.Generator().manual_seed(23)
    args, dy = _inputs((2, 9), 40, 70, g, torch.float32, bias=bias, m_int=m_int, m_out=m_out)
    _compare_all(args, dy, torch.float32)


def test_fully_zero_intermediate_mask():
    g = torch.Generator().manual_seed(29)
    args, dy = _inputs((2, 5), 24, 40, g, torch.float32)
    args[4] = torch.zeros(40)
    _compare_all(args, dy, torch.float32)


def test_skipped_channels_are_never_loaded():
    """Dead intermediate blocks are skipped everywhere: NaN poison in their weights never shows.

    The reference runs on the same weights with the poison replaced by zeros (what the masked
    MLP computes); a kernel that loaded a dead block would turn NaN * 0 into NaN.
    """
    g = torch.Generator().manual_seed(31)
    blk = (16, 16, 16)
    args, dy = _inputs((20,), 32, 64, g, torch.float32)
    x, wg, wu, wd, m_int, m_out, bg, bu, bd = args
    m_int[16:48] = 0.0  # intermediate blocks 1 and 2 dead
    y_ref, g_ref = _reference(args, dy)
    wgp, wup, wdp = wg.clone(), wu.clone(), wd.clone()
    wgp[16:48] = float("nan")
    wup[16:48] = float("nan")
    wdp[:, 16:48] = float("nan")
    dev = [t.to(DEVICE) for t in (x, wgp, wup, wdp, m_int, m_out, bg, bu, bd)]
    out, a, b = masked_swiglu_mlp_forward(*dev, block_sizes=blk)
    # Kernel 1 skipped the dead tiles: b is exactly 0 there and a holds only the bias.
    assert (b[:, 16:48] == 0).all() and torch.isfinite(a).all()
    # The backward must not read a or b in dead blocks either: poison them.
    a[:, 16:48] = float("nan")
    b[:, 16:48] = float("nan")
    grads = masked_swiglu_mlp_backward(dy.to(DEVICE), *dev, a, b, block_sizes=blk)
    _check(out, y_ref, torch.float32, "out")
    for name, got, ref, arg in zip(NAMES, grads, g_ref, args, strict=True):
        if name.startswith("m_"):
            ref = torch.where(arg == 0, 0.0, ref)
        _check(got, ref, torch.float32, f"d{name}")
    # The elementwise kernel writes zeros in dead blocks without reading dh, a or b there
    # (downstream GEMMs would also skip them, so check its outputs directly).
    dh = torch.randn(20, 64, generator=g).to(DEVICE)
    dh[:, 16:48] = float("nan")
    h, da, gu = mm._swiglu_backward(dh, a, b, m_int.to(DEVICE), block_sizes=blk[:2])
    for t in (h, da, gu):
        assert (t[:, 16:48] == 0).all() and torch.isfinite(t).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_output_element_is_written(monkeypatch, dtype):
    """Poisoned allocations (h, a, b, dh, da, g, outputs, partial buffers): no NaN survives."""
    poison_allocations(monkeypatch, ml, mm)
    g = torch.Generator().manual_seed(37)
    args, dy = _inputs((3, 11), 40, 70, g, dtype)
    _compare_all(args, dy, dtype)
    with torch.no_grad():  # the inference path (no a, b stored)
        y = shear_masked_swiglu_mlp(*[a.to(DEVICE) if a is not None else None for a in args])
    _check(y, _reference(args, dy)[0], dtype, "out (no_grad)")


@pytest.mark.parametrize("mlp_bias", [False, True])
def test_reference_is_llama_mlp_with_masks_where_shear_puts_them(mlp_bias):
    cfg = LlamaConfig(
        hidden_size=48, intermediate_size=84, num_attention_heads=6, mlp_bias=mlp_bias, hidden_act="silu"
    )
    torch.manual_seed(41)
    mlp = LlamaMLP(cfg).eval()
    x = torch.randn(2, 5, 48)
    p = {n: getattr(mlp, f"{n}_proj") for n in ("gate", "up", "down")}
    args = [p["gate"].weight, p["up"].weight, p["down"].weight]
    biases = dict(gate_bias=p["gate"].bias, up_bias=p["up"].bias, down_bias=p["down"].bias)
    with torch.no_grad():
        # No masks: Hugging Face's module itself (fp32, same ops in the same order).
        torch.testing.assert_close(masked_swiglu_mlp(x, *args, **biases), mlp(x), rtol=1e-6, atol=1e-6)
        # Masks where shear's masked modules apply them: up_proj's output, down_proj's output.
        g = torch.Generator().manual_seed(43)
        m_int, m_out = _mask(84, g), _mask(48, g)
        hooks = [
            p["up"].register_forward_hook(lambda mod, inp, out: out * m_int),
            p["down"].register_forward_hook(lambda mod, inp, out: out * m_out),
        ]
        expect = mlp(x)
        for h in hooks:
            h.remove()
        got = masked_swiglu_mlp(x, *args, m_int, m_out, **biases)
        torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mlp_bias", [False, True])
def test_layer_standalone_and_installed_in_a_llama_mlp(mlp_bias, monkeypatch):
    """The layer built on its own, and installed in place on Hugging Face's LlamaMLP (what
    shear.patch does), run the kernels and compute the MLP."""
    monkeypatch.setenv("SHEAR_KERNELS", "triton")
    calls = []
    monkeypatch.setattr(mm, "MaskedSwiGLUMLPFunction", _Counting(mm.MaskedSwiGLUMLPFunction, calls))
    cfg = LlamaConfig(
        hidden_size=48, intermediate_size=84, num_attention_heads=6, mlp_bias=mlp_bias, hidden_act="silu"
    )
    torch.manual_seed(47)
    mlp = LlamaMLP(cfg).train()
    x = torch.randn(2, 5, 48)
    expect = mlp(x).detach()
    fused = ShearMaskedSwiGLUMLP(48, 84, bias=mlp_bias)
    fused.load_state_dict(mlp.state_dict())
    mlp.__class__ = masked_class(LlamaMLP, ShearMaskedSwiGLUMLP)
    assert isinstance(mlp, LlamaMLP) and isinstance(mlp, ShearMaskedSwiGLUMLP)
    for module in (fused.to(DEVICE), mlp.to(DEVICE)):
        # fp32 kernels vs fp32 PyTorch: bound as in TOL.
        torch.testing.assert_close(module(x.to(DEVICE)).detach().cpu(), expect, rtol=2e-5, atol=2e-5)
    assert len(calls) == 2


class _Counting:
    """Stands in for an autograd Function class: counts ``apply`` calls."""

    def __init__(self, fn, calls: list):
        self.fn, self.calls = fn, calls

    def apply(self, *args):
        self.calls.append(1)
        return self.fn.apply(*args)
