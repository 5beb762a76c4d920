"""Hard-concrete math against the reference constants and closed forms, in float64."""

from __future__ import annotations

import pytest
import torch

from shear.ops import hard_concrete as hc


def test_constants_match_reference():
    assert (hc.LIMIT_L, hc.LIMIT_R, hc.BETA, hc.EPS) == (-0.1, 1.1, 2.0 / 3.0, 1e-6)
    assert hc.LOG_ALPHA_MIN == pytest.approx(-4.60517, abs=1e-5)
    assert hc.LOG_ALPHA_MAX == pytest.approx(4.60517, abs=1e-5)
    assert hc.KEEP_SHIFT == pytest.approx(1.5986, abs=1e-4)


def test_keep_probability_published_checks():
    la = torch.tensor([4.605, 0.0, -4.605], dtype=torch.float64)
    p = hc.keep_probability(la)
    assert p.tolist() == pytest.approx([0.998, 0.832, 0.047], abs=5e-4)


def test_sample_keep_rate_matches_keep_probability():
    g = torch.Generator().manual_seed(0)
    la = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0], dtype=torch.float64)
    n = 200_000
    u = hc.uniform_noise((n, la.numel()), dtype=torch.float64, generator=g)
    z = hc.hard_concrete_sample(la.expand(n, -1), u)
    assert z.min() >= 0 and z.max() <= 1
    empirical = (z > 0).double().mean(0)
    # binomial standard error <= 0.5 / sqrt(n) ~ 1.1e-3: 5 sigma
    torch.testing.assert_close(empirical, hc.keep_probability(la), atol=6e-3, rtol=0)
    # exact zeros and ones both come from the clamp
    assert (z[:, 2] == 0).any() and (z[:, 2] == 1).any()


def test_uniform_noise_bounds():
    u = hc.uniform_noise((10_000,), dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert u.min() >= hc.EPS and u.max() <= 1 - hc.EPS


def test_sample_closed_form_and_gradcheck():
    g = torch.Generator().manual_seed(4)
    la = torch.randn(17, dtype=torch.float64, generator=g)
    u = hc.uniform_noise((17,), dtype=torch.float64, generator=g)
    s = 1 / (1 + torch.exp(-(torch.log(u / (1 - u)) + la) / hc.BETA))
    expected = (s * 1.2 - 0.1).clamp(0, 1)
    torch.testing.assert_close(hc.hard_concrete_sample(la, u), expected, rtol=1e-12, atol=1e-12)
    interior = (expected > 1e-3) & (expected < 1 - 1e-3)  # away from the clamp's kinks
    la_i = la[interior].clone().requires_grad_(True)
    assert la_i.numel() > 3
    assert torch.autograd.gradcheck(lambda a: hc.hard_concrete_sample(a, u[interior]), (la_i,))
    assert torch.autograd.gradcheck(hc.keep_probability, (la.clone().requires_grad_(True),))


def test_clamped_units_get_zero_gradient():
    la = torch.tensor([8.0, -8.0], dtype=torch.float64, requires_grad=True)
    u = torch.tensor([0.5, 0.5], dtype=torch.float64)
    z = hc.hard_concrete_sample(la, u)
    assert z.tolist() == [1.0, 0.0]
    z.sum().backward()
    assert la.grad.tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    "shape,keep",
    [((37,), 11), ((5, 23), 7), ((4, 3), 0), ((4, 3), 3), ((1, 1), 1), ((3, 4, 5), 2), ((2, 3, 1), 1)],
)
def test_deterministic_mask_keeps_exact_top_count(shape, keep):
    la = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    z = hc.deterministic_mask(la, keep)
    rows_la, rows_z = la.reshape(-1, shape[-1]), z.reshape(-1, shape[-1])
    for r_la, r_z in zip(rows_la, rows_z, strict=True):
        kept = torch.nonzero(r_z).flatten()
        assert len(kept) == keep
        assert set(kept.tolist()) == set(torch.topk(r_la, keep).indices.tolist())
        torch.testing.assert_close(r_z[kept], torch.sigmoid(r_la[kept] / hc.BETA * 0.8))


def test_deterministic_mask_ties_and_bad_counts():
    la = torch.zeros(6)
    assert torch.nonzero(hc.deterministic_mask(la, 2)).flatten().tolist() == [0, 1]
    with pytest.raises(ValueError):
        hc.keep_topk(la, 7)
    with pytest.raises(ValueError):
        hc.keep_topk(la, -1)


def test_deterministic_mask_gradient_reaches_kept_units_only():
    la = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64, requires_grad=True)
    hc.deterministic_mask(la, 2).sum().backward()
    assert la.grad[1] == 0 and la.grad[0] > 0 and la.grad[2] > 0
