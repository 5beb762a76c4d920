"""Continued pre-training (shear train), the reference-losses command and two gloo ranks of the loader."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from shear.checkpoint import load
from shear.cli import main
from shear.data import find_sources
from shear.errors import ShearError
from shear.train import run_train
from shear.trainer import TrainConfig


def _cfg(model, data, out, **kw):
    base = dict(model=model, data=data, out=str(out), steps=6, batch_size=4, seq_len=32, eval_interval=3,
                checkpoint_interval=3, dynamic_interval=2, lr_weights=1e-3, lr_warmup=0.0)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def _refs(data_dir, low):
    """References far below every measured loss for ``low``, above it for the others."""
    return {s.name: (0.0 if s.name == low else 100.0) for s in find_sources(data_dir)}


def _log(run):
    return [json.loads(x) for x in open(os.path.join(run, "log.jsonl"))]


def test_train_moves_weights_toward_the_largest_gap_and_reports_it(tiny_source, data_dir, tmp_path):
    refs = _refs(data_dir, "code")
    paper = dict(dynamic_eta=1.0, min_domain_weight=0.0)  # the paper's step and no floor
    r = run_train(_cfg(tiny_source, data_dir, tmp_path / "run", reference_losses=refs, **paper))
    log = _log(tmp_path / "run")
    steps = [x for x in log if "loss" in x]
    assert len(steps) == 6 and all(torch.isfinite(torch.tensor(x["loss"])) for x in steps)
    first, last = steps[0]["domain_weights"], steps[-1]["domain_weights"]
    assert first == pytest.approx({d: 1 / len(refs) for d in refs})
    assert last["code"] > 0.9  # the paper's rule: only code is above its reference
    assert sum(last.values()) == pytest.approx(1.0)
    updates = [x for x in log if "dynamic" in x]
    assert [u["step"] for u in updates] == [2, 4]
    # the saved model loads with from_pretrained and was evaluated; the report has the figures
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(r["model"])
    report = (tmp_path / "run" / "report.md").read_text()
    assert (
        "largest weight gain: **code**" in report
        and "Furthest above its reference on average: **code**" in report
    )
    for plot in ("loss", "domain_weights", "loss_gap"):
        assert (tmp_path / "run" / "plots" / f"{plot}.png").stat().st_size > 1000
    evals = json.loads((tmp_path / "run" / "evals.json").read_text())
    assert set(evals) == {"start", "end", "saved"}
    assert evals["saved"] == pytest.approx(evals["end"], rel=1e-4)


def test_fixed_keeps_the_weights(tiny_source, data_dir, tmp_path):
    run_train(_cfg(tiny_source, data_dir, tmp_path / "run", dynamic=False, export=False,
                   domain_weights={"code": 3.0, "licenses": 1.0, "changelogs": 0.0}))  # fmt: skip
    steps = [x for x in _log(tmp_path / "run") if "loss" in x]
    assert all(x["domain_weights"] == {"changelogs": 0.0, "code": 0.75, "licenses": 0.25} for x in steps)
    assert sum(x["domains"]["changelogs"] for x in steps) == 0


def test_resume_with_workers_reproduces_the_same_batches(tiny_source, data_dir, tmp_path):
    refs = _refs(data_dir, "licenses")
    run_train(_cfg(tiny_source, data_dir, tmp_path / "straight", reference_losses=refs, export=False))
    split = _cfg(
        tiny_source, data_dir, tmp_path / "split", reference_losses=refs, export=False, num_workers=2
    )
    run_train(dataclasses.replace(split, stop_after=3))
    run_train(dataclasses.replace(split, resume=True))
    a, b = _log(tmp_path / "straight"), _log(tmp_path / "split")
    strip = ("tokens_per_s", "data_s", "step_s")
    assert [{k: v for k, v in x.items() if k not in strip} for x in a] == [
        {k: v for k, v in x.items() if k not in strip} for x in b
    ]
    sa, sb = load(tmp_path / "straight" / "checkpoint.pt"), load(tmp_path / "split" / "checkpoint.pt")
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    assert sa["sampler"]["cursor"] == sb["sampler"]["cursor"]


def test_distillation_from_the_recorded_source_resumes_exactly(tiny_source, data_dir, tmp_path):
    from shear.prune import PruneConfig, run_prune

    prune = PruneConfig(model=tiny_source, target="layers=2,hidden=48,heads=2,kv_heads=1,intermediate=64",
                        data=data_dir, out=str(tmp_path / "prune"), steps=2, batch_size=2, seq_len=32,
                        dynamic=False)  # fmt: skip
    pruned = run_prune(prune)["export"]
    assert json.loads((tmp_path / "prune" / "export" / "shear_export.json").read_text())["source_model"] == (
        str(os.path.realpath(tiny_source))
    )
    kw = dict(fixed_kw := dict(dynamic=False, export=False), distill_weight=0.7, distill_temperature=1.5)
    run_train(_cfg(pruned, data_dir, tmp_path / "straight", **kw))
    run_train(_cfg(pruned, data_dir, tmp_path / "split", stop_after=3, **kw))
    run_train(_cfg(pruned, data_dir, tmp_path / "split", resume=True, **kw))
    plain = _cfg(pruned, data_dir, tmp_path / "plain", **fixed_kw)
    run_train(plain)
    losses = {
        r: [x["loss"] for x in _log(tmp_path / r) if "loss" in x] for r in ("straight", "split", "plain")
    }
    assert len(losses["straight"]) == 6 and losses["straight"] == losses["split"]
    assert losses["straight"] != losses["plain"]  # the teacher changes the objective
    with pytest.raises(ShearError, match="needs a teacher"):  # no record, no --teacher
        run_train(
            dataclasses.replace(plain, model=tiny_source, out=str(tmp_path / "none"), distill_weight=0.5)
        )


def test_dynamic_needs_complete_reference_losses(tiny_source, data_dir, tmp_path):
    with pytest.raises(ShearError, match="needs reference losses"):
        run_train(_cfg(tiny_source, data_dir, tmp_path / "a"))
    with pytest.raises(ShearError, match=r"no reference loss for domain\(s\) \['licenses'\]"):
        run_train(
            _cfg(tiny_source, data_dir, tmp_path / "b", reference_losses={"code": 1.0, "changelogs": 1.0})
        )


def test_reference_model_fallback(tiny_source, data_dir, tmp_path):
    run_train(
        _cfg(tiny_source, data_dir, tmp_path / "run", steps=2, reference_model=tiny_source, export=False)
    )
    ref = json.loads((tmp_path / "run" / "reference_losses.json").read_text())
    first_eval = load(tmp_path / "run" / "checkpoint.pt")["extra"]["initial_eval"]
    assert ref == pytest.approx(first_eval)  # the same model measured on the same held-out data


def test_cli_train_and_reference_losses(tiny_source, data_dir, tmp_path, capsys):
    refs = tmp_path / "refs.json"
    points = []
    for i, n in enumerate((1e8, 3e8, 1e9)):
        p = tmp_path / f"p{i}.json"
        p.write_text(json.dumps({"params": n, "losses": {"code": 2 + 5 / n**0.3, "licenses": 3 + 8 / n**0.25,
                                                          "changelogs": 2.5 + 1 / n**0.2}}))  # fmt: skip
        points.append(str(p))
    assert main(["reference-losses", "--points", *points, "--target", "5e8", "--out", str(refs)]) == 0
    fitted = json.loads(refs.read_text())["reference_losses"]
    assert fitted["code"] == pytest.approx(2 + 5 / 5e8**0.3, rel=1e-6)
    out = tmp_path / "run"
    args = ["train", "--model", tiny_source, "--data", data_dir, "--out", str(out), "--steps", "2",
            "--batch-size", "2", "--seq-len", "32", "--dynamic-interval", "1",
            "--reference-losses", str(refs), "--no-export"]  # fmt: skip
    assert main(args) == 0
    assert json.loads((out / "config.json").read_text())["reference_losses"] == pytest.approx(fitted)
    assert main(args) == 2 and "already holds a run" in capsys.readouterr().err
    assert main(["train", "--model", tiny_source, "--data", data_dir, "--out", str(tmp_path / "x"),
                 "--reference-losses", '{"code": "high"}']) == 2  # fmt: skip
    assert "must map domains to numbers" in capsys.readouterr().err


_RANKS_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch.distributed as dist
    from transformers import AutoTokenizer
    from shear.data import DomainBatchLoader, DomainSampler, build_corpus

    model, data, out = sys.argv[1:4]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    corpus = build_corpus(data, AutoTokenizer.from_pretrained(model), 32, 2)
    sampler = DomainSampler(corpus, {d: 1.0 for d in corpus.domains}, seed=7, rank=rank, world_size=world)
    loader = DomainBatchLoader(sampler, 4, num_workers=1)
    batches, weights = [], []
    for step in range(6):
        if step == 3:  # rank 0 decides new weights; every rank must apply the same ones
            box = [{"code": 0.7, "licenses": 0.2, "changelogs": 0.1} if rank == 0 else None]
            dist.broadcast_object_list(box, src=0)
            loader.set_weights(box[0])
        ids, doms = next(loader)
        batches.append({"ids": ids.tolist(), "domains": doms})
        weights.append(loader.weights)
    json.dump({"batches": batches, "weights": weights}, open(f"{out}/rank{rank}.json", "w"))
    dist.destroy_process_group()
    """
)


