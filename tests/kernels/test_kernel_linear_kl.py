"""Fused linear-KL distillation loss against the float64 full-logits oracle."""

from __future__ import annotations

import importlib

import pytest
import torch
from kernel_checks import check_close, poison_allocations
from torch.utils._python_dispatch import TorchDispatchMode

from shear import dispatch
from shear.kernels import linear_kl as K
from shear.ops.linear_kl import linear_kl, linear_kl_eager

# the module (shear.ops re-exports its function under the same name)
reference_module = importlib.import_module("shear.ops.linear_kl")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# fp32: the kernel reduces rows of <= 101 logits in float32 against an exact float64
# oracle: errors ~1e-7 relative; 1e-5 still catches any wrong term (those are O(1e-2)).
# fp16 / bf16: the inputs are the same rounded values for both, but the kernel's logits and
# logit gradients are rounded to the input dtype (as Hugging Face's LM head rounds its
# logits) and its GEMMs accumulate in fp32 and round once: a few ulps of the 16-bit type
# relative to the largest entry (2^-11 fp16, 2^-8 bf16), more for the loss, a difference of
# log-sum-exps of rounded logits.
TOL = {
    torch.float32: dict(max=1e-5, rms=1e-5),
    torch.float16: dict(max=1e-2, rms=5e-3),
    torch.bfloat16: dict(max=6e-2, rms=3e-2),
}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every buffer the op allocates with torch.empty starts as NaN, so an unwritten row shows."""
    poison_allocations(monkeypatch, K, reference_module)


def _inputs(n, d_s, d_t, vocab, dtype, seed, ignored=(1,)):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(n, d_s, generator=g)
    w_s = torch.randn(vocab, d_s, generator=g) / d_s**0.5 * 3
    h_t = torch.randn(n, d_t, generator=g)
    w_t = torch.randn(vocab, d_t, generator=g) / d_t**0.5 * 3
    labels = torch.randint(0, vocab, (n,), generator=g)
    for i in ignored:
        if i < n:
            labels[i] = -100
    return [t.to(dtype).to(DEVICE) for t in (h_s, w_s, h_t, w_t)] + [labels.to(DEVICE)]


def _run(fn, h_s, w_s, h_t, w_t, labels, cast=None, **kw):
    """Loss and the gradients of the student's hidden states and LM head (upstream 1.5)."""
    leaves = [(t.to(cast) if cast else t).detach().requires_grad_(True) for t in (h_s, w_s, h_t, w_t)]
    loss = fn(*leaves, labels, **kw)
    (loss * 1.5).backward()
    assert leaves[2].grad is None and leaves[3].grad is None  # the teacher gets no gradient
    return loss.detach(), leaves[0].grad, leaves[1].grad


def _check(inputs, dtype, chunk_size, **kw):
    loss, dh, dw = _run(K.shear_linear_kl, *inputs, chunk_size=chunk_size, **kw)
    loss_ref, dh_ref, dw_ref = _run(linear_kl_eager, *inputs, cast=torch.float64, **kw)
    assert loss.dtype == torch.float32 and dh.dtype == dtype and dw.dtype == dtype
    check_close(loss, loss_ref, TOL[dtype], "loss")
    check_close(dh, dh_ref, TOL[dtype], "d student_hidden")
    check_close(dw, dw_ref, TOL[dtype], "d student_weight")


# (tokens, d_s, d_t, vocab): vocabularies not a multiple of the 32-wide block, one smaller
# than a block; teacher wider and narrower than the student.
SHAPES = [(3, 5, 9, 37), (7, 16, 8, 101), (4, 12, 12, 20), (5, 33, 64, 64)]


@pytest.mark.parametrize("kl_weight,temperature", [(1.0, 1.0), (0.0, 1.0), (0.3, 2.0), (1.0, 0.7)])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp32_matches_float64_oracle(shape, kl_weight, temperature):
    inputs = _inputs(*shape, torch.float32, seed=sum(shape))
    _check(inputs, torch.float32, 2, kl_weight=kl_weight, temperature=temperature)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 9, 37), (7, 16, 8, 101)], ids=str)
def test_half_precision_matches_float64_oracle(shape, dtype):
    inputs = _inputs(*shape, dtype, seed=shape[-1])
    _check(inputs, dtype, 3, kl_weight=0.5, temperature=1.5)


@pytest.mark.parametrize("chunk", [1, 4, 6, None])
def test_chunking_gives_the_same_loss(chunk):
    inputs = _inputs(6, 8, 8, 45, torch.float32, seed=chunk or 0, ignored=(0, 5))
    _check(inputs, torch.float32, chunk, kl_weight=0.7, temperature=1.3)


def test_every_label_ignored_gives_zero_loss_and_gradients():
    inputs = _inputs(3, 5, 9, 37, torch.float32, seed=3, ignored=(0, 1, 2))
    loss, dh, dw = _run(K.shear_linear_kl, *inputs, kl_weight=0.5)
    assert loss.item() == 0.0
    assert (dh == 0).all() and (dw == 0).all()


