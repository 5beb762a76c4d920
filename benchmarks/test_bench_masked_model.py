"""pytest-benchmark: masked reference path vs the dense Hugging Face model (CPU or GPU).

Run: python -m pytest benchmarks/ --benchmark-only --benchmark-columns=median,iqr,rounds
"""

from __future__ import annotations

import pytest
from common import build, step, tokens


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward_backward"])
@pytest.mark.parametrize("provider", ["dense", "masked"])
def test_masked_model(benchmark, provider, backward):
    model, ids = build(provider), tokens()
    benchmark.group = "smollm2-layers " + ("fwd+bwd" if backward else "fwd")
    benchmark.pedantic(step, args=(model, ids, backward), rounds=10, warmup_rounds=2)


@pytest.mark.parametrize("kind", ["plain", "prune"])
def test_prune_step_vs_plain_step(benchmark, kind):
    """A full optimiser step, 4 layers at SmolLM2 shapes (the report script runs all 30)."""
    from prune_step import batch, build

    plain, prune = build(layers=4)
    ids = batch(2, 128)
    benchmark.group = "optimiser step (4 SmolLM2 layers, 2 x 128 tokens)"
    benchmark.pedantic(plain if kind == "plain" else prune, args=(ids,), rounds=5, warmup_rounds=1)
