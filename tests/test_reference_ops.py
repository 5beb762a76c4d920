"""The plain-PyTorch mask ops (the kernels' oracle) against independent float64 formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shear.ops import linear_kl, linear_kl_eager, masked_linear, masked_rms_norm


def _rand(*shape, g, dtype=torch.float64):
    return torch.randn(*shape, generator=g, dtype=dtype)


@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (6, 42, 123), (16, 64, 32)])
def test_masked_linear_forward_and_all_gradients(M, K, N):
    g = torch.Generator().manual_seed(M * K + N)
    x, w, b = _rand(M, K, g=g), _rand(N, K, g=g), _rand(N, g=g)
    m_in, m_out = (
        torch.rand(K, generator=g, dtype=torch.float64),
        torch.rand(N, generator=g, dtype=torch.float64),
    )
    m_in[::3] = 0.0  # exact zeros, as the clamp produces
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b, m_in, m_out)]
    y = masked_linear(*leaves)
    expect = torch.einsum("mk,nk->mn", x * m_in, w) + b
    expect = expect * m_out
    torch.testing.assert_close(y, expect, rtol=1e-12, atol=1e-12)
    # closed-form gradients (anchors.md: the masked matmul algebra), with H = dy^T x
    dy = _rand(M, N, g=g)
    y.backward(dy)
    dyo = dy * m_out
    H = dyo.T @ x
    torch.testing.assert_close(leaves[0].grad, (dyo @ w) * m_in)
    torch.testing.assert_close(leaves[1].grad, m_in[None, :] * H)
    torch.testing.assert_close(leaves[2].grad, dyo.sum(0))
    torch.testing.assert_close(leaves[3].grad, (w * H).sum(0))
    torch.testing.assert_close(leaves[4].grad, (dy * (torch.einsum("mk,nk->mn", x * m_in, w) + b)).sum(0))


def test_masked_linear_keeps_the_input_dtype():
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    w = torch.randn(5, 8, dtype=torch.bfloat16)
    y = masked_linear(x, w, None, torch.rand(8), torch.rand(5))
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("d", [1, 7, 576])
def test_masked_rms_norm_matches_the_index_select_form(d):
    g = torch.Generator().manual_seed(d)
    x, w = _rand(2, 5, d, g=g), _rand(d, g=g)
    z = torch.rand(d, generator=g, dtype=torch.float64)
    z[torch.randperm(d, generator=g)[: d // 3]] = 0.0
    eps = 1e-5
    kept = torch.nonzero(z).flatten()
    # the original code's way: statistics on the kept columns only
    xs = x.index_select(-1, kept)
    rms = torch.sqrt(xs.pow(2).mean(-1, keepdim=True) + eps)
    expect = x / rms * w * z
    torch.testing.assert_close(masked_rms_norm(x, w, z, eps), expect, rtol=1e-12, atol=1e-12)


def test_masked_rms_norm_gradients_and_plain_case():
    g = torch.Generator().manual_seed(0)
    d = 11
    x, w, z = _rand(3, d, g=g), _rand(d, g=g), torch.rand(d, generator=g, dtype=torch.float64) + 0.1

    def f(x_, w_, z_):
        return masked_rms_norm(x_, w_, z_, 1e-6)

    # away from exact zeros the kept set is locally constant: a smooth function
    assert torch.autograd.gradcheck(f, tuple(t.clone().requires_grad_(True) for t in (x, w, z)))
    # at an exact zero (from the clamp, whose own gradient is 0) the unit is out of the
    # statistics: no gradient to its input, and dz is the plain product-rule term
    z[4] = 0.0
    leaves = [t.clone().requires_grad_(True) for t in (x, w, z)]
    dy = _rand(3, d, g=g)
    f(*leaves).backward(dy)
    assert torch.all(leaves[0].grad[:, 4] == 0) and leaves[1].grad[4] == 0
    kept = torch.nonzero(z).flatten()
    normed = x / torch.sqrt(x.index_select(-1, kept).pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(leaves[2].grad[4], (dy[:, 4] * normed[:, 4] * w[4]).sum())
    # without a mask it is Hugging Face's LlamaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(d, eps=1e-6)  # computes in float32 whatever the input: compare there
    with torch.no_grad():
        norm.weight.copy_(w)
    x32 = x.float()
    torch.testing.assert_close(masked_rms_norm(x32, norm.weight, None, 1e-6), norm(x32), rtol=0, atol=0)


@pytest.mark.parametrize("chunk", [1, 2, 5, None])
@pytest.mark.parametrize("kl_weight,temperature", [(0.0, 1.0), (1.0, 2.0), (0.4, 0.6)])
def test_linear_kl_chunked_matches_the_formula(chunk, kl_weight, temperature):
    n, d_s, d_t, vocab = 5, 4, 7, 11
    g = torch.Generator().manual_seed(n * (chunk or 9))
    h_s, w_s = _rand(n, d_s, g=g), _rand(vocab, d_s, g=g)
    h_t, w_t = _rand(n, d_t, g=g), _rand(vocab, d_t, g=g)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[2] = -100
    # independent formula: explicit softmaxes, mean over the kept tokens
    s, t = h_s @ w_s.T, h_t @ w_t.T
    keep = labels != -100
    ce = s.logsumexp(-1) - s.gather(1, labels.clamp_min(0)[:, None])[:, 0]
    q = torch.softmax(s / temperature, -1)
    p = torch.softmax(t / temperature, -1)
    kl = (p * (p.log() - q.log())).sum(-1)
    expect = ((1 - kl_weight) * ce + kl_weight * temperature**2 * kl)[keep].mean()
    for fn, kw in ((linear_kl, dict(chunk_size=chunk)), (linear_kl_eager, {})):
        hs, ws = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
        loss = fn(hs, ws, h_t, w_t, labels, temperature, kl_weight, **kw)
        torch.testing.assert_close(loss, expect, rtol=1e-12, atol=1e-12)
        loss.backward()
        # dloss/ds = (1 - a) (softmax(s) - onehot) + a T (q - p), per kept token / count
        gs = (1 - kl_weight) * (torch.softmax(s, -1) - F.one_hot(labels.clamp_min(0), vocab)) + (
            kl_weight * temperature * (q - p)
        )
        gs = gs * keep[:, None] / keep.sum()
        torch.testing.assert_close(hs.grad, gs @ w_s, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ws.grad, gs.T @ h_s, rtol=1e-10, atol=1e-12)
