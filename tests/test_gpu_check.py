"""benchmarks/gpu_check.py: the one-call GPU check. No GPU here, so its plumbing runs on CPU
(--dry-run: every step as on a GPU, at toy sizes) and the real run must refuse clearly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def test_dry_run_runs_every_step_and_writes_the_report(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == ["install", "kernel_tests", "layer_targets", "prune_step", "linear_kl"]
    assert steps["install"]["status"] in ("ok", "skipped")
    tests = steps["kernel_tests"]
    assert tests["status"] == "ok" and tests["result"]["passed"] == tests["result"]["collected"] >= 2
    layer = steps["layer_targets"]["result"]
    assert {r["provider"] for r in layer["records"]} == {"eager", "dense"}
    assert any("not measured (no GPU)" in t for t in layer["targets"])
    prune = steps["prune_step"]["result"]["steps"]
    assert prune["plain"]["tokens_per_s"] > 0 and prune["prune"]["tokens_per_s"] > 0
    assert prune["prune+distill"]["tokens_per_s"] > 0
    kl = steps["linear_kl"]["result"]
    assert kl["providers"]["fused"]["median_ms"] > 0 and kl["loss_rel_diff"] < 1e-4
    md = (tmp_path / "gpu_check.md").read_text()
    for part in ("## GPU check (dry run", "| kernel_tests | ok |", "Targets:", "| prune |", "| fused |"):
        assert part in md
    assert (tmp_path / "logs" / "prune_step.log").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_without_a_gpu_the_real_check_refuses(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "shear: error: no CUDA device" in proc.stderr
