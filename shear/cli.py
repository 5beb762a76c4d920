"""The ``shear`` command line.

``shear info MODEL [--target TARGET] [--types T ...] [--json]``: architecture, parameter
counts and, with a target, the target's counts, the masks a run would learn and the
fractions it would prune. MODEL is a model folder, ``default`` or a bare config.json. A TARGET may be a budget
(``params=60M``, ``prunable=40M``, ``memory=1.2GB,context=4096,batch=1``; see :mod:`shear.budget`):
``info`` lists its candidates, ``plan --data DATA`` ranks them, ``prune`` prunes to the best.

``shear plan --model SRC [--target T] --world-size N --batch B --seq-len S [--strategy S]
[--activation-checkpointing] [--distill] [--device-memory 80GB] [--json]``: per-rank memory of
a run for DDP and FSDP from the config alone, and whether it fits (see :mod:`shear.plan`).

``shear doctor [--build] [--verbose] [--json]``: whether the C++ gather extension for
export is built (by setup.py or in the cache), whether it could be, and the backend an
export would use; ``--build`` compiles it now.

``shear prune --model SRC --target TARGET --data DATA --out RUN_DIR [options]``: learn the
masks (dynamic batch loading by default), export the pruned model, write report.md and
plots (see :mod:`shear.prune`).

``shear train --model M --data DATA --out RUN_DIR [--dynamic | --fixed] [--reference-losses R]``:
continued pre-training with dynamic batch loading (see :mod:`shear.train`).

``shear prune|train --out RUN_DIR --resume [options]``: continue a run from its checkpoint
with its recorded options; options given again must not change what cannot change.

``shear export RUN_DIR [--out DIR] [--backend B] [--max-shard-size S]``: write a run's
model from its checkpoint (see :mod:`shear.run_export`).

``shear reference-losses (--points FILE ... | --models M ... --data DATA) --target SIZE``: fit
``L(N) = a / N^b + c`` per domain and predict the reference losses at the target size.

``shear data default [--out DIR]``: build the default multi-domain corpus (Debian and PyPI
packages, cached, with a MANIFEST of sources and licences).

``shear eval MODEL [--data DATA] [--tasks T1,T2 [--num-fewshot K] [--limit N]] [--json]``: per-domain
perplexity on held-out data and/or lm-evaluation-harness tasks (see :mod:`shear.downstream`).

``shear demo [--out DIR]``: the main job on the embedded default model: default corpus,
prune, continued pre-training, export, per-domain evaluation.

Errors in the input print one line (``shear: error: ...``) and exit with status 2; a
failed write (a full disk) the same way, saying what was kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shear.arch import Arch
from shear.budget import (
    candidate_rows,
    enumerate_candidates,
    format_rows,
    is_budget,
    parse_budget,
    rank_budget,
    shortlist,
)
from shear.errors import ShearError, clip
from shear.masks import MASK_TYPES, plan_masks
from shear.recipes import DEFAULT_RECIPE, RECIPE_OPTIONS, RECIPES
from shear.target import resolve_target


def info(model: str, target: str | None = None, types: Sequence[str] | None = None) -> dict[str, Any]:
    """Everything ``shear info`` reports, as a JSON-ready dict.

    Args:
        model: a model folder, ``default`` or a config.json path.
        target: optional target specification (see :func:`shear.target.resolve_target`).
        types: mask types to learn; None: those the target shrinks.

    Returns:
        ``{"model", "source", ["target", "masks", "prune_fraction"]}``.
    """
    from shear.loading import load_config  # transformers import: keep `shear --help` fast

    source = Arch.from_config(load_config(model))
    out: dict[str, Any] = {"model": model, "source": source.summary()}
    if target is None:
        if types:
            raise ShearError("--types needs --target")
        return out
    if is_budget(target):  # the candidates, unranked: ranking needs weights and data (shear plan --data)
        if types:
            raise ShearError("--types needs sizes: a budget target lists candidates (pick one as --target)")
        budget = parse_budget(target)
        enumerated = enumerate_candidates(source, budget)
        rows = candidate_rows(budget, shortlist(enumerated, budget.candidates))
        return {**out, "budget": budget.text(), "enumerated": len(enumerated), "candidates": rows}
    tgt = resolve_target(source, target)
    out["target"] = tgt.summary()
    out["masks"] = [
        {
            "name": s.name,
            "shape": list(s.shape),
            "keep_per_row": s.target,
            "of": s.size,
            "prune_fraction": s.target_sparsity,
        }
        for s in plan_masks(source, tgt, types)
    ]
    out["prune_fraction"] = {
        "prunable_params": 1 - tgt.prunable_params() / source.prunable_params(),
        "total_params": 1 - tgt.total_params() / source.total_params(),
    }
    return out


def _format_info(r: dict[str, Any]) -> str:
    src, tgt = r["source"], r.get("target")
    lines = [
        f"model: {r['model']}",
        f"architecture: {src['architecture']} (model_type {src['model_type']})",
        "",
    ]
    fields = ["layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab", "tied"]
    head = f"{'':<22}{'source':>15}" + (f"{'target':>15}" if tgt else "")
    lines.append(head)
    for f in fields:
        lines.append(f"{f:<22}{src[f]!s:>15}" + (f"{tgt[f]!s:>15}" if tgt else ""))
    labels = {
        "total": "params total",
        "prunable": "params prunable",
        "embedding_and_lm_head": "  embedding + LM head",
        "norms": "  norms",
    }
    for k, label in labels.items():
        lines.append(f"{label:<22}{src['params'][k]:>15,}" + (f"{tgt['params'][k]:>15,}" if tgt else ""))
    if tgt:
        lines += ["", "masks a run would learn:"]
        for m in r["masks"]:
            shape = "[" + ", ".join(map(str, m["shape"])) + "]"
            lines.append(
                f"  {m['name']:<14}{shape:<12} keep {m['keep_per_row']} of {m['of']} per row"
                f"  (prune {m['prune_fraction']:.1%})"
            )
        if not r["masks"]:
            lines.append("  none: the target equals the source")
        pf = r["prune_fraction"]
        lines += [
            "",
            f"expected fraction pruned: {pf['prunable_params']:.1%} of prunable parameters, "
            f"{pf['total_params']:.1%} of all parameters",
        ]
    return "\n".join(lines)


def _format_candidates(r: dict[str, Any]) -> str:
    """The candidate table of a budget target (``shear info``, ``shear plan``)."""
    ranked = r["candidates"][0]["score"] is not None
    return "\n".join([
        f"budget {r['budget']}: {len(r['candidates'])} of {r['enumerated']} uniform candidates"
        + (f", ranked by {r['ranked_by']}" if ranked else " (unranked: `shear plan --data DATA` ranks them)"),
        format_rows(parse_budget(r["budget"]), r["candidates"]),
    ])  # fmt: skip


def _cmd_info(args: argparse.Namespace) -> int:
    r = info(args.model, args.target, args.types)
    if args.json:
        print(json.dumps(r, indent=2))
    elif "candidates" in r:
        print(_format_candidates(r))
    else:
        print(_format_info(r))
    return 0


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """What ``shear plan`` reports, as a JSON-ready dict (see :mod:`shear.plan`)."""
    from shear.loading import load_config
    from shear.plan import parse_memory, plan_memory

    source = Arch.from_config(load_config(args.model))
    ranking = None
    if args.target and is_budget(args.target):
        if args.data:
            say = lambda m: print(f"shear: {m}", file=sys.stderr)  # noqa: E731
            ranking = rank_budget(args.model, args.data, args.target, seq_len=args.rank_seq_len,
                                  rank_steps=args.rank_steps, log=say)  # fmt: skip
        else:
            ranking = info(args.model, args.target)
            ranking["chosen"] = max(ranking["candidates"], key=lambda c: c["params"])["target"]
    elif args.data:
        raise ShearError("--data ranks the candidates of a budget target (e.g. --target params=60M)")
    target = resolve_target(source, ranking["chosen"] if ranking else args.target) if args.target else None
    device = parse_memory(args.device_memory)
    strategies = ("ddp", "fsdp") if args.strategy == "both" else (args.strategy,)
    plans = {
        s: plan_memory(source, target, args.world_size, args.batch, args.seq_len, s,
                       args.activation_checkpointing, args.distill, gpu=not args.cpu,
                       grad_accum=args.grad_accum, refit_sequences=args.refit_sequences)
        for s in strategies
    }  # fmt: skip
    return {
        "model": args.model,
        "source_params": source.total_params(),
        "target_params": target.total_params() if target else None,
        "world_size": args.world_size,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "grad_accum": args.grad_accum,
        "activation_checkpointing": args.activation_checkpointing,
        "distill": args.distill,
        "refit_sequences": args.refit_sequences if target else 0,
        "device_memory": device,
        "plans": {s: {**p.summary(), "fits": p.fits(device)} for s, p in plans.items()},
        "_plans": plans,
        **({"budget": {k: v for k, v in ranking.items() if k not in ("model", "source")}} if ranking else {}),
    }


def _cmd_plan(args: argparse.Namespace) -> int:
    from shear.plan import format_plans

    r = plan(args)
    plans = r.pop("_plans")
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    if "budget" in r:
        print(_format_candidates(r["budget"]))
        largest = "" if "ranked_by" in r["budget"] else " (the largest)"
        print(f"planned for {r['budget']['chosen']}{largest}")
    target = f" -> {r['target_params'] / 1e9:.2f}B" if r["target_params"] else ""
    print(
        f"{args.model}: {r['source_params'] / 1e9:.2f}B parameters{target}; {args.world_size} ranks, "
        f"micro-batch {args.batch} x {args.seq_len} tokens (global) x {args.grad_accum} per step, "
        f"activation checkpointing {'on' if args.activation_checkpointing else 'off'}"
        f"{', distillation' if args.distill else ''}"
        + (f", refit on {r['refit_sequences']} sequences" if r["refit_sequences"] else "")
    )
    print(format_plans(plans, r["device_memory"]))
    return 0


#: Help of the options generated from the run configs (shear.trainer.TrainConfig, PruneConfig).
_OPTION_HELP = {
    "recipe": "named pruning recipe that fills the options marked 'from --recipe' when they are not "
    "given: importance-refit (importance masks frozen from step 0, refit 0.3 on 128 sequences: what "
    "benchmarks/RESULTS.md shows winning), paper, one-shot, frozen, joint or search (shear.recipes)",
    "steps": "optimiser steps",
    "batch_size": "sequences per micro-batch (global, across ranks)",
    "grad_accum": "micro-batches per optimiser step (pruning: one mask sample each)",
    "seq_len": "tokens per sequence",
    "lr_weights": "learning rate of the model weights",
    "lr_masks": "learning rate of log_alpha",
    "lr_lambdas": "step size of the gradient ascent on the Lagrange multipliers",
    "lr_warmup": "fraction of the steps with linear learning-rate warm-up (then cosine decay)",
    "min_lr_ratio": "final learning rate as a fraction of the peak",
    "target_warmup": "fraction of the steps over which the target sparsities ramp up (from 0, or "
    "with --init importance from where the initialisation puts the masks)",
    "init": "mask initialisation: importance (the one-shot choice from activation importance, "
    "keep probabilities at the targets) or uniform (the paper's log_alpha ~ N(5, 0.01))",
    "calibration_sequences": "training sequences on which --init importance measures activations",
    "search_steps": "steps that learn the masks alone (weights frozen) on the calibration sequences "
    "before training, starting from activation importance (0: none)",
    "refit": "least-squares refit of the kept weights to the source's layer outputs on the "
    "calibration sequences, held near the cut weights with this strength (0: no refit; needs "
    "--freeze-masks 1 or --one-shot; see shear.refit)",
    "refit_sequences": "training sequences the --refit fits on (None: --calibration-sequences; "
    "the importance's rows come first)",
    "rank_steps": "with a budget --target: training steps of each candidate before it is scored (0: the "
    "one-shot cut + refit alone; see shear.budget)",
    "freeze_masks": "fraction of the last steps that train the weights under the masks frozen at "
    "their deterministic values (0: the paper's, the masks learn to the end)",
    "eval_interval": "evaluate per domain every N steps",
    "checkpoint_interval": "checkpoint every N steps",
    "eval_sequences": "held-out sequences per domain",
    "max_train_sequences": "cap on training sequences per domain",
    "max_grad_norm": "gradient clipping norm",
    "seed": "random seed (masks, data order)",
    "precision": "auto (bf16 autocast on GPU, fp32 on CPU), fp32 or bf16",
    "device": "auto, cpu or cuda[:N]",
    "strategy": "under torchrun: ddp (every rank holds the model), fsdp (FSDP2: weights, gradients "
    "and optimiser state sharded over the ranks) or auto (fsdp when `shear plan` says ddp does not "
    "fit the device)",
    "num_workers": "DataLoader worker processes reading batches (any number gives the same batches)",
    "stop_after": "stop (with a checkpoint) after this many steps; continue later with --resume",
    "dynamic_interval": "steps between domain-weight updates",
    "dynamic_rule": "paper (Algorithm 1) or reference (the original code's unclamped, smoothed variant)",
    "distill_weight": "A in [0, 1]: the objective's LM term becomes (1 - A) * LM + A * T^2 * KL to the "
    "teacher's next-token distribution (0: LM loss only)",
    "distill_temperature": "softmax temperature T of the distillation KL",
    "teacher": "the teacher for --distill-weight (prune default: a frozen copy of --model; train "
    "default: the source recorded in the pruned export)",
    "dynamic_eta": "step size on the loss gaps of each domain-weight update (the paper: 1)",
    "min_domain_weight": "least weight of any domain after an update (0: none)",
    "report_to": "mirror log.jsonl's scalars to none, all (the installed ones) or tensorboard,wandb "
    "(Hugging Face Trainer's report_to; TensorBoard's event files go to RUN_DIR/tensorboard/)",
    "reference_model": "with dynamic loading and no --reference-losses: use this model's measured "
    "held-out losses as the references (documented fallback)",
}


def _add_run_options(p: argparse.ArgumentParser, config: type, defaults: dict[str, Any]) -> None:
    """Options generated from a run config's fields, so names, types and defaults live in one place.

    Options left out are absent from the parsed namespace (``argparse.SUPPRESS``): a fresh
    run takes the config's defaults, a resume the run's recorded values.
    """
    loading = p.add_mutually_exclusive_group()
    loading.add_argument(
        "--dynamic",
        dest="dynamic",
        action="store_true",
        default=argparse.SUPPRESS,
        help="dynamic batch loading: move the domain weights toward the domains furthest above "
        "their reference loss (the default)",
    )
    loading.add_argument(
        "--fixed",
        dest="dynamic",
        action="store_false",
        default=argparse.SUPPRESS,
        help="keep the initial domain weights (baseline)",
    )
    p.add_argument(
        "--reference-losses",
        default=argparse.SUPPRESS,
        help="reference loss per domain: a JSON object or file, e.g. from `shear reference-losses` "
        "(pruning's default, a documented fallback: the source model's measured losses)",
    )
    p.add_argument(
        "--domain-weights",
        default=argparse.SUPPRESS,
        help='initial domain weights, a JSON object or file (default: equal), e.g. {"code": 2}',
    )
    p.add_argument(
        "--activation-checkpointing",
        action="store_true",
        default=argparse.SUPPRESS,
        help="recompute each decoder layer's activations in the backward pass (less memory, "
        "about a third more compute)",
    )

    for f in dataclasses.fields(config):
        if f.name not in _OPTION_HELP:
            continue
        default = defaults.get(f.name, f.default)
        if default is None and f.name in RECIPE_OPTIONS and config.TASK == "prune":
            default = "from --recipe"
        kind = {"int": int, "float": float, "str": str}.get(str(f.type).split(" ")[0], None)
        kind = kind or (int if f.name in ("max_train_sequences", "stop_after") else str)
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            type=kind,
            default=argparse.SUPPRESS,
            help=f"{_OPTION_HELP[f.name]} (default: {default})",
        )


def read_domain_values(text: str | None, what: str = "--reference-losses") -> dict[str, float] | None:
    """Numbers per domain from a JSON object or a JSON file.

    A file written by ``shear reference-losses`` (its ``reference_losses`` entry) is accepted too.
    """
    if text is None:
        return None
    try:
        data = json.loads(Path(text).read_text() if Path(text).is_file() else text)
    except (OSError, json.JSONDecodeError) as e:
        raise ShearError(f"{what}: give a JSON object or a JSON file ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("reference_losses"), dict):
        data = data["reference_losses"]
    if not isinstance(data, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in data.values()
    ):
        raise ShearError(f'{what} must map domains to numbers, e.g. {{"code": 1.2}}')
    return {str(k): float(v) for k, v in data.items()}


def _run_config(config: type, args: argparse.Namespace, required: Sequence[str]) -> Any:
    """A run's config from the options given; a resume starts from the run's recorded options.

    Raises:
        ShearError: a required option missing from a fresh run; see also
            :func:`shear.runfolder.recorded_options`.
    """
    from shear.runfolder import recorded_options

    fields = {f.name for f in dataclasses.fields(config)}
    given = {k: v for k, v in vars(args).items() if k in fields}
    for name, flag in (("reference_losses", "--reference-losses"), ("domain_weights", "--domain-weights")):
        if name in given:
            given[name] = read_domain_values(given[name], flag)
    if getattr(args, "types", None) is not None:
        given["mask_types"] = args.types
    given.update(out=args.out, resume=args.resume, export=not args.no_export)
    if args.resume:
        recorded = recorded_options(args.out, config.TASK, fields)
        session = {k: v for k, v in recorded.items() if k not in config.SESSION_OPTIONS}
        return config(**{**session, **given})
    missing = [f"--{name}" for name in required if given.get(name) is None]
    if missing:
        raise ShearError(
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required (a --resume reads "
            "them from the run folder)"
        )
    return config(**given)


def _print_result(r: dict[str, Any]) -> None:
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 speaks for the run
        return
    print(f"run folder:     {r['out']}")
    if r.get("export") or r.get("model"):
        print(f"model:          {r.get('export') or r.get('model')}")
        print(f"report:         {r['report']}")
        print(f"plots:          {Path(r['out']) / 'plots'}")
    elif r.get("stopped_early"):
        print(f"stopped after step {r['steps']}: continue with --resume")
    if r.get("final_eval"):
        ppl = ", ".join(f"{d} {math.exp(v):.2f}" for d, v in r["final_eval"].items())
        print(f"perplexity (held out): {ppl}")


def _run(args: argparse.Namespace, config: type, runner: Any, required: Sequence[str]) -> int:
    """Build a run's config from the options, run it and print where everything is."""
    from shear.runfolder import kept_checkpoint

    cfg = _run_config(config, args, required)
    try:
        _print_result(runner(cfg))
    except KeyboardInterrupt:
        raise KeyboardInterrupt(kept_checkpoint(cfg.out)) from None  # what is left to continue from
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    from shear.prune import PruneConfig, run_prune

    if args.one_shot:
        args.steps = 0
    return _run(args, PruneConfig, run_prune, ("model", "target", "data"))


