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