def test_two_gloo_ranks_share_weights_and_see_disjoint_samples(tiny_source, data_dir, tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(_RANKS_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for world, sub in ((2, "two"), (1, "one")):
        (tmp_path / sub).mkdir()
        subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
             str(29531 + world), str(script), tiny_source, data_dir, str(tmp_path / sub)],
            check=True, env=env, capture_output=True, timeout=300,
        )  # fmt: skip
    r0, r1 = (json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1))
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    assert r0["weights"] == r1["weights"] == one["weights"]
    assert r0["weights"][-1] == pytest.approx({"changelogs": 0.1, "code": 0.7, "licenses": 0.2})
    for step, (a, b, g) in enumerate(zip(r0["batches"], r1["batches"], one["batches"], strict=True)):
        assert len(a["ids"]) == len(b["ids"]) == 2
        assert not {tuple(x) for x in a["ids"]} & {tuple(x) for x in b["ids"]}, step  # disjoint samples
        assert a["ids"] + b["ids"] == g["ids"] and a["domains"] + b["domains"] == g["domains"]


def test_dynamic_needs_positive_initial_weights(tiny_source, data_dir, tmp_path):
    refs = _refs(data_dir, "code")
    weights = {"code": 1.0, "licenses": 1.0, "changelogs": 0.0}
    with pytest.raises(ShearError, match=r"positive initial weight.*\['changelogs'\]"):
        run_train(_cfg(tiny_source, data_dir, tmp_path / "a", reference_losses=refs, domain_weights=weights))