def _cmd_train(args: argparse.Namespace) -> int:
    from shear.train import run_train
    from shear.trainer import TrainConfig

    return _run(args, TrainConfig, run_train, ("model", "data"))


def _cmd_export(args: argparse.Namespace) -> int:
    from shear.run_export import export_run

    r = export_run(args.run_dir, args.out, args.backend, args.max_shard_size)
    print(f"run folder:     {r['run']} (shear {r['task']}, checkpoint of step {r['step']} of {r['steps']})")
    print(f"model:          {r['out']}")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from shear.corpus import build_default_corpus, format_manifest

    cap = None if args.max_mb_per_domain <= 0 else int(args.max_mb_per_domain * 1e6)
    manifest = build_default_corpus(args.out, max_bytes_per_domain=cap, sources=args.sources)
    print(format_manifest(manifest))
    return 0


def _size(text: str) -> float:
    """A parameter count: a number (``1.3e9``) or a model folder / config.json (its total parameters)."""
    try:
        return float(text)
    except ValueError:
        from shear.loading import load_config

        return float(Arch.from_config(load_config(text)).total_params())


def _cmd_reference_losses(args: argparse.Namespace) -> int:
    from shear.reference_losses import fit_reference_losses, load_points

    points = load_points(args.points) if args.points else []
    if args.models:
        if not args.data:
            raise ShearError("--models needs --data (the held-out split the losses are measured on)")
        points += [_measure_point(m, args) for m in args.models]
    if len(points) == 0:
        raise ShearError("give --points FILE ... and/or --models MODEL ... --data DATA")
    result = fit_reference_losses(points, _size(args.target))
    for w in result.get("warnings", []):
        print(f"shear: warning: {w}", file=sys.stderr)
    text = json.dumps(result, indent=2)
    if args.out:
        from shear.checkpoint import write_text_atomic

        write_text_atomic(args.out, text + "\n")
        print(f"reference losses written to {args.out} (pass it to --reference-losses)", file=sys.stderr)
    print(text)
    return 0


