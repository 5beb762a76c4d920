"""benchmarks/quality.py end to end on a tiny model: every variant, both stages, the tables."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "quality.py"
_STAGE = dict(steps=4, batch_size=4, seq_len=32, eval_interval=2, checkpoint_interval=2, dynamic_interval=2)


def _load():
    spec = importlib.util.spec_from_file_location("quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quality_benchmark_runs_every_variant(tiny_source, data_dir, tmp_path):
    quality = _load()
    target = "layers=2,hidden=48,heads=2,kv_heads=1,intermediate=64"
    overrides = {"prune": dict(_STAGE, calibration_sequences=8), "train": _STAGE}
    args = (tmp_path / "q", tiny_source, data_dir, target)
    r = quality.run_quality(*args, eval_sequences=2, overrides=overrides)
    assert set(r["variants"]) == set(quality.VARIANTS)
    domains = list(r["source"])
    for name, v in r["variants"].items():
        assert list(v["final"]) == domains, name
        if name == "one-shot+distill":  # the final column only
            assert v["pruned"] is None
        else:
            assert list(v["pruned"]) == domains, name
        assert (v["masks"] is None) == name.startswith("one-shot")
    distilled = json.loads((tmp_path / "q" / "importance+distill" / "train" / "config.json").read_text())
    assert distilled["distill_weight"] == 0.5 and distilled["teacher"] == tiny_source
    # equal tokens: the one-shot baseline trains for both stages' steps
    cfg = json.loads((tmp_path / "q" / "one-shot" / "train-8" / "config.json").read_text())
    assert cfg["steps"] == 8
    assert r["tokens"] == {"pruning stage": 4 * 4 * 32, "total": 8 * 4 * 32}
    # the schedule control: the one-shot export on the pruning stage's schedule, then the
    # continued pre-training of the others from that model on the next seed's data
    first = json.loads((tmp_path / "q" / "one-shot-staged" / "train-4" / "config.json").read_text())
    second = json.loads((tmp_path / "q" / "one-shot-staged" / "train" / "config.json").read_text())
    assert (first["steps"], first["min_lr_ratio"], first["seed"]) == (4, 1.0, 0)
    assert (second["steps"], second["min_lr_ratio"], second["seed"]) == (4, 0.1, 1)
    assert second["model"] == str(tmp_path / "q" / "one-shot-staged" / "train-4" / "model")
    # the paper's variant: uniform init and the paper's dynamic rule
    paper = json.loads((tmp_path / "q" / "paper" / "prune" / "config.json").read_text())
    assert (paper["init"], paper["dynamic_eta"], paper["min_domain_weight"]) == ("uniform", 1.0, 0.0)

    # the ways of learning the masks: shear's frozen default, joint learning, the search
    def prune_cfg(name):
        return json.loads((tmp_path / "q" / name / "prune" / "config.json").read_text())

    assert prune_cfg("importance")["freeze_masks"] == 1.0 and prune_cfg("importance")["search_steps"] == 0
    # shear's default refits its choice; the one-shot baseline and the learned masks do not
    assert (prune_cfg("importance")["refit"], prune_cfg("importance")["refit_sequences"]) == (0.3, 128)
    assert prune_cfg("one-shot")["refit"] == prune_cfg("joint")["refit"] == prune_cfg("paper")["refit"] == 0.0
    assert prune_cfg("joint")["freeze_masks"] == 0.5
    assert prune_cfg("search")["search_steps"] == 40 and prune_cfg("one-shot")["search_steps"] == 0
    search_log = (tmp_path / "q" / "search" / "prune" / "log.jsonl").read_text()
    assert search_log.count('"search_step"') == 40
    table = quality.format_results(r)
    assert all(table.count(f"| {d} |") == 2 for d in domains)
    assert json.loads((tmp_path / "q" / "results.json").read_text()) == r
    # a second call finds every run complete and computes nothing again
    mtime = (tmp_path / "q" / "paper" / "train" / "evals.json").stat().st_mtime
    assert quality.run_quality(*args, eval_sequences=2, overrides=overrides) == r
    assert (tmp_path / "q" / "paper" / "train" / "evals.json").stat().st_mtime == mtime


def _result(seed, one_shot, shear):
    """A run_quality result with two domains: one-shot and importance losses per stage."""

    def losses(values):
        return {"code": values[0], "wiki": values[1]}

    return {
        "seed": seed,
        "source": {"code": 1.0, "wiki": 1.0},
        "variants": {
            "one-shot": {"pruned": losses(one_shot[0]), "final": losses(one_shot[1])},
            "importance": {"pruned": losses(shear[0]), "final": losses(shear[1])},
            "one-shot+distill": {"pruned": None, "final": losses(one_shot[1])},
        },
    }


def test_summary_over_seeds_means_losses_and_counts_wins_per_seed():
    quality = _load()
    runs = [
        _result(0, ([4.0, 5.0], [3.0, 4.0]), ([3.5, 5.5], [2.0, 3.0])),
        _result(3, ([4.0, 5.0], [3.0, 4.0]), ([4.5, 4.0], [3.5, 4.5])),
    ]
    s = quality.summarize(runs)
    assert s["seeds"] == [0, 3]
    assert s["mean"]["importance"]["pruned"] == {"code": 4.0, "wiki": 4.75}
    assert s["mean"]["importance"]["final"] == {"code": 2.75, "wiki": 3.75}
    assert s["mean"]["one-shot+distill"]["pruned"] is None
    # per seed: seed 0 wins code (pruned) and both domains (final); seed 3 wins wiki, then neither
    assert s["wins"]["importance"] == {"pruned": [1, 1], "final": [2, 0]}
    assert "one-shot" not in s["wins"]
    table = quality.format_summary(s, runs[0]["source"])
    assert "| code | 2.72 | 54.60 / 20.09 | 54.60 / 15.64 | - / 20.09 |" in table
    assert "- importance: pruned [1, 1]; final [2, 0]" in table