def test_reference_losses_measured_on_models(tiny_source, data_dir, tmp_path, capsys):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_source)
    models = []
    for hidden in (16, 32, 64):  # three sizes of one family
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tok))  # fmt: skip
        path = tmp_path / f"m{hidden}"
        LlamaForCausalLM(cfg).save_pretrained(path)
        tok.save_pretrained(path)
        models.append(str(path))
    out = tmp_path / "refs.json"
    args = ["reference-losses", "--models", *models, "--data", data_dir, "--seq-len", "32"]
    args += ["--target", models[1]]
    assert main([*args, "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r["reference_losses"]) == {"code", "licenses", "changelogs"}
    assert len(r["sizes"]) == 3 and r["target_params"] == r["sizes"][1]  # the target counted from its folder
    assert main(["reference-losses", "--models", models[0], "--target", "1e6"]) == 2
    assert "--models needs --data" in capsys.readouterr().err


def test_torchrun_module_entry_point_trains_on_two_gloo_ranks(tiny_source, data_dir, tmp_path):
    out = tmp_path / "run"
    refs = json.dumps(_refs(data_dir, "code"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
         "-m", "shear", "train", "--model", tiny_source, "--data", data_dir, "--out", str(out),
         "--steps", "2", "--batch-size", "4", "--seq-len", "32", "--dynamic-interval", "1",
         "--num-workers", "1", "--reference-losses", refs, "--no-export", "--dynamic-eta", "1",
         "--min-domain-weight", "0"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("run folder:") == 1  # rank 0 reports, rank 1 stays quiet
    steps = [x for x in _log(out) if "loss" in x]
    assert len(steps) == 2 and steps[-1]["domain_weights"]["code"] > 0.9


def test_cli_says_resume_only_when_a_run_stopped_early(tiny_source, data_dir, tmp_path, capsys):
    base = ["train", "--model", tiny_source, "--data", data_dir, "--steps", "2", "--batch-size", "2",
            "--seq-len", "32", "--fixed", "--no-export"]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert "continue with --resume" not in capsys.readouterr().out  # finished, export skipped
    assert main([*base, "--out", str(tmp_path / "b"), "--stop-after", "1"]) == 0
    assert "stopped after step 1: continue with --resume" in capsys.readouterr().out