def _measure_point(model_path: str, args: argparse.Namespace) -> dict[str, Any]:
    r = evaluate_model(model_path, args.data, args.seq_len, args.eval_sequences, args.batch_size)
    return {"params": r["params"], "losses": {d: v["loss"] for d, v in r["domains"].items()}}


def evaluate_model(
    model: str, data: str, seq_len: int, eval_sequences: int, batch_size: int
) -> dict[str, Any]:
    """Per-domain held-out loss and perplexity of a model (what ``shear eval`` prints).

    Returns:
        ``{"model", "data", "seq_len", "params", "domains": {d: {"loss", "perplexity", "tokens"}}}``.
    """
    from shear.data import build_corpus
    from shear.evaluation import domain_losses
    from shear.loading import check_seq_len, load_config, load_source

    for name, value, least in (("--seq-len", seq_len, 2), ("--eval-sequences", eval_sequences, 1),
                               ("--batch-size", batch_size, 1)):  # fmt: skip
        if value < least:
            raise ShearError(f"{name} must be at least {least}, got {value}")
    check_seq_len(load_config(model), seq_len)
    net, tokenizer = load_source(model)
    if tokenizer is None:
        raise ShearError(f"{model} has no tokenizer; evaluating it needs one to read the data")
    corpus = build_corpus(data, tokenizer, seq_len, eval_sequences)
    losses = domain_losses(net, corpus.eval, batch_size=batch_size)
    return {
        "model": model,
        "data": data,
        "seq_len": seq_len,
        "params": sum(p.numel() for p in net.parameters()),
        "domains": {
            d: {"loss": v, "perplexity": math.exp(v), "tokens": corpus.eval[d].numel()}
            for d, v in losses.items()
        },
    }


