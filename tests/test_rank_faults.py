"""Faults of a run on two gloo ranks: a checkpoint that fails on one rank stops every rank
(none is left waiting at a barrier); a resume with ``--strategy auto`` keeps its
checkpoint's strategy; the log's per-step domain counts are the whole step's. And
``--strategy fsdp`` outside torchrun says what it does, without torch's warnings.

The ranks are started here (not through torchrun), each with its own output, under a
bounded timeout: a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shear.checkpoint import load

TARGET = "layers=2,hidden=48,heads=2,kv_heads=1,intermediate=64"
REFS = '{"code": 0.0, "licenses": 100.0, "changelogs": 100.0}'

# the CLI on every rank; FAULT names what breaks: rank 0's checkpoint write (a full disk),
# or the planner's answer (DDP no longer fits, so `auto` alone would pick FSDP)
_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from shear import plan, trainer
    from shear.cli import main
    from shear.errors import write_failed

    fault = os.environ.get("FAULT")
    if fault == "checkpoint" and os.environ["RANK"] == "0":
        def full(state, path, kept):
            raise write_failed(f"checkpoint {path}", OSError(28, "No space left on device"), kept)
        trainer.save_atomic = full
    if fault == "ddp-does-not-fit":
        plan.ddp_fits = lambda *args: False
    sys.exit(main(sys.argv[1:]))
    """
)


def _two_ranks(tmp: Path, argv: list[str], port: int, fault: str = "") -> list[subprocess.CompletedProcess]:
    """``shear ARGV`` on two gloo ranks; fails the test if a rank is still running after 240 s."""
    script = tmp / "rank.py"
    script.write_text(_SCRIPT)
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   FAULT=fault)  # fmt: skip
        pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(subprocess.Popen([sys.executable, str(script), *argv], env=env, **pipes))
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=240)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    except subprocess.TimeoutExpired:
        pytest.fail(f"rank {len(done)} still runs after 240 s (waiting for a rank that stopped?)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return done


def _prune(src, data, out, *extra) -> list[str]:
    return ["prune", "--model", str(src), "--target", TARGET, "--data", str(data), "--out", str(out),
            "--steps", "4", "--batch-size", "4", "--grad-accum", "2", "--seq-len", "32", "--eval-interval",
            "2", "--checkpoint-interval", "2", "--dynamic-interval", "1", "--reference-losses", REFS,
            "--no-export", *extra]  # fmt: skip


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_a_checkpoint_failing_on_one_rank_stops_every_rank(tiny_source, data_dir, tmp_path, strategy):
    port = 29671 if strategy == "ddp" else 29672
    ranks = _two_ranks(tmp_path, _prune(tiny_source, data_dir, tmp_path / "run", "--strategy", strategy),
                       port, fault="checkpoint")  # fmt: skip
    for rank, r in enumerate(ranks):
        assert r.returncode == 2, (rank, r.stderr[-3000:])
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("shear: error: writing checkpoint") and "the disk is full" in last, r.stderr
        assert "there is no checkpoint yet" in last and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_auto_resume_keeps_the_checkpoint_strategy_and_counts_every_rank(tiny_source, data_dir, tmp_path):
    run = tmp_path / "run"
    first = _two_ranks(tmp_path, _prune(tiny_source, data_dir, run, "--stop-after", "2"), 29673)
    assert [r.returncode for r in first] == [0, 0], first[0].stderr[-3000:] + first[1].stderr[-3000:]
    assert "model" in load(run / "checkpoint.pt")  # auto chose DDP: whole tensors
    # the planner now says DDP does not fit: the resume still continues the DDP checkpoint
    resumed = _two_ranks(tmp_path, ["prune", "--out", str(run), "--resume"], 29674, fault="ddp-does-not-fit")
    assert [r.returncode for r in resumed] == [0, 0], resumed[0].stderr[-3000:]
    assert all("Traceback" not in r.stderr for r in resumed)
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:  # 4 sequences x 2 micro-batches a step, over both ranks
        assert sum(r["domains"].values()) == 8, r["domains"]
    memory = [json.loads(x) for x in (run / "memory.jsonl").read_text().splitlines()]
    assert [m["strategy"] for m in memory] == ["ddp", "ddp"]


def test_fsdp_outside_torchrun_says_so_without_torch_warnings(tiny_source, data_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    argv = [*_prune(tiny_source, data_dir, tmp_path / "run", "--strategy", "fsdp"), "--steps", "2"]
    r = subprocess.run([sys.executable, "-m", "shear", *argv], env=dict(env, OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "shear: --strategy fsdp in one process: nothing is sharded (start the run with" in r.stderr
    assert "Warning" not in r.stderr, r.stderr[-3000:]
    assert "shards" in load(tmp_path / "run" / "checkpoint.pt")
