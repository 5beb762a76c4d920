"""FSDP2 (--strategy fsdp) on two gloo processes against one process: pruning (a tiny GQA
Llama) and training (a tiny MHA Llama, with activation checkpointing); sharded checkpoints
and exact resume, also on another number of ranks; the export byte for byte; ``auto``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from shear.checkpoint import load
from shear.prune import PruneConfig, run_prune
from shear.train import run_train
from shear.trainer import TrainConfig

TARGET = "layers=2,hidden=48,heads=2,kv_heads=1,intermediate=64"
REFS = {"code": 0.0, "licenses": 100.0, "changelogs": 100.0}

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from shear.prune import PruneConfig, run_prune
    from shear.train import run_train
    from shear.trainer import TrainConfig

    task, options = sys.argv[1], json.loads(sys.argv[2])
    if task == "prune":
        run_prune(PruneConfig(**options))
    else:
        run_train(TrainConfig(**options))
    """
)


def _torchrun(tmp, task: str, options: dict, port: int) -> str:
    """Run ``task`` on two gloo ranks; returns their stderr."""
    script = tmp / "run_fsdp.py"
    script.write_text(_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         str(script), task, json.dumps(options)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def _prune_options(src, data, out, **kw):
    # masks learning to the end, no refit (the defaults before recipes): the Lagrangian and the
    # multipliers under FSDP (the default recipe's refit: test_fsdp_one_shot_refit_matches_one_process)
    base = dict(model=src, target=TARGET, data=data, out=str(out), steps=4, batch_size=4, grad_accum=2,
                seq_len=32, eval_interval=2, checkpoint_interval=2, target_warmup=0.5, dynamic=True,
                dynamic_interval=1, reference_losses=REFS, freeze_masks=0.0, refit=0.0)  # fmt: skip
    base.update(kw)
    return base


def _steps(run):
    return [r for r in map(json.loads, open(os.path.join(run, "log.jsonl"))) if "loss" in r]


def _sharded_model(run, src):
    """The model of a run's sharded checkpoint, read in this process."""
    from shear.loading import load_source
    from shear.parallel import load_sharded

    model, _ = load_source(src)
    load_sharded(run / load(run / "checkpoint.pt")["shards"], model)
    return model.state_dict()


@pytest.fixture(scope="module")
def prune_runs(tiny_source, data_dir, tmp_path_factory):
    """One process (DDP's path) and two FSDP processes, the same global batch."""
    tmp = tmp_path_factory.mktemp("fsdp_prune")
    run_prune(PruneConfig(**_prune_options(tiny_source, data_dir, tmp / "one", strategy="ddp")))
    _torchrun(tmp, "prune", _prune_options(tiny_source, data_dir, tmp / "fsdp", strategy="fsdp"), 29651)
    return tmp


def test_fsdp_prune_matches_one_process(prune_runs, tiny_source):
    one, fsdp = prune_runs / "one", prune_runs / "fsdp"
    a, b = _steps(one), _steps(fsdp)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["lagrangian"] == pytest.approx(x["lagrangian"], rel=1e-4, abs=1e-6)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
        for key in ("lambda_1", "lambda_2", "expected"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), key
        assert y["domain_weights"] == pytest.approx(x["domain_weights"])
    ca, cb = load(one / "checkpoint.pt"), load(fsdp / "checkpoint.pt")
    assert "model" not in cb and (fsdp / cb["shards"]).is_dir()  # sharded, on disk once
    for part in ("masks", "lagrangian"):
        for k, v in ca["task"][part].items():
            torch.testing.assert_close(cb["task"][part][k], v, rtol=1e-4, atol=1e-6)
    weights = _sharded_model(fsdp, tiny_source)
    for k, v in ca["model"].items():  # Adam's normalised steps amplify the reduction order's ulps
        torch.testing.assert_close(weights[k], v, rtol=1e-4, atol=1e-5)
    assert len(cb["rng"]) == 2  # every rank's generator state
    memory = list(map(json.loads, open(fsdp / "memory.jsonl")))
    assert memory[0]["strategy"] == "fsdp" and len(memory[0]["measured_peak"]) == 2


def test_fsdp_export_equals_one_process_export_byte_for_byte(prune_runs, tmp_path):
    from shear.run_export import export_run

    fsdp = prune_runs / "fsdp"
    export_run(fsdp, out=tmp_path / "single")  # the same weights and masks, in one process
    files = sorted(p.name for p in (fsdp / "export").iterdir())
    assert "model.safetensors" in files
    assert files == sorted(p.name for p in (tmp_path / "single").iterdir())
    for name in files:
        a, b = (fsdp / "export" / name).read_bytes(), (tmp_path / "single" / name).read_bytes()
        if name == "shear_export.json":  # names the thread count of the C++ gather
            a, b = ({k: v for k, v in json.loads(x).items() if k != "backend_detail"} for x in (a, b))
        assert a == b, name


def test_fsdp_resume_continues_exactly_on_the_same_and_on_fewer_ranks(prune_runs, tiny_source, data_dir):
    straight = _steps(prune_runs / "fsdp")
    split = prune_runs / "split"
    _torchrun(prune_runs, "prune", _prune_options(tiny_source, data_dir, split, strategy="fsdp", stop_after=2,
                                                  export=False), 29653)  # fmt: skip
    assert load(split / "checkpoint.pt")["step"] == 2
    fewer = prune_runs / "fewer"
    shutil.copytree(split, fewer)
    _torchrun(prune_runs, "prune", _prune_options(tiny_source, data_dir, split, strategy="fsdp", resume=True,
                                                  export=False), 29655)  # fmt: skip
    assert [r["loss"] for r in _steps(split)] == [r["loss"] for r in straight]  # bit for bit
    a, b = load(prune_runs / "fsdp" / "checkpoint.pt"), load(split / "checkpoint.pt")
    for k, v in a["task"]["masks"].items():
        if k.startswith("log_alpha"):  # (_extra_state: frozen masks, None in both)
            assert torch.equal(b["task"]["masks"][k], v), k
    assert sorted(p.name for p in split.glob("checkpoint-shards-*")) == ["checkpoint-shards-00000004"]
    # the two ranks' shards, resumed in one process: the same run up to the reduction order
    run_prune(PruneConfig(**_prune_options(tiny_source, data_dir, fewer, strategy="fsdp", resume=True,
                                           export=False)))  # fmt: skip
    for x, y in zip(straight, _steps(fewer), strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
    c = load(fewer / "checkpoint.pt")
    for k, v in a["task"]["masks"].items():
        torch.testing.assert_close(c["task"]["masks"][k], v, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_fsdp_prune_with_distillation_matches_one_process(tiny_source, data_dir, tmp_path):
    """The teacher sharded too (a tied LM head, gathered by the root's forward for the fused
    loss): two FSDP ranks equal one process in losses, gradient norms, masks and weights."""
    kw = dict(steps=3, eval_interval=3, checkpoint_interval=3, distill_weight=0.5, distill_temperature=2.0)
    run_prune(PruneConfig(**_prune_options(tiny_source, data_dir, tmp_path / "one", strategy="ddp", **kw)))
    options = _prune_options(tiny_source, data_dir, tmp_path / "fsdp", strategy="fsdp", **kw)
    err = _torchrun(tmp_path, "prune", options, 29659)
    assert "distillation: teacher" in err and "sharded over 2 ranks" in err
    a, b = _steps(tmp_path / "one"), _steps(tmp_path / "fsdp")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
    ca, cb = load(tmp_path / "one" / "checkpoint.pt"), load(tmp_path / "fsdp" / "checkpoint.pt")
    for k, v in ca["task"]["masks"].items():
        torch.testing.assert_close(cb["task"]["masks"][k], v, rtol=1e-4, atol=1e-6)
    weights = _sharded_model(tmp_path / "fsdp", tiny_source)
    for k, v in ca["model"].items():
        torch.testing.assert_close(weights[k], v, rtol=1e-4, atol=1e-5)


def test_fsdp_one_shot_refit_matches_one_process(tiny_source, data_dir, tmp_path):
    """`shear prune` with the default recipe's refit (one-shot here, to keep it short) under FSDP on
    2 ranks: the same reconstruction errors and the same exported weights as one process."""
    from safetensors.torch import load_file

    options = dict(model=tiny_source, target=TARGET, data=data_dir, steps=0, batch_size=4, seq_len=32,
                   reference_losses=REFS, refit_sequences=12)  # fmt: skip
    run_prune(PruneConfig(**options, out=str(tmp_path / "one")))
    _torchrun(tmp_path, "prune", dict(options, out=str(tmp_path / "fsdp"), strategy="fsdp"), 29663)
    one, fsdp = (json.loads((tmp_path / r / "refit.json").read_text()) for r in ("one", "fsdp"))
    assert one["damping"] == fsdp["damping"] == 0.3 and one["rows"] == fsdp["rows"]
    for key, e in one["error"].items():
        assert fsdp["error"][key] == pytest.approx(e, rel=1e-4, abs=1e-5), key
    a, b = (load_file(tmp_path / r / "export" / "model.safetensors") for r in ("one", "fsdp"))
    assert a.keys() == b.keys()
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=1e-4, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def tiny_mha(tmp_path_factory):
    """A tiny multi-head (no GQA) Llama with the default model's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from shear.loading import load_source

    _, tok = load_source("default")
    torch.manual_seed(1)
    cfg = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=len(tok), tie_word_embeddings=False)  # fmt: skip
    path = tmp_path_factory.mktemp("mha") / "tiny_mha"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_fsdp_train_with_activation_checkpointing_matches_one_process(tiny_mha, data_dir, tmp_path):
    from safetensors.torch import load_file

    options = dict(model=tiny_mha, data=data_dir, steps=3, batch_size=4, grad_accum=2, seq_len=32,
                   eval_interval=3, checkpoint_interval=3, dynamic_interval=1, lr_weights=1e-3,
                   reference_losses=REFS, activation_checkpointing=True)  # fmt: skip
    run_train(TrainConfig(**options, out=str(tmp_path / "one"), strategy="ddp"))
    _torchrun(tmp_path, "train", dict(options, out=str(tmp_path / "fsdp"), strategy="fsdp"), 29657)
    a, b = _steps(tmp_path / "one"), _steps(tmp_path / "fsdp")
    assert [y["loss"] for y in b] == pytest.approx([x["loss"] for x in a], rel=1e-5)
    one = load_file(tmp_path / "one" / "model" / "model.safetensors")
    fsdp = load_file(tmp_path / "fsdp" / "model" / "model.safetensors")  # gathered to rank 0
    assert one.keys() == fsdp.keys()
    for k, v in one.items():
        torch.testing.assert_close(fsdp[k], v, rtol=1e-4, atol=5e-5)  # Adam: lr 1e-3, normalised steps
    config = json.loads((tmp_path / "fsdp" / "model" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.slow
def test_fsdp_train_with_distillation_matches_one_process(tiny_mha, tiny_source, data_dir, tmp_path):
    """shear train: an untied student (hidden 48) taught by a tied teacher of another width
    (hidden 64), both sharded; the saved model equals one process's."""
    from safetensors.torch import load_file

    options = dict(model=tiny_mha, data=data_dir, steps=2, batch_size=4, grad_accum=2, seq_len=32,
                   dynamic=False, eval_interval=2, checkpoint_interval=2, lr_weights=1e-3, distill_weight=0.7,
                   distill_temperature=1.5, teacher=tiny_source)  # fmt: skip
    run_train(TrainConfig(**options, out=str(tmp_path / "one"), strategy="ddp"))
    err = _torchrun(tmp_path, "train", dict(options, out=str(tmp_path / "fsdp"), strategy="fsdp"), 29667)
    assert "sharded over 2 ranks" in err
    a, b = _steps(tmp_path / "one"), _steps(tmp_path / "fsdp")
    assert [y["loss"] for y in b] == pytest.approx([x["loss"] for x in a], rel=1e-5)
    one = load_file(tmp_path / "one" / "model" / "model.safetensors")
    fsdp = load_file(tmp_path / "fsdp" / "model" / "model.safetensors")
    for k, v in one.items():
        torch.testing.assert_close(fsdp[k], v, rtol=1e-4, atol=5e-5)


def test_auto_strategy_follows_the_planner(tiny_source, data_dir, tmp_path, monkeypatch):
    from shear import plan
    from shear.trainer import resolve_run_strategy

    cfg = PruneConfig(**_prune_options(tiny_source, data_dir, tmp_path / "x"))
    plans = plan.run_plans(cfg, 8, torch.device("cpu"))
    assert plans["fsdp"].total < plans["ddp"].total
    between = (plans["ddp"].total + plans["fsdp"].total) / 2 / plan.USABLE_FRACTION
    for memory, expected in ((10 * plans["ddp"].total, "ddp"), (between, "fsdp")):
        monkeypatch.setattr(plan, "device_memory", lambda device, m=memory: int(m))
        assert resolve_run_strategy(cfg, 8, torch.device("cpu")) == expected
    assert (
        resolve_run_strategy(PruneConfig(**{**cfg.__dict__, "strategy": "ddp"}), 8, torch.device("cpu"))
        == "ddp"
    )