def _cmd_eval(args: argparse.Namespace) -> int:
    model = args.model_path or args.model
    if model is None or (args.model_path and args.model):
        raise ShearError("give the model once: shear eval MODEL (or --model MODEL)")
    if args.data is None and args.tasks is None:
        raise ShearError("give --data (per-domain perplexity) and/or --tasks (lm-evaluation-harness tasks)")
    run_model = None
    if Path(model).is_dir():
        from shear.downstream import model_of_run

        run_model = model_of_run(Path(model))
    result: dict[str, Any] = {}
    if args.data is not None:
        result = evaluate_model(str(run_model or model), args.data, args.seq_len, args.eval_sequences,
                                args.batch_size)  # fmt: skip
        if not args.json:
            print(f"{'domain':<20}{'perplexity':>12}{'loss':>10}{'tokens':>10}")
            for d, r in result["domains"].items():
                print(f"{d:<20}{r['perplexity']:>12.2f}{r['loss']:>10.4f}{r['tokens']:>10}")
    if args.tasks is not None:
        result["downstream"] = _downstream(args, model, run_model)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def _downstream(args: argparse.Namespace, model: str, run_model: Path | None) -> dict[str, Any]:
    """``shear eval --tasks``: the harness's tasks; the JSON and the run's report when MODEL is a run."""
    from shear.checkpoint import write_text_atomic
    from shear.downstream import evaluate_tasks, format_table, parse_tasks, record_in_run
    from shear.model_card import update_card

    r = evaluate_tasks(run_model or model, parse_tasks(args.tasks), args.num_fewshot, args.limit,
                       args.include_path, args.batch_size, args.device)  # fmt: skip
    if args.out:
        write_text_atomic(args.out, json.dumps(r, indent=2) + "\n")
    if not args.json:
        print(format_table(r))
    update_card(run_model or model, downstream=r)  # a shear export's card (shear.model_card)
    if run_model is not None:
        report = record_in_run(Path(model), r)
        if not args.json:
            print(f"report:         {report}")
    return r


