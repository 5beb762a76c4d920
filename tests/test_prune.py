"""The pruning driver: exact resume, non-finite loss, full disk, bad input, 2-process DDP."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from shear import checkpoint as ckpt_mod
from shear.checkpoint import load, save_atomic
from shear.errors import ShearError
from shear.prune import PruneConfig, PruningObjective, run_prune

TARGET = "layers=2,hidden=48,heads=2,kv_heads=1,intermediate=64"


def _cfg(src, data, out, **kw):
    base = dict(model=src, target=TARGET, data=data, out=str(out), steps=6, batch_size=4, seq_len=32,
                eval_interval=3, checkpoint_interval=3, target_warmup=0.5, export=False,
                freeze_masks=0.0, refit=0.0)  # masks learning to the end (before recipes)  # fmt: skip
    base.update(kw)
    return PruneConfig(**base)


def _losses(run_dir):
    lines = [json.loads(x) for x in open(os.path.join(run_dir, "log.jsonl"))]
    return [r["loss"] for r in lines if "loss" in r], [r for r in lines if "eval" in r]


def test_resume_continues_exactly(tiny_source, data_dir, tmp_path):
    run_prune(_cfg(tiny_source, data_dir, tmp_path / "straight"))
    run_prune(_cfg(tiny_source, data_dir, tmp_path / "split", stop_after=3))
    assert load(tmp_path / "split" / "checkpoint.pt")["step"] == 3
    with pytest.raises(ShearError, match="already holds a run"):
        run_prune(_cfg(tiny_source, data_dir, tmp_path / "split"))
    run_prune(_cfg(tiny_source, data_dir, tmp_path / "split", resume=True))
    straight, split = _losses(tmp_path / "straight"), _losses(tmp_path / "split")
    assert len(straight[0]) == 6 and straight[0] == split[0]  # same losses, bit for bit
    assert straight[1] == split[1]  # same evaluations
    a, b = load(tmp_path / "straight" / "checkpoint.pt"), load(tmp_path / "split" / "checkpoint.pt")
    assert a["task"]["masks"]["_extra_state"] is None  # never frozen
    for k in a["task"]["masks"]:
        if k.startswith("log_alpha"):
            assert torch.equal(a["task"]["masks"][k], b["task"]["masks"][k]), k
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["sampler"]["cursor"] == b["sampler"]["cursor"]


def test_resume_with_distillation_continues_exactly(tiny_source, data_dir, tmp_path, capfd):
    from shear.loading import load_source

    kw = dict(distill_weight=0.5, distill_temperature=2.0)
    run_prune(_cfg(tiny_source, data_dir, tmp_path / "straight", **kw))
    assert "distillation: teacher" in capfd.readouterr().err  # its size is reported at start
    run_prune(_cfg(tiny_source, data_dir, tmp_path / "split", stop_after=3, **kw))
    run_prune(_cfg(tiny_source, data_dir, tmp_path / "split", resume=True, **kw))
    straight, split = _losses(tmp_path / "straight"), _losses(tmp_path / "split")
    assert len(straight[0]) == 6 and straight[0] == split[0]  # the teacher draws no random numbers
    assert straight[1] == split[1]
    a, b = load(tmp_path / "straight" / "checkpoint.pt"), load(tmp_path / "split" / "checkpoint.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # the teacher is not in the checkpoint: the model part holds the student's tensors only
    student, _ = load_source(tiny_source)
    assert set(a["model"]) == set(student.state_dict())
    with pytest.raises(ShearError, match="distill_weight"):
        run_prune(dataclasses.replace(_cfg(tiny_source, data_dir, tmp_path / "bad"), distill_weight=1.5))


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tiny_source, data_dir, tmp_path, monkeypatch):
    forward = PruningObjective.forward

    def poisoned(self, input_ids, step):
        lm, lag = forward(self, input_ids, step)
        return (lm * float("nan"), lag) if step >= 4 else (lm, lag)

    monkeypatch.setattr(PruningObjective, "forward", poisoned)
    with pytest.raises(ShearError, match=r"loss became nan at step 5.*step 3"):
        run_prune(_cfg(tiny_source, data_dir, tmp_path / "run"))
    assert load(tmp_path / "run" / "checkpoint.pt")["step"] == 3


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(ckpt_mod.torch, "save", full_disk)
        with pytest.raises(ShearError, match="the disk is full.*there is no previous checkpoint"):
            save_atomic({"step": 1, "w": torch.ones(3)}, path)
    assert list(tmp_path.iterdir()) == []
    save_atomic({"step": 1, "w": torch.ones(3)}, path)
    monkeypatch.setattr(ckpt_mod.torch, "save", full_disk)
    with pytest.raises(ShearError, match="the disk is full.*the previous checkpoint is kept"):
        save_atomic({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(model="/nonexistent/model"), "not found"),
        (dict(data="/nonexistent/data"), "data folder not found"),
        (dict(target="hidden=4096"), "larger than the source"),
        (dict(steps=-1), "steps must be at least 0"),
        (dict(steps=0, init="uniform"), "needs --init importance"),
        (dict(init="magic"), "init must be importance or uniform"),
        (dict(calibration_sequences=0), "calibration_sequences must be positive"),
        (dict(dynamic_eta=-1.0), "dynamic_eta must be"),
        (dict(min_domain_weight=0.4), "leaves no room to move the weights of 3 domains"),
        (dict(resume=True), "no checkpoint"),
    ],
)
def test_bad_input(tiny_source, data_dir, tmp_path, change, message):
    with pytest.raises(ShearError, match=message):
        run_prune(dataclasses.replace(_cfg(tiny_source, data_dir, tmp_path / "run"), **change))


def test_empty_domain(tiny_source, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "prose.txt").write_text("Some words. " * 500)
    (data / "empty.txt").write_text("  \n")
    with pytest.raises(ShearError, match="'empty'.*no text"):
        run_prune(_cfg(tiny_source, str(data), tmp_path / "run"))


_DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from shear.prune import PruneConfig, run_prune
    run_prune(PruneConfig(**json.loads(sys.argv[1])))
    """
)


