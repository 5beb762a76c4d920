"""The demo chain: prune (dynamic) -> continued pre-training (dynamic) -> export -> evaluation."""

from __future__ import annotations

import json

import pytest

from shear.cli import main
from shear.demo import run_demo

_STAGE = dict(steps=4, batch_size=4, seq_len=32, eval_interval=2, checkpoint_interval=2, dynamic_interval=2)
BUDGET = {
    "prune": dict(_STAGE, target_warmup=0.5, freeze_masks=1.0, refit=0.3),
    "train": dict(_STAGE, lr_weights=1e-3),
}


def test_demo_chain_on_a_tiny_model(tiny_source, data_dir, tmp_path):
    target = "layers=2,hidden=48,heads=2,kv_heads=1,intermediate=64"
    r = run_demo(tmp_path / "demo", target, BUDGET, data=data_dir, model=tiny_source)
    report = (tmp_path / "demo" / "report.md").read_text()
    for stage in ("prune", "train"):
        log = [json.loads(x) for x in open(tmp_path / "demo" / stage / "log.jsonl")]
        assert [x["step"] for x in log if "dynamic" in x] == [2]  # one update, every 2 of 4 steps
        assert f"[{stage}/report.md]" in report
    # continued pre-training starts from the pruned export and uses the pruning's references
    cfg = json.loads((tmp_path / "demo" / "train" / "config.json").read_text())
    assert cfg["model"] == r["pruned"] and cfg["dynamic"]
    refs = json.loads((tmp_path / "demo" / "prune" / "reference_losses.json").read_text())
    assert cfg["reference_losses"] == refs
    from transformers import AutoConfig

    final = AutoConfig.from_pretrained(r["model"])
    assert (final.num_hidden_layers, final.hidden_size, final.intermediate_size) == (2, 48, 64)
    rows = [line for line in report.splitlines() if line.startswith("| code |")]
    # perplexity: reference, source, pruned, final, one-shot baseline before and after training
    assert len(rows[0].split("|")) == 9
    base = json.loads((tmp_path / "demo" / "baseline" / "train" / "config.json").read_text())
    assert base["steps"] == 8 and base["model"].endswith("one-shot/export")  # equal tokens: 4 + 4 steps
    # shear refits its choice; the baseline keeps the cut as it is
    assert (tmp_path / "demo" / "prune" / "refit.json").exists()
    one_shot = json.loads((tmp_path / "demo" / "baseline" / "one-shot" / "config.json").read_text())
    assert (
        one_shot["refit"] == 0.0 and not (tmp_path / "demo" / "baseline" / "one-shot" / "refit.json").exists()
    )
    assert len(rows) == 3  # and a domain-weight row per stage
    # a finished demo is not run again: the stages are skipped, the report rewritten
    mtime = (tmp_path / "demo" / "prune" / "checkpoint.pt").stat().st_mtime
    run_demo(tmp_path / "demo", target, BUDGET, data=data_dir, model=tiny_source)
    assert (tmp_path / "demo" / "prune" / "checkpoint.pt").stat().st_mtime == mtime


@pytest.mark.slow
def test_real_demo_smoke(tmp_path):
    # the real model and the real default corpus (downloads), a few steps of each stage
    assert main(["demo", "--out", str(tmp_path / "demo"), "--prune-steps", "3", "--train-steps", "3"]) == 0
    report = (tmp_path / "demo" / "report.md").read_text()
    for domain in ("books", "wiki", "code", "latex", "docs"):
        assert f"| {domain} |" in report