#: The demo's target for SmolLM2-135M (README explains the choice).
DEMO_TARGET = "layers=24,hidden=384,heads=6,kv_heads=2,intermediate=1024"
#: Budgets: about 6 minutes on 2 CPU cores for both stages (measured 2026-11-24), then the one-shot
#: baseline's 140 training steps of the small model; larger where a GPU is present.
#: The paper spreads its schedule over 3200 steps (320 of learning-rate warm-up, 640 of target
#: warm-up). Weight updates come every 20 steps instead of the paper's 50 (pruning) and 400
#: (continued pre-training), so a short run still shows several; both stages train the weights at
#: 3e-4 to recover faster in few steps. Both budgets run the default recipe (shear.recipes): the
#: masks start from activation importance and stay frozen from the first step: at this budget every
#: form of mask learning measured so far (joint learning under sampled masks, a search on the
#: calibration sequences, gradual fading) gave a worse model after training than keeping the
#: importance choice (benchmarks/RESULTS.md), so the pruning stage trains that architecture.
#: lr_masks only matters with --freeze-masks below 1: squeezed into 80 steps, log_alpha at the
#: reference rate of 1.0 collapses every unit of a type within a few steps (measured: train loss
#: 3.6 -> 13 by step 10), so the demo's rate is 0.3.
#: The pruning stage keeps its learning rate after the warm-up (min_lr_ratio=1.0) and continued
#: pre-training decays it, so the two stages make one schedule as the baseline's single run does;
#: decaying to 0.1x by the end of pruning left continued pre-training behind (RESULTS.md, repeats).
#: The recipe also refits the kept weights before the first step to the source's layer outputs, held near
#: the cut weights (refit=0.3, shear/refit.py), on 128 training sequences (the importance's 32
#: first): fitted on the 32 alone, the refit overfit them and the final model lost wiki in three
#: seeds of three; the plain least-squares fit (no pull toward the cut) was worse (RESULTS.md).
DEMO_BUDGET_CPU = {
    "prune": dict(steps=80, batch_size=4, seq_len=128, eval_interval=20, checkpoint_interval=40,
                  target_warmup=0.5, lr_warmup=0.1, lr_weights=3e-4, min_lr_ratio=1.0, lr_masks=0.3,
                  lr_lambdas=1.0, dynamic_interval=20),
    "train": dict(steps=60, batch_size=4, seq_len=128, eval_interval=20, checkpoint_interval=30,
                  lr_warmup=0.1, lr_weights=3e-4, dynamic_interval=20),
}  # fmt: skip
DEMO_BUDGET_GPU = {
    "prune": dict(steps=800, batch_size=16, seq_len=512, eval_interval=100, checkpoint_interval=200,
                  target_warmup=0.2, lr_warmup=0.1, lr_masks=1.0, lr_lambdas=1.0, dynamic_interval=50),
    "train": dict(steps=800, batch_size=16, seq_len=512, eval_interval=100, checkpoint_interval=200,
                  lr_warmup=0.05, lr_weights=1e-4, dynamic_interval=100),
}  # fmt: skip


