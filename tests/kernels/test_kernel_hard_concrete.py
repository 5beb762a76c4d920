"""Hard-concrete Triton kernels against the float64 reference in shear.ops.hard_concrete."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_checks import poison_allocations

from shear.kernels import hard_concrete as K
from shear.ops import hard_concrete as R

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# The kernels compute in fp32 and round once to the output dtype. Outputs and gradients are
# O(1) (z in [0, 1], |dz/dlog_alpha| <= 1.2 / 4 / beta = 0.45), so an absolute tolerance of
# about two units in the last place at 1.0 covers the final rounding (the interpreter's
# fp32 -> bf16 cast truncates: up to 1 ulp) plus fp32 arithmetic (~1e-7, hence 1e-5 in fp32).
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}
# Entries whose float64 pre-clamp value lies this close to 0 or 1 may fall on the other side
# of the clamp in fp32 (fp32 error there is ~1e-7), flipping the gradient between 0 and
# ~0.1 |dz|; they are left out of gradient comparisons (random inputs hit this with
# probability ~1e-5 per element).
BOUNDARY = 1e-5


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every launcher output starts as NaN, so an element a kernel does not write shows."""
    poison_allocations(monkeypatch, K)


def _log_alpha(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """log_alpha spanning both clamp regions: z is exactly 0 or 1 for a good share of it."""
    g = torch.Generator().manual_seed(seed)
    la = torch.rand(n, generator=g, dtype=torch.float64) * 20 - 10
    if n >= 2:
        la[0], la[1] = -10.0, 10.0  # with u = 0.5 below: z exactly 0 and exactly 1
    return la.to(dtype).to(DEVICE)


def _noise(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = R.uniform_noise((n,), generator=g)
    if n >= 2:
        u[:2] = 0.5
    return u.to(DEVICE)


def _pre_clamp64(la: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    la, u = la.double(), u.double()
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + la) / R.BETA)
    return s * (R.LIMIT_R - R.LIMIT_L) + R.LIMIT_L


def _away_from_boundary(la: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    pre = _pre_clamp64(la, u)
    return ((pre.abs() > BOUNDARY) & ((pre - 1).abs() > BOUNDARY)).cpu()


def _reference_sample(la: torch.Tensor, u: torch.Tensor, dz: torch.Tensor):
    """(z, dlog_alpha) of the float64 reference on the same log_alpha and noise."""
    la64 = la.detach().double().requires_grad_(True)
    z = R.hard_concrete_sample(la64, u.double())
    z.backward(dz.double())
    return z.detach(), la64.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 1000, 4097])
def test_sample_given_noise_matches_reference(n: int, dtype: torch.dtype):
    la = _log_alpha(n, dtype, seed=n).requires_grad_(True)
    u = _noise(n, seed=n + 1)
    z = K.shear_hard_concrete_sample(la, u)
    assert z.shape == la.shape and z.dtype == dtype
    dz = torch.randn(n, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE)
    z.backward(dz)
    z_ref, dla_ref = _reference_sample(la, u, dz)

    torch.testing.assert_close(z.double(), z_ref, **TOL[dtype])
    if n >= 2:
        assert z[0].item() == 0.0 and z[1].item() == 1.0  # exact clamp values, as the reference
    if n >= 1000:
        assert (z == 0).sum() > 100 and (z == 1).sum() > 100 and ((z > 0) & (z < 1)).sum() > 100
    keep = _away_from_boundary(la, u)
    torch.testing.assert_close(la.grad.double().cpu()[keep], dla_ref.cpu()[keep], **TOL[dtype])
    # Clamped entries get exactly zero gradient, as torch.clamp gives.
    assert (la.grad.cpu()[(z_ref.cpu() == 0) | (z_ref.cpu() == 1)] == 0).all()


def test_sample_given_noise_shapes_and_noncontiguous():
    la = _log_alpha(3 * 7, torch.float32, seed=0).view(7, 3).t().requires_grad_(True)  # [3, 7] strided
    u = _noise(3 * 7, seed=1).view(3, 7)
    z = K.shear_hard_concrete_sample(la, u)
    assert z.shape == (3, 7)
    dz = torch.randn(3, 7).to(DEVICE)
    z.backward(dz)
    z_ref, dla_ref = _reference_sample(la, u, dz)
    torch.testing.assert_close(z.double(), z_ref, **TOL[torch.float32])
    keep = _away_from_boundary(la, u)
    torch.testing.assert_close(la.grad.double().cpu()[keep], dla_ref.cpu()[keep], **TOL[torch.float32])
    with pytest.raises(ValueError):
        K.shear_hard_concrete_sample(la, u.reshape(-1))


