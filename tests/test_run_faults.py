"""Runs under faults, one test per class: outputs aimed at inputs, resumes with changed options,
checkpoints that are damaged or foreign, two processes on one folder and a kill, a full disk,
a target equal to the source, a NaN gradient behind a finite loss, and ``shear export``."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from shear import trainer
from shear.checkpoint import load
from shear.cli import main
from shear.errors import ShearError
from shear.prune import PruneConfig, PruningObjective, run_prune

TARGET = "layers=2,hidden=48,heads=2,kv_heads=1,intermediate=64"
OPTS = [
    "--steps",
    "4",
    "--batch-size",
    "2",
    "--seq-len",
    "32",
    "--eval-interval",
    "2",
    "--checkpoint-interval",
    "2",
]


def _prune(src, data, out, *extra):
    return [
        "prune",
        "--model",
        str(src),
        "--target",
        TARGET,
        "--data",
        str(data),
        "--out",
        str(out),
        *OPTS,
        *extra,
    ]


def _cfg(src, data, out) -> PruneConfig:
    return PruneConfig(model=src, target=TARGET, data=data, out=str(out), steps=4, batch_size=2, seq_len=32,
                       eval_interval=2, checkpoint_interval=2, export=False, freeze_masks=0.0,
                       refit=0.0)  # masks learning to the end: the defaults before recipes  # fmt: skip


def _tree(folder) -> dict[str, str]:
    """Every file under ``folder`` (symbolic links not followed) and the sha256 of its bytes."""
    folder = Path(folder)
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def _steps(run) -> list[int]:
    return [json.loads(x)["step"] for x in Path(run, "log.jsonl").read_text().splitlines() if '"loss"' in x]


def _model_like(tiny_source, folder, model_cls, config_cls, **changes):
    """A random model with the tiny source's tokenizer and sizes, some changed."""
    cfg = json.loads(Path(tiny_source, "config.json").read_text())
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "tie_word_embeddings", "eos_token_id",
            "bos_token_id")  # fmt: skip
    torch.manual_seed(1)
    model_cls(config_cls(**{**{k: cfg[k] for k in keep}, **changes})).save_pretrained(folder)
    for f in Path(tiny_source).iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="module")
def runs(tiny_source, data_dir, tmp_path_factory):
    """Short runs the tests copy: a prune run stopped at step 2, a finished one, a training run."""
    root = tmp_path_factory.mktemp("runs")
    assert main(_prune(tiny_source, data_dir, root / "stopped", "--stop-after", "2", "--no-export")) == 0
    assert main(_prune(tiny_source, data_dir, root / "finished", "--steps", "2")) == 0
    train = ["train", "--model", tiny_source, "--data", data_dir, "--out", str(root / "train"),
             "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--fixed"]  # fmt: skip
    assert main(train) == 0
    return root


def _copy(runs, name, dest) -> Path:
    shutil.copytree(runs / name, dest)
    return dest


def test_a_run_never_writes_into_its_model_or_data_folder(tiny_source, data_dir, tmp_path, capsys):
    model = Path(shutil.copytree(tiny_source, tmp_path / "model"))
    data = Path(shutil.copytree(data_dir, tmp_path / "data"))
    before = {"model": _tree(model), "data": _tree(data)}
    cases = [
        (_prune(model, data, model), "the same folder as --model"),
        (_prune(model, data, model / "run"), "inside --model"),
        (_prune(model, data, data), "the same folder as --data"),
        (_prune(model, data, tmp_path), "a folder that contains --model"),
        (
            ["train", "--model", str(model), "--data", str(data), "--out", str(model)],
            "the same folder as --model",
        ),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert (
            err.startswith("shear: error: ") and message in err and "never writes into what it reads" in err
        )
    assert {"model": _tree(model), "data": _tree(data)} == before
    assert sorted(p.name for p in model.iterdir()) == sorted(p.name for p in Path(tiny_source).iterdir())

    # a fresh run into a folder that holds something else is refused too
    foreign = tmp_path / "papers"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"mine": true}')
    assert main(_prune(model, data, foreign)) == 2
    assert "is not a shear run's config.json" in capsys.readouterr().err
    assert (foreign / "config.json").read_text() == '{"mine": true}'
    (foreign / "config.json").unlink()
    (foreign / "thesis.tex").write_text("x")
    assert main(_prune(model, data, foreign)) == 2
    assert "not empty and holds no shear run" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]