def _demo_budget() -> dict[str, dict[str, Any]]:
    import torch

    return DEMO_BUDGET_GPU if torch.cuda.is_available() else DEMO_BUDGET_CPU


def _cmd_demo(args: argparse.Namespace) -> int:
    from shear.demo import run_demo

    budget = {k: dict(v) for k, v in _demo_budget().items()}
    if args.prune_steps is not None:
        budget["prune"]["steps"] = args.prune_steps
    if args.train_steps is not None:
        budget["train"]["steps"] = args.train_steps
    r = run_demo(args.out, DEMO_TARGET, budget, data=args.data, num_workers=args.num_workers)
    print(f"demo folder:    {r['out']}")
    print(f"data:           {r['data']}")
    print(f"pruned model:   {r['pruned']}")
    print(f"final model:    {r['model']}")
    print(f"report:         {r['report']}")
    return 0


def doctor(build: bool = False, verbose: bool = False) -> dict[str, Any]:
    """Everything ``shear doctor`` reports, as a JSON-ready dict.

    Args:
        build: compile the C++ gather extension now if it is not built.
        verbose: show the compiler's output while building.

    Returns:
        ``{"torch", "python", "threads", "extension": {...}, "export_backend"}``.

    Raises:
        ShearError: ``build`` was asked and the extension cannot be built.
    """
    import platform

    import torch

    from shear.export import BACKEND_ENV
    from shear.extension import extension_status, load_extension

    if build:
        load_extension(build=True, verbose=verbose)
    status = extension_status()
    requested = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if requested == "torch":
        backend = "torch (requested)"
    elif status.available:
        backend = "cpp"
    elif status.can_build and requested in ("auto", "cpp"):
        backend = "cpp (after compiling the extension on first use)"
    else:
        backend = "torch (extension unavailable)"
        if requested == "cpp":
            backend = "error: the extension is unavailable"
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "extension": status.as_dict(),
        "export_backend": {"requested": requested, "uses": backend},
    }


def _format_doctor(r: dict[str, Any]) -> str:
    ext = r["extension"]
    if ext["available"]:
        state = f"built ({ext['origin']}): {ext['path']}"
    elif ext["can_build"]:
        state = f"not built; compiles on first use (about 30 s) into {ext['cache_dir']}"
    else:
        state = "unavailable"
    lines = [
        f"torch {r['torch']}, Python {r['python']}, {r['threads']} threads",
        f"C++ gather extension: {state}",
    ]
    if ext["reason"] and not ext["available"]:
        lines.append(f"  why: {ext['reason']}")
    lines += [
        f"  compiler: {ext['compiler']}",
        f"  ninja: {ext['ninja'] or 'not found'}",
        f"  source: {ext['source'] or 'not installed'}",
        f"export backend ({r['export_backend']['requested']}): {r['export_backend']['uses']}",
    ]
    return "\n".join(lines)


def _cmd_doctor(args: argparse.Namespace) -> int:
    r = doctor(args.build, args.verbose)
    print(json.dumps(r, indent=2) if args.json else _format_doctor(r))
    return 0