def test_cross_entropy_alone_needs_no_teacher():
    h_s, w_s, _, _, labels = _inputs(5, 8, 8, 37, torch.float32, seed=4)
    h = h_s.clone().requires_grad_(True)
    loss = K.shear_linear_kl(h, w_s, None, None, labels, kl_weight=0.0)
    loss.backward()
    expect = torch.nn.functional.cross_entropy(h_s.double() @ w_s.double().t(), labels)
    assert abs(loss.item() - expect.item()) < 1e-5 and torch.isfinite(h.grad).all()
    with pytest.raises(ValueError, match="teacher"):
        K.shear_linear_kl(h_s, w_s, None, None, labels, kl_weight=0.5)


def test_bad_inputs_are_refused():
    h_s, w_s, h_t, w_t, labels = _inputs(3, 5, 9, 37, torch.float32, seed=5)
    with pytest.raises(ValueError, match="temperature"):
        K.shear_linear_kl(h_s, w_s, h_t, w_t, labels, temperature=0.0)
    with pytest.raises(ValueError, match="kl_weight"):
        K.shear_linear_kl(h_s, w_s, h_t, w_t, labels, kl_weight=1.5)
    with pytest.raises(ValueError, match="vocabulary"):
        K.shear_linear_kl(h_s, w_s, h_t, w_t[:-1], labels)
    with pytest.raises(ValueError, match="labels"):
        K.shear_linear_kl(h_s, w_s, h_t, w_t, labels[:-1])


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor (in bytes: the interpreter copies kernel arguments as raw
    bytes) any aten op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_full_logits_are_never_allocated(monkeypatch, backend):
    monkeypatch.setenv("SHEAR_KERNELS", backend)
    # logits [12, 100]; a chunk of them [3, 100] is larger than the LM heads [100, 2]
    n, d, vocab, chunk = 12, 2, 100, 3
    h_s, w_s, h_t, w_t, labels = _inputs(n, d, d, vocab, torch.float32, seed=6)
    h = h_s.clone().requires_grad_(True)
    w = w_s.clone().requires_grad_(True)
    with _LargestAllocation() as mode:
        loss = dispatch.linear_kl(h, w, h_t, w_t, labels, 2.0, 0.5, chunk_size=chunk)
        loss.backward()
    assert mode.largest == chunk * vocab * 4, f"largest tensor {mode.largest} bytes"
    with _LargestAllocation() as eager:
        linear_kl_eager(h, w, h_t, w_t, labels, 2.0, 0.5).backward()
    assert eager.largest == n * vocab * 4  # the check sees the logits when they are there


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_autocast_computes_in_its_dtype(monkeypatch, backend):
    # what a bf16 training run does: fp32 weights and hidden states, the loss under autocast
    monkeypatch.setenv("SHEAR_KERNELS", backend)
    inputs = _inputs(5, 8, 6, 37, torch.float32, seed=8)
    h = inputs[0].clone().requires_grad_(True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = dispatch.linear_kl(h, *inputs[1:], temperature=2.0, kl_weight=0.5)
    (loss * 1.5).backward()  # as _run
    assert h.grad.dtype == torch.float32
    _, dh_ref, _ = _run(linear_kl_eager, *inputs, cast=torch.float64, temperature=2.0, kl_weight=0.5)
    check_close(h.grad, dh_ref, TOL[torch.bfloat16], "d student_hidden under autocast")


def test_module_dispatches_to_both_backends(monkeypatch):
    inputs = _inputs(5, 8, 6, 37, torch.float32, seed=7)
    layer = K.ShearLinearKL(temperature=2.0, kl_weight=0.4)
    assert "kl_weight=0.4" in repr(layer)
    monkeypatch.setenv("SHEAR_KERNELS", "triton")
    fused = layer(*inputs)
    monkeypatch.setenv("SHEAR_KERNELS", "reference")
    ref = layer(*inputs)
    plain = linear_kl(*inputs, temperature=2.0, kl_weight=0.4)
    torch.testing.assert_close(fused, ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(ref, plain)


def test_launcher_writes_every_row_into_poisoned_buffers():
    s = torch.randn(5, 37, device=DEVICE, dtype=torch.float16)
    t = torch.randn(5, 37, device=DEVICE, dtype=torch.float16)
    labels = torch.tensor([3, -100, 36, 0, 5], device=DEVICE)
    loss = torch.full((5,), float("nan"), device=DEVICE)
    count = torch.tensor([4.0], device=DEVICE)
    K.linear_kl_rows_forward(s, t, labels, count, 1.5, 0.5, -100, loss, need_grad=True)
    assert torch.isfinite(loss).all() and loss[1] == 0
    assert torch.isfinite(s).all() and (s[1] == 0).all()