def test_resume_keeps_the_recorded_options(runs, tiny_source, tmp_path, capsys):
    run = _copy(runs, "stopped", tmp_path / "run")
    other = shutil.copytree(tiny_source, tmp_path / "other-model")
    snapshot = _tree(run)
    changes = [
        (["--target", "layers=2,hidden=32,heads=2,kv_heads=1,intermediate=64"], "--target"),
        (["--seq-len", "64"], "--seq-len 64 (recorded 32)"),
        (
            ["--batch-size", "4", "--lr-masks", "0.5"],
            "--batch-size 4 (recorded 2); --lr-masks 0.5 (recorded 1.0)",
        ),
        (["--model", str(other)], "--model"),
        (["--fixed"], "--dynamic false (recorded true)"),
        (["--types", "layer"], '--types ["layer"] (recorded'),  # the flag, not the option's name
    ]
    for extra, named in changes:
        assert main(["prune", "--out", str(run), "--resume", *extra]) == 2
        err = capsys.readouterr().err
        assert "cannot change within a run" in err and named in err, err
    assert main(["prune", "--out", str(run), "--resume", "--stop-after", "2"]) == 2
    assert "already at step 2" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--resume"]) == 2
    assert "holds a `shear prune` run" in capsys.readouterr().err
    assert main(["prune", "--out", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "holds no run" in capsys.readouterr().err
    assert _tree(run) == snapshot  # refused before anything was written

    # only --out and options that may change: the recorded ones do the rest
    assert (
        main(["prune", "--out", str(run), "--resume", "--num-workers", "1", "--checkpoint-interval", "1"])
        == 0
    )
    assert _steps(run) == [1, 2, 3, 4]
    cfg = json.loads((run / "config.json").read_text())  # the options the run started with
    assert (cfg["target"], cfg["seq_len"], cfg["batch_size"], cfg["num_workers"]) == (TARGET, 32, 2, 0)
    exported = json.loads((run / "export" / "config.json").read_text())
    assert (exported["hidden_size"], exported["num_hidden_layers"]) == (48, 2)


def test_damaged_or_foreign_checkpoints_are_refused(runs, tiny_source, data_dir, tmp_path, capsys):
    models = tmp_path / "models"
    foreign = {
        "mistral": _model_like(tiny_source, models / "mistral", MistralForCausalLM, MistralConfig),
        "one-kv-group": _model_like(
            tiny_source, models / "kv1", LlamaForCausalLM, LlamaConfig, num_key_value_heads=1
        ),
    }
    checkpoints = {}
    for name, model in foreign.items():
        out = tmp_path / f"run-{name}"
        assert main(_prune(model, data_dir, out, "--stop-after", "2", "--no-export")) == 0
        checkpoints[name] = out / "checkpoint.pt"
    out = tmp_path / "run-types"
    types = ["--types", "layer", "head", "kv", "intermediate", "hidden"]
    assert main(_prune(tiny_source, data_dir, out, "--stop-after", "2", "--no-export", *types)) == 0
    checkpoints["mask types"] = out / "checkpoint.pt"
    checkpoints["task"] = runs / "train" / "checkpoint.pt"

    expected = {
        "mistral": "its model is a MistralForCausalLM, this run's is a LlamaForCausalLM",
        "one-kv-group": "shapes differ: model.model.layers.0.self_attn.k_proj.weight [16, 64] in the "
        "checkpoint, [32, 64] here",
        "mask types": "tensors only in the checkpoint: task.masks.log_alpha.head",
        "task": "it is from a `shear train` run, this is `shear prune`",
    }
    good = (runs / "stopped" / "checkpoint.pt").read_bytes()
    marker = tmp_path / "pickle-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"step": 2, "x": Payload()}, tmp_path / "evil.pt")
    damaged = {
        "truncated": good[: len(good) // 2],
        "garbage": os.urandom(4096),
        "empty": b"",
        "a pickle weights_only refuses": (tmp_path / "evil.pt").read_bytes(),
    }
    for name, source in [*checkpoints.items(), *damaged.items()]:
        run = _copy(runs, "stopped", tmp_path / f"resume-{name.replace(' ', '-')}")
        if isinstance(source, Path):
            shutil.copy(source, run / "checkpoint.pt")
        else:
            (run / "checkpoint.pt").write_bytes(source)
        assert main(["prune", "--out", str(run), "--resume"]) == 2, name
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1].startswith("shear: error: ") and "Traceback" not in err, err
        assert expected.get(name, "cannot be read: it is damaged or not a shear checkpoint") in err, (
            name,
            err,
        )
    assert not marker.exists()  # nothing in the refused pickle ran

    # a checkpoint from before per-group query heads: its head mask is [L, n], not [L, G, n];
    # resuming or exporting it is refused with the shapes, not a traceback
    run = Path(shutil.copytree(tmp_path / "run-types", tmp_path / "old-head-layout"))
    state = load(run / "checkpoint.pt")
    masks = state["task"]["masks"]
    assert list(masks["log_alpha.head"].shape) == [3, 2, 2]
    masks["log_alpha.head"] = masks["log_alpha.head"][:, 0].clone()
    torch.save(state, run / "checkpoint.pt")
    for command in (["prune", "--out", str(run), "--resume"], ["export", str(run)]):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        assert "shapes differ: task.masks.log_alpha.head [3, 2] in the checkpoint, [3, 2, 2] here" in err, err


_SLOW_RUN = """
import sys
from shear.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_two_processes_on_one_folder_and_a_kill(tiny_source, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    argv = _prune(
        tiny_source, data_dir, run, "--steps", "400", "--checkpoint-interval", "1", "--eval-interval", "1000"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-c", _SLOW_RUN, *argv], env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while len(_steps(run) if (run / "log.jsonl").exists() else []) < 3:
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not get going"
            time.sleep(0.2)
        t0 = time.monotonic()
        assert main([*argv[:-4], "--resume"]) == 2  # a second process: refused at once, naming the first
        err = capsys.readouterr().err
        assert f"is in use by another shear process (pid {first.pid} on " in err
        assert time.monotonic() - t0 < 5
        assert main(["export", str(run)]) == 2
        assert f"pid {first.pid}" in capsys.readouterr().err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    step = load(run / "checkpoint.pt")["step"]
    (run / ".checkpoint.pt.abcd1234.tmp").write_bytes(b"what a kill mid-write leaves")
    with open(run / "log.jsonl", "ab") as f:
        f.write(b'{"step": 99, "loss": 1.')  # and a torn last record
    assert main(["prune", "--out", str(run), "--resume", "--stop-after", str(step + 2)]) == 0
    err = capsys.readouterr().err
    assert f"the previous run in {run} (pid {first.pid} on " in err and "stopped before it finished" in err
    assert ".checkpoint.pt.abcd1234.tmp" in err
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    assert _steps(run) == list(range(1, step + 3))  # no step twice, none missing
    assert (run / ".lock").read_text() == ""  # released


def test_a_rerun_after_the_first_checkpoint_failed_starts_the_log_over(
    tiny_source, data_dir, tmp_path, monkeypatch
):
    cfg = _cfg(tiny_source, data_dir, tmp_path / "run")
    with monkeypatch.context() as m:
        m.setattr(trainer, "save_atomic", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):  # as a kill during the first checkpoint
            run_prune(cfg)
    assert _steps(tmp_path / "run") == [1, 2] and not (tmp_path / "run" / "checkpoint.pt").exists()
    run_prune(cfg)  # without --resume: there is nothing to resume
    assert _steps(tmp_path / "run") == [1, 2, 3, 4]


def test_a_nan_gradient_behind_a_finite_loss_stops_the_run(tiny_source, data_dir, tmp_path, monkeypatch):
    forward = PruningObjective.forward

    def poisoned(self, input_ids, step):
        lm, lag = forward(self, input_ids, step)
        if step >= 2:  # 0 * sqrt(0): the loss is unchanged, the gradient is NaN
            w = self.model.model.norm.weight
            lm = lm + 0.0 * torch.sqrt((w - w.detach()).sum())
        return lm, lag

    monkeypatch.setattr(PruningObjective, "forward", poisoned)
    cfg = _cfg(tiny_source, data_dir, tmp_path / "run")
    with pytest.raises(
        ShearError, match=r"gradient norm became nan at step 3 \(the loss was [0-9.]+\).*step 2 is kept"
    ):
        run_prune(cfg)
    records = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    norms = [r["grad_norm"] for r in records if "loss" in r]
    assert len(norms) == 2 and all(n > 0 for n in norms)
    assert load(tmp_path / "run" / "checkpoint.pt")["step"] == 2


def test_a_target_equal_to_the_source_is_refused_before_any_work(tiny_source, tmp_path, capsys):
    for target in ("layers=3", tiny_source):  # sizes, or the source's own config
        argv = ["prune", "--model", tiny_source, "--target", target, "--data", str(tmp_path / "no-data"),
                "--out", str(tmp_path / "run")]  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "the target equals the source" in err and "nothing to prune" in err
        assert not (tmp_path / "run").exists()  # and the missing data was never looked at


def test_export_command_writes_the_same_bytes_as_the_run(runs, tiny_source, tmp_path, capsys):
    finished = _copy(runs, "finished", tmp_path / "finished")
    assert main(["export", str(finished), "--out", str(tmp_path / "again")]) == 0
    assert _tree(tmp_path / "again") == _tree(finished / "export")
    assert main(["export", str(finished)]) == 0  # its own export/, replaced in place
    assert _tree(finished / "export") == _tree(runs / "finished" / "export")
    train = _copy(runs, "train", tmp_path / "train")
    assert main(["export", str(train), "--out", str(tmp_path / "trained")]) == 0
    assert _tree(tmp_path / "trained") == _tree(train / "model")
    capsys.readouterr()

    stopped = _copy(runs, "stopped", tmp_path / "stopped")  # --stop-after 2 --no-export
    assert main(["export", str(stopped), "--backend", "torch", "--max-shard-size", "5MB"]) == 0
    captured = capsys.readouterr()
    assert "exported step 2 of 4: the run is not finished" in captured.err
    assert "export backend: torch (requested)" in captured.err
    index = json.loads((stopped / "export" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(stopped / "export").config.hidden_size == 48

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    other = _copy(runs, "finished", tmp_path / "other")  # another run's finished export is not replaced
    theirs = _tree(other)
    for out, message in [
        (tmp_path / "mine", "is not empty: an export replaces its folder"),
        (tmp_path / "again", "is not empty: an export replaces its folder"),  # a shear export, not the run's
        (other / "export", f"is inside another run's folder ({other})"),
        (other / "new", f"is inside another run's folder ({other})"),
        (stopped, "is or contains the run folder"),
        (tmp_path, "is or contains the run folder"),
        (tiny_source, "the same folder as --model"),
    ]:
        assert main(["export", str(stopped), "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert _tree(other) == theirs
    assert main(["export", str(train), "--backend", "torch"]) == 2
    assert "--backend applies to pruning runs" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "mine")]) == 2
    assert "holds no shear run" in capsys.readouterr().err


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mounted in the test's folder, and a function that resizes it (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")

    def resize(nbytes: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={nbytes}", str(disk)], check=True)

    yield disk, resize
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_loses_nothing_and_says_what_was_kept(runs, tiny_source, data_dir, small_disk, capsys):
    disk, resize = small_disk
    run = disk / "run"
    c = (runs / "stopped" / "checkpoint.pt").stat().st_size  # the size of every checkpoint of this run
    argv = _prune(tiny_source, data_dir, run)

    def fails_with(*messages: str) -> None:
        assert main(argv) == 2
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert last.startswith("shear: error: ") and all(m in last for m in messages), err[-3000:]
        assert not [p.name for p in run.iterdir() if p.name.startswith(".") and p.name != ".lock"]
        assert all(line.endswith("}") for line in (run / "log.jsonl").read_text().splitlines())

    resize(c // 2)  # the first checkpoint does not fit
    fails_with(
        "writing checkpoint", "failed: the disk is full (No space left on device); there is no checkpoint yet"
    )
    assert not (run / "checkpoint.pt").exists()

    resize(c * 3 // 2)  # the first fits; the second needs room beside it and does not
    fails_with("the disk is full", f"the checkpoint of step 2 is kept: {run / 'checkpoint.pt'}")
    assert load(run / "checkpoint.pt")["step"] == 2

    resize(200 << 20)  # space freed: the run continues, each step logged once
    argv = ["prune", "--out", str(run), "--resume"]
    assert main(argv) == 0
    assert _steps(run) == [1, 2, 3, 4] and (run / "export" / "model.safetensors").is_file()
    export = _tree(run / "export")

    import shutil as _shutil

    resize(_shutil.disk_usage(disk).used + (1 << 20))  # no room for another export
    argv = ["export", str(run)]
    fails_with(
        "writing the export to", "the disk is full", "the previous one is kept; nothing partial is left"
    )
    assert _tree(run / "export") == export
    argv = ["export", str(run), "--out", str(disk / "copy")]
    assert main(argv) == 2
    assert "there was none before; nothing partial is left" in capsys.readouterr().err
    assert sorted(p.name for p in disk.iterdir()) == ["run"]


# the CLI, with a real SIGINT delivered while the checkpoint of step INTERRUPT_AT is written
_CTRL_C_IN_CHECKPOINT = """
import os, signal, sys
import torch
from shear.cli import main

save, at = torch.save, int(os.environ["INTERRUPT_AT"])

class Writer:
    def __init__(self, f):
        self.f, self.sent = f, False
    def write(self, data):
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)
        return self.f.write(data)
    def __getattr__(self, name):
        return getattr(self.f, name)

def interrupted_save(obj, f, *args, **kwargs):
    return save(obj, Writer(f) if obj.get("step") == at else f, *args, **kwargs)

torch.save = interrupted_save
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("at", [2, 4], ids=["first-checkpoint", "second-checkpoint"])
def test_ctrl_c_while_a_checkpoint_is_written(tiny_source, data_dir, tmp_path, at):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", INTERRUPT_AT=str(at))
    r = subprocess.run([sys.executable, "-c", _CTRL_C_IN_CHECKPOINT, *_prune(tiny_source, data_dir, run)],
                       env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    if at == 2:  # nothing to resume: no advice to --resume
        assert last == (
            "shear: interrupted; there is no checkpoint yet: run the same command again, without "
            "--resume, to start over"
        )
        assert not (run / "checkpoint.pt").exists()
        assert main(_prune(tiny_source, data_dir, run)) == 0  # as it says
    else:
        assert last == "shear: interrupted; the checkpoint of step 2 is kept: continue with --resume"
        assert load(run / "checkpoint.pt")["step"] == 2
        assert main(["prune", "--out", str(run), "--resume"]) == 0  # as it says
    assert _steps(run) == [1, 2, 3, 4]


def test_a_full_disk_before_the_first_checkpoint_says_there_is_none(
    tiny_source, data_dir, small_disk, capsys
):
    disk, resize = small_disk
    run = disk / "run"
    argv = _prune(tiny_source, data_dir, run, "--steps", "30", "--checkpoint-interval", "30")
    original = trainer.RunLog.write

    def write(self, record):  # after the first step no room is left: a later record does not fit
        if record.get("step") == 1 and "loss" in record:
            resize(shutil.disk_usage(disk).used)
        return original(self, record)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(trainer.RunLog, "write", write)
        assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"shear: error: writing {run / 'log.jsonl'} failed: the disk is full"), last
    assert last.endswith(
        "there is no checkpoint yet: run the same command again, without --resume, to start over"
    )
    resize(200 << 20)
    assert main(["prune", "--out", str(run), "--resume"]) == 2
    assert "the run stopped before its first checkpoint" in capsys.readouterr().err
    assert main([*argv, "--stop-after", "2"]) == 0  # as it says
    assert _steps(run) == [1, 2]


def test_a_full_disk_while_the_plots_are_written_says_which_are_there(tmp_path, monkeypatch):
    from shear import checkpoint, report

    records = [{"step": s, "loss": 3.0 - s / 10, "expected": {"head": 2.0 - s / 10}, "target": {"head": 2.0},
                "final_target": {"head": 1.0}} for s in (1, 2)]  # fmt: skip
    original, calls = checkpoint.write_atomic, []

    def write(path, fill):  # room for the first plot only
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(path, fill)

    monkeypatch.setattr(checkpoint, "write_atomic", write)
    with pytest.raises(ShearError) as e:
        report.write_plots(tmp_path, records)
    assert str(e.value).startswith(f"writing {tmp_path / 'plots' / 'dims.png'} failed: the disk is full")
    assert str(e.value).endswith(
        "no dims.png was written; plots written before it: loss.png; report.md was not written"
    )
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["loss.png"]
