"""Comparison helpers shared by the kernel tests (not a test module)."""

from __future__ import annotations

import torch


def check_close(actual: torch.Tensor, expected: torch.Tensor, tol: dict[str, float], what: str) -> None:
    """Compare a kernel result with its float64 reference.

    Errors are relative to the reference's largest magnitude (``tol["max"]``) and to its
    norm (``tol["rms"]``). Non-finite values fail (unwritten or poisoned elements); an
    all-zero reference demands exact zeros (the skip path must write them).
    """
    assert actual.shape == expected.shape, what
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{what}: non-finite values (unwritten or poisoned elements)"
    scale = e.abs().max().item()
    if scale == 0.0:
        assert (a == 0).all(), f"{what}: expected exact zeros"
        return
    err_max = (a - e).abs().max().item() / scale
    err_rms = ((a - e).norm() / e.norm()).item()
    assert err_max <= tol["max"] and err_rms <= tol["rms"], (
        f"{what}: max err {err_max:.2e} (tol {tol['max']:.0e}), rms err {err_rms:.2e} (tol {tol['rms']:.0e})"
    )


def mask_with_zeros(
    n: int, g: torch.Generator, every: int, start: int, zero_block: tuple[int, int] | None = (32, 64)
) -> torch.Tensor:
    """A mask in [0.05, 1] with exact zeros at ``start::every`` and over a whole aligned block."""
    m = torch.rand(n, generator=g) * 0.95 + 0.05
    m[start::every] = 0.0
    if zero_block is not None and n >= zero_block[1]:
        m[zero_block[0] : zero_block[1]] = 0.0
    return m


def poison_allocations(monkeypatch, *modules) -> None:
    """NaN-fill every float tensor the given kernel modules allocate with ``torch.empty`` /
    ``torch.empty_like`` (outputs, partial buffers), so an element a kernel never writes shows.

    Only those modules see it: their ``torch`` is replaced by a stand-in that forwards
    everything else to torch.
    """
    for module in modules:
        monkeypatch.setattr(module, "torch", _NanEmpty())


def _poisoned(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan")) if t.is_floating_point() else t


class _NanEmpty:
    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kw):
        return _poisoned(torch.empty(*args, **kw))

    @staticmethod
    def empty_like(*args, **kw):
        return _poisoned(torch.empty_like(*args, **kw))