def test_noise_for_range_and_stream_consistency():
    u = K.noise_for(seed=11, offset=0, n=4097, device=DEVICE)
    assert u.dtype == torch.float32 and u.shape == (4097,)
    assert not torch.isnan(u).any()
    assert (u >= R.EPS).all() and (u <= 1 - R.EPS).all()
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / 4097)  # 5 standard errors
    # Element i of a call at offset o is element o + i of the stream.
    tail = K.noise_for(seed=11, offset=1000, n=3097, device=DEVICE)
    assert torch.equal(tail, u[1000:])
    # Offsets beyond 2^32 use the counter's high word: no wrap-around to offset 0.
    far = K.noise_for(seed=11, offset=2**32, n=4097, device=DEVICE)
    assert not torch.equal(far, u)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sample_all_matches_reference_on_same_noise(dtype: torch.dtype):
    shapes = [(7,), (3, 5), (1,), (2, 3, 33)]
    las = [_log_alpha(math.prod(s), dtype, seed=i).view(s).requires_grad_(True) for i, s in enumerate(shapes)]
    seed, offset = 1234, 2**33 + 5  # a 64-bit offset on purpose
    zs = K.sample_all(las, seed, offset)
    assert [z.shape for z in zs] == [la.shape for la in las]
    assert all(z.dtype == dtype for z in zs)
    dzs = [
        torch.randn(s, generator=torch.Generator().manual_seed(7 + i)).to(dtype).to(DEVICE)
        for i, s in enumerate(shapes)
    ]
    torch.autograd.backward(zs, dzs)

    total = sum(math.prod(s) for s in shapes)
    u_all = K.noise_for(seed, offset, total, device=DEVICE)
    start = 0
    for la, z, dz in zip(las, zs, dzs, strict=True):
        u = u_all[start : start + la.numel()].view(la.shape)
        start += la.numel()
        z_ref, dla_ref = _reference_sample(la, u, dz)
        torch.testing.assert_close(z.double(), z_ref, **TOL[dtype])
        keep = _away_from_boundary(la, u)
        torch.testing.assert_close(la.grad.double().cpu()[keep], dla_ref.cpu()[keep], **TOL[dtype])


def test_sample_all_range_reproducibility_and_fresh_noise():
    las = [_log_alpha(n, torch.float32, seed=n) for n in (129, 1000)]
    a = K.sample_all(las, seed=5, offset=0)
    b = K.sample_all(las, seed=5, offset=0)
    c = K.sample_all(las, seed=5, offset=1129)
    d = K.sample_all(las, seed=6, offset=0)
    for x in a:
        assert ((x >= 0) & (x <= 1)).all()
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[1], c[1]) and not torch.equal(a[1], d[1])
    # One launch over the concatenation equals sampling the concatenation itself.
    (whole,) = K.sample_all([torch.cat(las)], seed=5, offset=0)
    assert torch.equal(whole, torch.cat(a))
    assert K.sample_all([], seed=5) == []
    with pytest.raises(ValueError):
        K.sample_all([las[0], las[1].double()], seed=5)


def test_sample_all_keep_probability_monte_carlo():
    values = [-3.0, -1.0, 0.0, 1.5]
    per = 8192
    la = torch.tensor(values).repeat_interleave(per).to(DEVICE)
    (z,) = K.sample_all([la], seed=2024, offset=77)
    frac = (z > 0).view(len(values), per).double().mean(1).cpu()
    p = R.keep_probability(torch.tensor(values, dtype=torch.float64))
    se = torch.sqrt(p * (1 - p) / per)
    # 5 binomial standard errors: a false failure has probability ~6e-7 per value.
    assert ((frac - p).abs() <= 5 * se).all(), (frac, p, se)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 1000, 4097])
def test_keep_probability_and_soft_mask_match_reference(n: int, dtype: torch.dtype):
    for kernel_fn, ref_fn in (
        (K.shear_keep_probability, R.keep_probability),
        (K.shear_soft_mask, R.soft_mask),
    ):
        la = _log_alpha(n, dtype, seed=n).requires_grad_(True)
        p = kernel_fn(la)
        assert p.shape == la.shape and p.dtype == dtype
        dp = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
        p.backward(dp)
        la64 = la.detach().double().requires_grad_(True)
        p_ref = ref_fn(la64)
        p_ref.backward(dp.double())
        torch.testing.assert_close(p.double(), p_ref.detach(), **TOL[dtype])
        torch.testing.assert_close(la.grad.double(), la64.grad, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic_masks_match_reference(dtype: torch.dtype):
    # 3-D: the per-group head mask [L, G, n], one row per (layer, group)
    specs = [((3, 9), 4), ((33,), 7), ((2, 5), 0), ((1, 4), 4), ((3, 2, 5), 2)]
    las = [
        _log_alpha(math.prod(s), dtype, seed=i).view(s).requires_grad_(True) for i, (s, _) in enumerate(specs)
    ]
    keeps = [k for _, k in specs]
    zs = K.deterministic_masks(las, keeps)
    dzs = [torch.randn(s).to(dtype).to(DEVICE) for s, _ in specs]
    torch.autograd.backward(zs, dzs)
    for la, z, dz, keep in zip(las, zs, dzs, keeps, strict=True):
        la64 = la.detach().double().requires_grad_(True)
        z_ref = R.deterministic_mask(la64, keep)
        z_ref.backward(dz.double())
        assert ((z != 0).sum(-1) == keep).all()
        torch.testing.assert_close(z.double(), z_ref.detach(), **TOL[dtype])
        torch.testing.assert_close(la.grad.double(), la64.grad, **TOL[dtype])
    with pytest.raises(ValueError):
        K.deterministic_masks(las, keeps[:-1])


def test_launchers_write_every_element_into_poisoned_outputs():
    n = 4097
    la = _log_alpha(n, torch.float32, seed=0)
    z = torch.full((n,), float("nan"), device=DEVICE)
    K.hard_concrete_forward(la, None, 3, 0, z=z)
    assert not torch.isnan(z).any()
    dla = torch.full((n,), float("nan"), device=DEVICE)
    K.hard_concrete_backward(torch.ones(n, device=DEVICE), la, None, 3, 0, dla=dla)
    assert not torch.isnan(dla).any()
