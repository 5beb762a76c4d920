"""Causal GQA flash attention with head skipping: kernels against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import poison_allocations
from torch import nn
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

import shear.kernels.heuristics as heuristics
import shear.kernels.masked_attention as ma
from shear.kernels.heuristics import AttentionBlocks, attention_config
from shear.kernels.masked_attention import (
    attention_backward,
    attention_forward,
    shear_attention_interface,
    shear_causal_attention,
)
from shear.ops import causal_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(B, H, G, S, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # q as Hugging Face hands it over: a transposed view of [B, S, H, D] (non-contiguous).
    q = torch.randn(B, S, H, D, generator=g, dtype=torch.float64).transpose(1, 2)
    k = torch.randn(B, G, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, G, S, D, generator=g, dtype=torch.float64)
    do = torch.randn(B, S, H, D, generator=g, dtype=torch.float64)
    return [t.to(DEVICE, dtype) for t in (q, k, v, do)]


def _fwd_bwd(fn, q, k, v, do, scaling, head_mask):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves, scaling, head_mask)
    dq, dk, dv = torch.autograd.grad(out, leaves, do)
    return out.detach(), dq, dk, dv


def _head_mask(H, G, kind, seed):
    if kind == "none":
        return None
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(H, generator=g, dtype=torch.float32) + 0.05
    if kind == "zeros":
        # Exact zeros as the hard-concrete clamp makes them; with G > 1 also a whole KV
        # group (its dk / dv must then be exactly 0).
        m[1] = 0.0
        if G > 1 and H // G > 1:
            n = H // G
            m[(G - 1) * n : G * n] = 0.0
    elif kind == "all_zero":
        m.zero_()
    return m.to(DEVICE)


def test_reference_matches_transformers_eager_and_sdpa():
    B, H, G, S, D = 2, 6, 2, 13, 16
    q, k, v, _ = _inputs(B, H, G, S, D, torch.float64, seed=0)
    module = nn.Module()
    module.num_key_value_groups = H // G
    module.is_causal = True
    causal = torch.full((S, S), float("-inf"), dtype=torch.float64, device=DEVICE).triu(1)
    eager, _ = eager_attention_forward(module, q, k, v, causal[None, None], scaling=D**-0.5)
    ours = causal_attention(q, k, v, D**-0.5)
    # eager's softmax runs in float32 even for float64 inputs: float32-level agreement.
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-6)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(H // G, 1), v.repeat_interleave(H // G, 1), is_causal=True, scale=D**-0.5
    )
    torch.testing.assert_close(ours, sdpa.transpose(1, 2), rtol=1e-12, atol=1e-12)
    # The skip contract: masked heads are zeros, the others untouched (not scaled).
    hm = torch.tensor([0.5, 0.0, 1.0, 0.0, 0.25, 2.0], dtype=torch.float64, device=DEVICE)
    masked = causal_attention(q, k, v, D**-0.5, hm)
    assert (masked[:, :, hm == 0] == 0).all()
    torch.testing.assert_close(masked[:, :, hm != 0], ours[:, :, hm != 0], rtol=0, atol=0)


# (B, H, G, S, D): MHA 4/4 and GQA 6/2, 9/3; S across block boundaries (blocks of 16 under
# the interpreter): 1, 7, 33 (partial last block), 64 (exact); D = 16 and 64.
SHAPES = [
    (1, 4, 4, 1, 16),
    (2, 4, 4, 33, 16),
    (2, 6, 2, 7, 16),
    (1, 6, 2, 64, 64),
    (1, 9, 3, 33, 16),
    (2, 9, 3, 7, 64),
    (1, 9, 3, 64, 16),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask_kind", ["none", "zeros"])
def test_float64_forward_and_gradients(shape, mask_kind, monkeypatch):
    poison_allocations(monkeypatch, ma)
    B, H, G, S, D = shape
    q, k, v, do = _inputs(*shape, torch.float64, seed=sum(shape))
    hm = _head_mask(H, G, mask_kind, seed=S)
    got = _fwd_bwd(shear_causal_attention, q, k, v, do, D**-0.5, hm)
    want = _fwd_bwd(causal_attention, q, k, v, do, D**-0.5, hm)
    # float64 accumulators end to end: only the summation order (online softmax, block
    # sums) differs from the reference, ~1e-15 measured.
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    if hm is not None:
        skipped = hm == 0
        # Skipped heads: output exactly 0 (written, not left), dq exactly 0.
        assert (got[0][:, :, skipped] == 0).all()
        assert (got[1][:, skipped] == 0).all()
        n = H // G
        dead_groups = skipped.view(G, n).all(1)
        assert (got[2][:, dead_groups] == 0).all() and (got[3][:, dead_groups] == 0).all()


def test_skipped_heads_are_never_read(monkeypatch):
    poison_allocations(monkeypatch, ma)
    B, H, G, S, D = 1, 6, 2, 33, 16
    q, k, v, do = _inputs(B, H, G, S, D, torch.float64, seed=4)
    hm = _head_mask(H, G, "zeros", seed=1)
    skipped = hm == 0
    # NaN in a skipped head's queries and output gradient: a kernel that loaded them would
    # spread NaN into that head's output, into dk / dv of its group, or into dq.
    q_bad, do_bad = q.clone(), do.clone()
    q_bad[:, skipped] = float("nan")
    do_bad[:, :, skipped] = float("nan")
    q_clean = torch.where(skipped.view(1, H, 1, 1), torch.zeros_like(q), q)
    got = _fwd_bwd(shear_causal_attention, q_bad, k, v, do_bad, D**-0.5, hm)
    want = _fwd_bwd(causal_attention, q_clean, k, v, torch.nan_to_num(do_bad, nan=0.0), D**-0.5, hm)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_all_heads_skipped_and_mask_gets_no_gradient():
    B, H, G, S, D = 2, 6, 2, 7, 16
    q, k, v, do = _inputs(B, H, G, S, D, torch.float64, seed=9)
    hm = _head_mask(H, G, "all_zero", seed=0).requires_grad_(True)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = shear_causal_attention(*leaves, D**-0.5, hm)
    out.backward(do)
    assert (out == 0).all()
    for t in leaves:
        assert (t.grad == 0).all()
    # The head mask is only a skip indicator here (its gradient flows through o_proj), as
    # in the reference, where it enters through a non-differentiable `!= 0`.
    assert hm.grad is None
    hm_ref = hm.detach().clone().requires_grad_(True)
    causal_attention(*[t.detach().requires_grad_(True) for t in (q, k, v)], D**-0.5, hm_ref).sum().backward()
    assert hm_ref.grad is None


# Tolerances: relative RMS error ||kernel - ref|| / ||ref|| against the float64 reference on
# the same (rounded) inputs, for out, dq, dk, dv; the right measure for low precision (fla
# uses ~5e-3). Sources of error: fp32 accumulation only (fp32, IEEE dots); P and dS rounded
# to fp16 / bf16 before the second GEMM (as every flash attention does) and the outputs
# rounded on store. Measured on these shapes: fp32 <= 3e-7, fp16 <= 4e-4, bf16 <= 5e-3, each
# about what PyTorch's own eager attention in that dtype shows against float64.
LOW_PRECISION = [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.5e-2)]


@pytest.mark.parametrize("dtype,tol", LOW_PRECISION)
@pytest.mark.parametrize("shape", [(2, 6, 2, 33, 16), (1, 9, 3, 7, 64)])
def test_low_precision_against_float64(dtype, tol, shape):
    B, H, G, S, D = shape
    q, k, v, do = _inputs(*shape, dtype, seed=S * D)
    hm = _head_mask(H, G, "zeros", seed=2)
    got = _fwd_bwd(shear_causal_attention, q, k, v, do, D**-0.5, hm)
    want = _fwd_bwd(causal_attention, *[t.double() for t in (q, k, v, do)], D**-0.5, hm)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert a.dtype == dtype
        err = ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()
        assert err < tol, f"{name}: relative RMS error {err:.2e} >= {tol:.0e}"
    assert (got[0][:, :, hm == 0] == 0).all() and (got[1][:, hm == 0] == 0).all()


def test_launchers_fill_poisoned_outputs_in_any_input_layout(monkeypatch):
    """q, k, v in Hugging Face's layout are read in place, others are copied into it; every
    output element is written either way (allocations poisoned)."""
    poison_allocations(monkeypatch, ma)
    B, H, G, S, D = 2, 6, 2, 33, 16
    q, k, v, do = _inputs(B, H, G, S, D, torch.float32, seed=5)
    hm = _head_mask(H, G, "zeros", seed=3)
    k_hf = k.transpose(1, 2).contiguous().transpose(1, 2)  # a view of [B, S, G, D] memory
    assert ma._bshd(q) is q and ma._bshd(k_hf) is k_hf and ma._bshd(k) is not k
    want = _fwd_bwd(causal_attention, *[t.double() for t in (q, k, v, do)], D**-0.5, hm)
    for kk in (k, k_hf):
        out, lse = attention_forward(q, kk, v, D**-0.5, hm)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()
        dq, dk, dv = attention_backward(do, q, kk, v, out, lse, D**-0.5, hm)
        for got, ref in zip((out, dq, dk, dv), want, strict=True):
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 6, 2, 33, 24), (2, 4, 4, 64, 16)])
def test_unequal_block_sizes_as_on_a_gpu(shape, monkeypatch):
    # GPU configs use BLOCK_M != BLOCK_N (e.g. 128 x 64 forward, 32 x 128 dK/dV); the
    # interpreter default is 16 everywhere, so force unequal blocks here to check the split
    # between unmasked and diagonal blocks. D = 24 also pads BLOCK_D to 32.
    real = ma.attention_config

    def unequal(head_dim, dtype, seq_len):
        cfg = real(head_dim, dtype, seq_len)
        return cfg._replace(
            fwd=AttentionBlocks(32, 16, 4, 1),
            dkdv=AttentionBlocks(16, 32, 4, 1),
            dq=AttentionBlocks(32, 16, 4, 1),
        )

    monkeypatch.setattr(ma, "attention_config", unequal)
    poison_allocations(monkeypatch, ma)
    B, H, G, S, D = shape
    q, k, v, do = _inputs(*shape, torch.float64, seed=S + D)
    hm = _head_mask(H, G, "zeros", seed=5)
    got = _fwd_bwd(shear_causal_attention, q, k, v, do, D**-0.5, hm)
    want = _fwd_bwd(causal_attention, q, k, v, do, D**-0.5, hm)
    # float64 end to end, as in test_float64_forward_and_gradients.
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_block_size_heuristic_keeps_the_causal_split_valid(monkeypatch):
    monkeypatch.setattr(heuristics, "interpreter_active", lambda: False)
    for D in (16, 64, 80, 128, 256):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for S in (1, 7, 100, 4096):
                cfg = attention_config(D, dtype, S)
                assert cfg.block_d >= max(16, D)
                (fm, fn, *_), (km, kn, *_), (qm, qn, *_) = cfg.fwd, cfg.dkdv, cfg.dq
                assert fm % fn == 0 and qm % qn == 0 and kn % km == 0
                assert min(fm, fn, km, kn, qm, qn) >= 16


# ---- the transformers attention interface -------------------------------------------------


class _Attn(nn.Module):
    def __init__(self, head_mask=None):
        super().__init__()
        self.is_causal = True
        self.shear_head_mask = head_mask


def test_interface_reads_the_module_head_mask_and_masks():
    B, H, G, S, D = 2, 6, 2, 7, 16
    q, k, v, _ = _inputs(B, H, G, S, D, torch.float32, seed=6)
    hm = _head_mask(H, G, "zeros", seed=4)
    module = _Attn(hm).eval()
    want = causal_attention(q.double(), k.double(), v.double(), D**-0.5, hm)
    # fp32 kernel against the float64 reference: fp32 accumulation, ~1e-7 measured.
    out, weights = shear_attention_interface(module, q, k, v, None)
    assert weights is None and out.shape == (B, S, H, D)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    # A materialised purely causal mask (eager's additive or sdpa's boolean) is accepted.
    for make in (eager_mask, sdpa_mask):
        cm = make(
            batch_size=B, q_length=S, kv_length=S, allow_is_causal_skip=False, dtype=q.dtype, device=DEVICE
        )
        out2, _ = shear_attention_interface(module, q, k, v, cm, scaling=D**-0.5)
        torch.testing.assert_close(out2, out, rtol=0, atol=0)


def test_interface_refuses_what_the_kernel_does_not_compute():
    B, H, G, S, D = 1, 4, 2, 5, 16
    q, k, v, _ = _inputs(B, H, G, S, D, torch.float32, seed=7)
    module = _Attn()
    padding = torch.ones(B, S, dtype=torch.bool, device=DEVICE)
    padding[0, 0] = False
    for make in (eager_mask, sdpa_mask):
        pm = make(
            batch_size=B,
            q_length=S,
            kv_length=S,
            attention_mask=padding,
            allow_is_causal_skip=False,
            dtype=q.dtype,
            device=DEVICE,
        )
        with pytest.raises(ValueError, match="not purely causal"):
            shear_attention_interface(module, q, k, v, pm)
    with pytest.raises(ValueError, match="not a .B, 1, S, S. causal mask"):
        shear_attention_interface(module, q, k, v, padding)
    module.train()
    with pytest.raises(ValueError, match="dropout"):
        shear_attention_interface(module, q, k, v, None, dropout=0.1)
    module.eval()
    shear_attention_interface(module, q, k, v, None, dropout=0.1)  # eval: dropout is a no-op
    with pytest.raises(ValueError, match="KV cache"):
        shear_attention_interface(module, q[:, :, :1], k, v, None)
    with pytest.raises(ValueError, match="non-causal"):
        shear_attention_interface(module, q, k, v, None, is_causal=False)
    with pytest.raises(ValueError, match="sliding window"):
        shear_attention_interface(module, q, k, v, None, sliding_window=3)


@pytest.fixture
def registered_interface():
    name = "shear_test_masked_attention"
    AttentionInterface.register(name, shear_attention_interface)
    # The mask function decides what the attention function receives: sdpa's returns None
    # for a purely causal mask, which the kernel takes without reading any mask.
    AttentionMaskInterface.register(name, sdpa_mask)
    yield name
    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)


def test_interface_inside_llama_matches_eager(registered_interface):
    cfg = LlamaConfig(
        hidden_size=48,
        intermediate_size=84,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        vocab_size=101,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(DEVICE).eval()
    ids = torch.randint(0, 101, (2, 13), device=DEVICE)

    def logits_and_grads(impl):
        model.set_attn_implementation(impl)
        model.zero_grad()
        logits = model(ids).logits
        logits.square().mean().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    ref, ref_grads = logits_and_grads("eager")
    got, got_grads = logits_and_grads(registered_interface)
    assert model.config._attn_implementation == registered_interface
    # fp32 model both ways; eager rounds its probabilities to fp32 too: ~1e-7 measured.
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # An all-ones padding mask is still purely causal (sdpa_mask turns it into None).
    same = model(ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(same, got, rtol=0, atol=0)