@pytest.mark.parametrize("distill_weight", [0.0, 0.5])
def test_two_gloo_processes_match_one(tiny_source, data_dir, tmp_path, distill_weight):
    # dynamic loading on: rank 0 computes the domain weights, every rank must receive them;
    # with distillation each rank runs its teacher on its own slice of the batch
    cfg = _cfg(tiny_source, data_dir, tmp_path / "one", steps=3, checkpoint_interval=3, eval_interval=3,
               dynamic=True, dynamic_interval=1, distill_weight=distill_weight, distill_temperature=2.0,
               reference_losses={"code": 0.0, "licenses": 100.0, "changelogs": 100.0})  # fmt: skip
    run_prune(cfg)
    two = dict(cfg.__dict__, out=str(tmp_path / "two"))
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(29517 + int(distill_weight > 0)),
         str(script), json.dumps(two)],
        check=True, env=env, capture_output=True, timeout=300,
    )  # fmt: skip
    one_losses, one_eval = _losses(tmp_path / "one")
    two_losses, two_eval = _losses(tmp_path / "two")
    # same global batch and masks; only the reduction order differs (fp32)
    assert two_losses == pytest.approx(one_losses, rel=1e-5)
    a, b = load(tmp_path / "one" / "checkpoint.pt"), load(tmp_path / "two" / "checkpoint.pt")
    for k in a["task"]["masks"]:
        torch.testing.assert_close(a["task"]["masks"][k], b["task"]["masks"][k], rtol=1e-5, atol=1e-6)
    for k in a["model"]:  # Adam magnifies the reduction order in a few elements of 3M (seen: 2.6e-5)
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-4)
    assert a["sampler"]["weights"] == pytest.approx(b["sampler"]["weights"])
    assert a["sampler"]["weights"] != pytest.approx({d: 1 / 3 for d in a["sampler"]["weights"]})


def test_frozen_masks_resume_exactly_and_are_what_the_export_keeps(tiny_source, data_dir, tmp_path):
    """--freeze-masks 0.5 of 6 steps: from step 3 on the deterministic masks of step 3, for good."""
    kw = dict(freeze_masks=0.5, lr_masks=0.5, calibration_sequences=8)
    run_prune(_cfg(tiny_source, data_dir, tmp_path / "straight", **kw))
    run_prune(_cfg(tiny_source, data_dir, tmp_path / "split", stop_after=4, **kw))  # stops after the freeze
    run_prune(_cfg(tiny_source, data_dir, tmp_path / "split", resume=True, **kw))
    straight, split = _losses(tmp_path / "straight"), _losses(tmp_path / "split")
    assert straight[0] == split[0] and straight[1] == split[1]
    records = [json.loads(x) for x in open(tmp_path / "straight" / "log.jsonl") if '"frozen"' in x]
    assert [r["frozen"] for r in records] == [False, False, False, True, True, True]
    for r in records[3:]:  # decided: exactly the target in every row
        assert r["expected_min"] == r["expected_max"] == r["final_target"]
    a, b = load(tmp_path / "straight" / "checkpoint.pt"), load(tmp_path / "split" / "checkpoint.pt")
    frozen = a["task"]["masks"]["_extra_state"]
    assert frozen is not None and all(
        torch.equal(v, b["task"]["masks"]["_extra_state"][k]) for k, v in frozen.items()
    )
    # the Lagrangian no longer acts once the masks are frozen
    assert all(r["lagrangian"] == 0.0 for r in records[3:])