_TARGET_HELP = (
    "target: 'layers=24,hidden=384,heads=6,kv_heads=2,intermediate=1024' (unnamed sizes keep the "
    "source's), a config.json / model folder, or a budget: params=60M, prunable=40M or "
    "memory=1.2GB[,context=4096,batch=1] (bf16 weights + KV cache), with [,grid=64,candidates=6]"
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``shear`` command."""
    p = argparse.ArgumentParser(prog="shear", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pi = sub.add_parser("info", help="architecture, parameter counts and the masks a target needs")
    pi.add_argument("model", help="model folder, 'default' (SmolLM2-135M-Instruct) or a config.json")
    pi.add_argument("--target", help=_TARGET_HELP)
    pi.add_argument(
        "--types",
        nargs="+",
        choices=MASK_TYPES,
        help="mask types to learn (default: every dimension the target shrinks)",
    )
    pi.add_argument("--json", action="store_true", help="print one JSON object")
    pi.set_defaults(func=_cmd_info)

    data_help = (
        "data: a folder with one sub-folder or .txt/.jsonl/.parquet file per domain, or a saved "
        "Hugging Face dataset with 'text' and 'domain' columns"
    )
    pp = sub.add_parser("prune", help="learn masks to a target, then export the pruned model and a report")
    resume_help = (
        "continue the run in --out from its checkpoint, with its recorded options (options given "
        "again must equal them, except the session's and --num-workers, --device, --eval-interval, "
        "--checkpoint-interval)"
    )
    pp.add_argument(
        "--model",
        default=argparse.SUPPRESS,
        help="source: a model folder or 'default' (required unless --resume)",
    )
    pp.add_argument(
        "--target",
        default=argparse.SUPPRESS,
        help="target sizes, config or budget (the best-ranked candidate), as in shear info (required "
        "unless --resume)",
    )
    pp.add_argument("--data", default=argparse.SUPPRESS, help=data_help + " (required unless --resume)")
    pp.add_argument("--out", required=True, help="run folder (log, checkpoint, export, report)")
    pp.add_argument(
        "--types", nargs="+", choices=MASK_TYPES, default=argparse.SUPPRESS, help="mask types to learn"
    )
    pp.add_argument("--resume", action="store_true", help=resume_help)
    pp.add_argument(
        "--one-shot",
        action="store_true",
        help="no training: export the one-shot choice of activation importance (= --steps 0; the "
        "default recipe still refits it: --recipe one-shot exports the plain cut)",
    )
    pp.add_argument(
        "--no-export",
        action="store_true",
        help="skip the export and report at the end (`shear export` later)",
    )
    from shear.prune import PruneConfig
    from shear.trainer import TrainConfig

    _add_run_options(pp, PruneConfig, {})
    pp.set_defaults(func=_cmd_prune)

    pt = sub.add_parser(
        "train", help="continued pre-training with dynamic batch loading (e.g. of a pruned model)"
    )
    pt.add_argument(
        "--model",
        default=argparse.SUPPRESS,
        help="a model folder (e.g. a prune run's export/) or 'default' (required unless --resume)",
    )
    pt.add_argument("--data", default=argparse.SUPPRESS, help=data_help + " (required unless --resume)")
    pt.add_argument("--out", required=True, help="run folder (log, checkpoint, model/, report)")
    pt.add_argument("--resume", action="store_true", help=resume_help)
    pt.add_argument(
        "--no-export", action="store_true", help="skip saving the model and the report (`shear export` later)"
    )
    _add_run_options(pt, TrainConfig, {})
    pt.set_defaults(func=_cmd_train)

    pexp = sub.add_parser(
        "export",
        help="write a run's model from its checkpoint (after --no-export or --stop-after, or with "
        "another backend or shard size)",
    )
    pexp.add_argument("run_dir", help="the run folder of a `shear prune` or `shear train` run")
    pexp.add_argument(
        "--out", help="destination folder (default: RUN_DIR/export, or RUN_DIR/model for a training run)"
    )
    pexp.add_argument(
        "--backend",
        choices=("auto", "cpp", "torch"),
        help="how a pruned export writes its weights (default: auto; see shear doctor)",
    )
    pexp.add_argument("--max-shard-size", help="split the weights above this size, e.g. 2GB (default: 5GB)")
    pexp.set_defaults(func=_cmd_export)

    pr = sub.add_parser(
        "reference-losses", help="fit L(N) = a / N^b + c per domain and predict the losses at a target size"
    )
    pr.add_argument(
        "--points",
        nargs="+",
        help='JSON files of per-domain losses at one size each: {"params": N, "losses": {...}}, '
        '`shear eval --json` output, or one file with {"points": [...]}',
    )
    pr.add_argument(
        "--models", nargs="+", help="model folders to measure on --data (their sizes are counted)"
    )
    pr.add_argument("--data", help="data for --models (held-out split)")
    pr.add_argument(
        "--target",
        required=True,
        help="target size: a parameter count (1.3e9) or a model folder / config.json",
    )
    pr.add_argument("--out", help="also write the result to this JSON file (for --reference-losses)")
    pr.add_argument(
        "--seq-len", type=int, default=256, help="tokens per sequence for --models (default: 256)"
    )
    pr.add_argument(
        "--eval-sequences", type=int, default=4, help="held-out sequences per domain (default: 4)"
    )
    pr.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass (default: 4)")
    pr.set_defaults(func=_cmd_reference_losses)

    pdata = sub.add_parser("data", help="build data sets")
    dsub = pdata.add_subparsers(dest="data_command", required=True)
    pdd = dsub.add_parser(
        "default", help="build the default multi-domain corpus from Debian and PyPI packages (cached)"
    )
    pdd.add_argument("--out", default="data/default", help="corpus folder (default: data/default)")
    pdd.add_argument(
        "--max-mb-per-domain",
        type=float,
        default=4.0,
        help="cap per domain in MB of text, 0: none (default: 4)",
    )
    pdd.add_argument("--sources", nargs="+", help="only these sources (default: all)")
    pdd.set_defaults(func=_cmd_data)

    pe = sub.add_parser(
        "eval", help="per-domain perplexity on held-out data and/or lm-evaluation-harness tasks"
    )
    pe.add_argument(
        "model_path", nargs="?", metavar="MODEL",
        help="a model folder, 'default' or a shear run folder (its export; the results go into its report)",
    )  # fmt: skip
    pe.add_argument("--model", help="the same as MODEL")
    pe.add_argument("--data", help=data_help + " (per-domain perplexity)")
    pe.add_argument(
        "--tasks",
        help='lm-evaluation-harness tasks, e.g. arc_easy,piqa (needs pip install "shear[eval]"; '
        "offline, tasks over local files: --include-path)",
    )
    pe.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: the task's)")
    pe.add_argument("--limit", type=int, help="at most this many examples per task (default: all)")
    pe.add_argument("--include-path", help="a folder of extra task YAML files (e.g. local tasks)")
    pe.add_argument("--device", default="cpu", help="where the tasks run: cpu or cuda[:N] (default: cpu)")
    pe.add_argument("--out", help="also write the tasks' results to this JSON file")
    pe.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    pe.add_argument(
        "--eval-sequences", type=int, default=4, help="held-out sequences per domain (default: 4)"
    )
    pe.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass (default: 4)")
    pe.add_argument("--json", action="store_true", help="print one JSON object")
    pe.set_defaults(func=_cmd_eval)

    pd = sub.add_parser(
        "demo",
        help="the main job on the embedded default model: default corpus, prune (dynamic), continued "
        "pre-training (dynamic), export, per-domain evaluation, the one-shot baseline at equal tokens "
        "(about 10 minutes on CPU)",
    )
    pd.add_argument("--out", default="runs/demo", help="demo folder (default: runs/demo)")
    pd.add_argument("--data", help="data (default: the default corpus, built into OUT/data)")
    pd.add_argument("--prune-steps", type=int, help="pruning steps (default: the budget's)")
    pd.add_argument("--train-steps", type=int, help="continued pre-training steps (default: the budget's)")
    pd.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default: 0)")
    pd.set_defaults(func=_cmd_demo)

    px = sub.add_parser("doctor", help="is the C++ gather extension (fast export) built; the export backend")
    px.add_argument("--build", action="store_true", help="compile the extension now if it is not built")
    px.add_argument("--verbose", action="store_true", help="show the compiler's output with --build")
    px.add_argument("--json", action="store_true", help="print one JSON object")
    px.set_defaults(func=_cmd_doctor)

    pl = sub.add_parser("plan", help="per-rank memory of a run for DDP and FSDP, from the config alone")
    pl.add_argument("--model", required=True, help="model folder, 'default' or a config.json (no weights)")
    pl.add_argument("--target", help="pruning target, as in shear info (default: continued pre-training)")
    pl.add_argument("--data", help="with a budget --target: rank its candidates on this data (needs weights)")
    pl.add_argument(
        "--rank-steps", type=int, default=0, help="with --data: training steps per candidate before scoring"
    )
    pl.add_argument(
        "--rank-seq-len", type=int, default=256, help="with --data: tokens per sequence (default: 256)"
    )
    pl.add_argument("--world-size", type=int, default=1, help="number of ranks (default: 1)")
    pl.add_argument("--batch", type=int, default=4, help="sequences per micro-batch, global (default: 4)")
    pl.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (default: 4096)")
    pl.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step (default: 1)")
    pl.add_argument("--strategy", choices=("ddp", "fsdp", "both"), default="both", help="default: both")
    pl.add_argument("--activation-checkpointing", action="store_true", help="recompute layers in backward")
    pl.add_argument("--distill", action="store_true", help="a teacher (the source) beside the student")
    default_refit = RECIPES[DEFAULT_RECIPE]["refit_sequences"]
    refit_help = f"the refit at the cut on N sequences (with --target; 0: none; default: {default_refit})"
    pl.add_argument("--refit-sequences", type=int, default=default_refit, metavar="N", help=refit_help)
    pl.add_argument("--device-memory", default="80GB", help="memory per device, e.g. 80GB (default: 80GB)")
    pl.add_argument("--cpu", action="store_true", help="plan a CPU run (fp32 compute) instead of a GPU run")
    pl.add_argument("--json", action="store_true", help="print one JSON object")
    pl.set_defaults(func=_cmd_plan)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``shear`` console script.

    Returns:
        The exit status: 0 on success, 2 on bad input or a failed write, 1 on another
        operating-system error, 130 when interrupted.
    """
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ShearError as e:
        _close_progress_bars()
        print(f"shear: error: {clip(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # a write not put into words where it happened
        from shear.errors import describe_write_error

        _close_progress_bars()
        where = f" ({e.filename})" if e.filename else ""
        print(f"shear: error: {clip(describe_write_error(e) + where)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        _close_progress_bars()
        print(f"shear: interrupted{f'; {e}' if str(e) else ''}", file=sys.stderr)
        return 130


def _close_progress_bars() -> None:
    """End a run's progress bar, so that the error gets a line of its own."""
    std = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(std, "tqdm", None), "_instances", ())):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
