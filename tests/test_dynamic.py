"""Dynamic batch loading: the update rule against hand-computed values, errors, and a run."""

from __future__ import annotations

import json
import math

import pytest

from shear.dynamic import update_weights
from shear.errors import ShearError
from shear.prune import PruneConfig, run_prune

W = {"a": 0.5, "b": 0.3, "c": 0.2}
LOSS = {"a": 2.0, "b": 1.0, "c": 3.0}
REF = {"a": 1.5, "b": 1.2, "c": 2.0}


def test_paper_rule_by_hand():
    # delta = max(l - ref, 0) = (0.5, 0, 1.0); w * exp(delta) = (0.824361, 0.3, 0.543656) / 1.668017
    new = update_weights(W, LOSS, REF, rule="paper")
    assert list(new.values()) == pytest.approx([0.494216, 0.179854, 0.325930], abs=1e-6)


def test_reference_rule_by_hand():
    # delta = l - ref = (0.5, -0.2, 1.0), unclamped; then (1 - 1e-4) alpha + 1e-4 / 3
    new = update_weights(W, LOSS, REF, rule="reference")
    assert list(new.values()) == pytest.approx([0.510854, 0.152233, 0.336913], abs=1e-6)


def test_step_size_and_floor_by_hand():
    # eta 0.3: w * exp(0.3 delta) = (0.580917, 0.3, 0.269972) / 1.150889 = (0.504756, 0.260668, 0.234576)
    new = update_weights(W, LOSS, REF, eta=0.3)
    assert list(new.values()) == pytest.approx([0.504756, 0.260668, 0.234576], abs=1e-6)
    # a floor of 0.1 over 3 domains: 0.1 + 0.7 * w
    floored = update_weights(W, LOSS, REF, eta=0.3, floor=0.1)
    assert list(floored.values()) == pytest.approx([0.1 + 0.7 * v for v in new.values()], abs=1e-9)
    # a huge gap (a freshly pruned model) cannot take a domain below the floor
    collapse = update_weights(W, dict(LOSS, c=12.0), REF, eta=1.0, floor=0.05)
    assert min(collapse.values()) >= 0.05 and math.isclose(sum(collapse.values()), 1.0)
    with pytest.raises(ShearError, match="below 1 / 3 domains"):
        update_weights(W, LOSS, REF, floor=0.34)


def test_properties():
    new = update_weights(W, LOSS, REF)
    assert math.isclose(sum(new.values()), 1.0)
    assert max(new, key=lambda d: new[d] / W[d]) == "c"  # furthest above its reference gains most
    assert update_weights(W, REF, REF) == pytest.approx(W)  # no gap: unchanged
    below = {d: v - 1 for d, v in REF.items()}
    assert update_weights(W, below, REF) == pytest.approx(W)  # paper rule: below reference is no gap


@pytest.mark.parametrize(
    "losses,refs,weights,rule,message",
    [
        ({"a": 1.0, "b": 1.0}, REF, W, "paper", r"no loss for domain\(s\) \['c'\]"),
        (LOSS, {"a": 1.0, "b": 1.0}, W, "paper", r"no reference loss for domain\(s\) \['c'\]"),
        (dict(LOSS, b=float("nan")), REF, W, "paper", "non-finite loss"),
        (LOSS, REF, dict(W, a=0.0), "paper", "must be positive"),
        (LOSS, REF, W, "doremi", "unknown dynamic-loading rule"),
    ],
)
def test_errors_never_nan(losses, refs, weights, rule, message):
    with pytest.raises(ShearError, match=message):
        update_weights(weights, losses, refs, rule=rule)


def test_prune_with_dynamic_loading(tiny_source, data_dir, tmp_path):
    refs = {"code": 0.0, "licenses": 100.0, "changelogs": 100.0}  # only code is above its reference
    cfg = PruneConfig(model=tiny_source, target="layers=2,hidden=48,heads=2,kv_heads=1,intermediate=64",
                      data=data_dir, out=str(tmp_path / "run"), steps=5, batch_size=4, seq_len=32,
                      eval_interval=5, checkpoint_interval=5, export=False, dynamic=True,
                      dynamic_interval=2, reference_losses=refs)  # fmt: skip
    run_prune(cfg)
    steps = [
        json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if '"loss"' in x
    ]
    weights = [r["domain_weights"] for r in steps]
    assert weights[0] == pytest.approx({d: 1 / 3 for d in refs})  # steps 1-2 before the first update
    assert weights[2]["code"] > weights[0]["code"] and weights[4]["code"] > weights[2]["code"]
    assert weights[2]["licenses"] == pytest.approx(weights[2]["changelogs"])
    with pytest.raises(ShearError, match="no reference loss"):
        run_prune(PruneConfig(**dict(cfg.__dict__, out=str(tmp_path / "r2"), reference_losses={"code": 1.0})))
