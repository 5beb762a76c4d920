"""Quality at equal training tokens: shear's pruning against the baselines a user would pick.

Every variant prunes the same source to the same target and trains on the same data with
the same batch, sequence length and evaluation; held-out perplexity per domain is read
after the pruning stage (P steps' tokens) and after continued pre-training (P + T steps'
tokens in all). Variants:

``one-shot``
    activation importance, no gradient step, no refit (``shear prune --one-shot``, Minitron's
    cut), then ``shear train``: P steps for the pruning-stage column, P + T steps for the
    final one.
``one-shot-staged``
    the one-shot export trained on shear's two-stage schedule: P steps of ``shear train``
    with the pruning stage's learning-rate schedule (held at its peak after the warm-up),
    then T steps of continued pre-training from that model on the next seed's data. With the
    masks frozen from the first step, ``importance`` differs from it only in training the
    masked full-size model: the control that separates what the masks add from what the
    schedule adds.
``paper``
    the paper's recipe: uniform mask initialisation, masks learned to the last step, LM
    loss, the paper's dynamic loading (eta 1, no floor); then T steps of ``shear train``
    with the same rule.
``importance``
    shear's default recipe (``importance-refit``, :mod:`shear.recipes`): masks initialised
    from importance and frozen from the first step (``--freeze-masks 1``), the kept weights
    refitted to the source on 128 training sequences (``--refit 0.3 --refit-sequences 128``),
    then T steps of ``shear train``.
``joint``
    (recipe ``joint``) masks initialised from importance and learned jointly with the weights for the first
    half of the pruning stage (``--freeze-masks 0.5``, log_alpha at 0.3), frozen after.
``search``
    40 steps of mask search on the calibration sequences, weights frozen
    (``--search-steps 40``, log_alpha at 0.1), then as ``importance`` from the searched choice.
``importance-fixed``
    as ``importance``, but continued pre-training with fixed (equal) domain weights: does
    dynamic loading beat fixed on the worst domain's gap?
``one-shot+distill``, ``importance+distill``
    as ``one-shot`` (final column only) and ``importance``, every stage with distillation
    from the source (``--distill-weight 0.5``).

Budgets are the CPU demo's (``shear demo``); ``--scale 4`` multiplies both stages' steps.
Each run lives in its own folder under ``--out`` and is skipped when already complete, so
an interrupted benchmark continues. Prints a markdown table (and writes ``results.json``)::

    python benchmarks/quality.py --out runs/quality [--scale 4] [--seeds 0 1 2]

One run per variant cannot separate differences of a few hundredths of a nat: the seed
moves the calibration rows, the data order and the sampled masks. ``--seeds`` repeats every
variant per seed (``out/seed-N``) and adds a summary: the mean loss per domain over the
seeds, and per seed on how many domains each variant beats the one-shot baseline.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from shear.checkpoint import write_text_atomic
from shear.cli import DEMO_BUDGET_CPU, DEMO_TARGET
from shear.prune import PruneConfig, run_prune
from shear.recipes import RECIPES
from shear.runfolder import LOG_FILE, RunLog
from shear.train import run_train
from shear.trainer import TrainConfig

VARIANTS = (
    "one-shot", "one-shot-staged", "paper", "importance", "joint", "search", "importance-fixed",
    "one-shot+distill", "importance+distill",
)  # fmt: skip
#: Distillation from the source in both stages: half LM loss, half KL.
DISTILL = dict(distill_weight=0.5)
#: The paper's dynamic batch loading (its recipe's, shear.recipes): step 1 on the loss gap, no floor.
PAPER_DYNAMIC = {k: RECIPES["paper"][k] for k in ("dynamic_eta", "min_domain_weight")}
#: Other ways of learning the masks from the importance choice (see the module docstring).
MASK_LEARNING = {"joint": dict(recipe="joint", lr_masks=0.3), "search": dict(recipe="search", lr_masks=0.1)}


def _prune(out: Path, common: dict[str, Any], **kw: Any) -> dict[str, Any]:
    if not (out / "evals.json").exists():  # else done; an interrupted run resumes
        run_prune(PruneConfig(out=str(out), resume=(out / "checkpoint.pt").exists(), **{**common, **kw}))
    evals = json.loads((out / "evals.json").read_text())
    steps = [r for r in RunLog(out / LOG_FILE, True).records() if "expected" in r]
    masks = None
    if steps:
        last = steps[-1]
        masks = {
            n: {"mean": last["expected"][n], "min": last["expected_min"][n], "max": last["expected_max"][n],
                "target": last["final_target"][n]}
            for n in last["expected"]
        }  # fmt: skip
    return {"eval": evals["exported"], "source": evals["source"], "masks": masks}


def _train(out: Path, model: Path, common: dict[str, Any], **kw: Any) -> dict[str, float]:
    if not (out / "evals.json").exists():
        run_train(TrainConfig(out=str(out), model=str(model), resume=(out / "checkpoint.pt").exists(),
                              **{**common, **kw}))  # fmt: skip
    return json.loads((out / "evals.json").read_text())["saved"]


def run_quality(
    out: str | Path,
    model: str = "default",
    data: str | None = None,
    target: str = DEMO_TARGET,
    scale: float = 1.0,
    variants: tuple[str, ...] = VARIANTS,
    eval_sequences: int = 16,
    overrides: dict[str, dict[str, Any]] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the variants and return their per-domain losses.

    Args:
        out: folder of the runs (each variant's stages in sub-folders).
        model: source model.
        data: data folder (default: the default corpus, built into ``out/data``).
        target: target architecture.
        scale: multiplies both stages' step counts (and evaluation intervals).
        variants: which of :data:`VARIANTS` to run.
        eval_sequences: held-out sequences per domain (the same for every run).
        overrides: ``{"prune": {...}, "train": {...}}`` options over the demo budget (tests).
        seed: the seed of every run (calibration rows, data order, sampled masks).

    Returns:
        ``{"tokens": {...}, "source": {...}, "variants": {name: {"pruned", "final", "masks"}}}``,
        losses in nats per domain; also written to ``out/results.json``.
    """
    out = Path(out)
    if data is None:
        from shear.corpus import build_default_corpus

        build_default_corpus(out / "data")
        data = str(out / "data")
    budget = {k: {**v, **(overrides or {}).get(k, {})} for k, v in DEMO_BUDGET_CPU.items()}
    for stage in budget.values():
        for key in ("steps", "eval_interval", "checkpoint_interval", "dynamic_interval"):
            stage[key] = max(1, round(stage[key] * scale))
    P, T = budget["prune"]["steps"], budget["train"]["steps"]
    base = dict(data=data, eval_sequences=eval_sequences, dynamic=True, seed=seed)
    prune_common = {**base, **budget["prune"], "model": model, "target": target}
    train_common = {**base, **budget["train"]}
    results: dict[str, Any] = {"seed": seed, "variants": {}}

    # the baseline a user would pick (Minitron's): the importance choice as cut, no refit
    one_shot = _prune(out / "one-shot" / "prune", prune_common, recipe="one-shot", steps=0)
    results["source"] = one_shot["source"]
    train_common["reference_losses"] = one_shot["source"]
    for name in variants:
        if name == "one-shot":
            export = out / "one-shot" / "prune" / "export"
            pruned = _train(out / name / f"train-{P}", export, train_common, steps=P)
            final = _train(out / name / f"train-{P + T}", export, train_common, steps=P + T)
            results["variants"][name] = {"pruned": pruned, "final": final, "masks": None}
            continue
        if name == "one-shot-staged":
            export = out / "one-shot" / "prune" / "export"
            schedule = {k: budget["prune"][k] for k in ("lr_warmup", "lr_weights", "min_lr_ratio")}
            first = out / name / f"train-{P}"
            pruned = _train(first, export, train_common, steps=P, **schedule)
            final = _train(out / name / "train", first / "model", {**train_common, "seed": seed + 1})
            results["variants"][name] = {"pruned": pruned, "final": final, "masks": None}
            continue
        if name == "one-shot+distill":  # the final column only: the costliest run of all
            export = out / "one-shot" / "prune" / "export"
            final = _train(out / name / f"train-{P + T}", export, train_common, steps=P + T, teacher=model,
                           **DISTILL)  # fmt: skip
            results["variants"][name] = {"pruned": None, "final": final, "masks": None}
            continue
        if name == "importance+distill":
            r = _prune(out / name / "prune", prune_common, **DISTILL)
            export = out / name / "prune" / "export"
            final = _train(out / name / "train", export, train_common, teacher=model, **DISTILL)
        elif name == "paper":
            r = _prune(out / name / "prune", prune_common, recipe="paper")
            export = out / name / "prune" / "export"
            final = _train(out / name / "train", export, train_common, **PAPER_DYNAMIC)
        elif name in MASK_LEARNING:
            r = _prune(out / name / "prune", prune_common, **MASK_LEARNING[name])
            final = _train(out / name / "train", out / name / "prune" / "export", train_common)
        elif name in ("importance", "importance-fixed"):
            r = _prune(out / "importance" / "prune", prune_common)
            final = _train(
                out / name / "train", out / "importance" / "prune" / "export", train_common,
                dynamic=name == "importance",
            )  # fmt: skip
        else:
            raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")
        results["variants"][name] = {"pruned": r["eval"], "final": final, "masks": r["masks"]}
    tokens = {k: v["batch_size"] * v["seq_len"] for k, v in budget.items()}
    stage_tokens = P * tokens["prune"]
    results["tokens"] = {"pruning stage": stage_tokens, "total": stage_tokens + T * tokens["train"]}
    write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    return results


def format_results(results: dict[str, Any]) -> str:
    """Markdown tables: perplexity per domain after each stage, and the masks vs their targets."""
    source = results["source"]
    domains = list(source)
    names = list(results["variants"])
    lines = []
    for stage, title in (("pruned", "pruning stage"), ("final", "total")):
        lines += [
            "",
            f"Perplexity per domain after {results['tokens'][title]:,} training tokens ({title}):",
            "",
            "| domain | source | " + " | ".join(names) + " |",
            "|---|---|" + "---|" * len(names),
        ]
        for d in domains:
            row = [results["variants"][n][stage] for n in names]
            row = [math.exp(v[d]) if v else None for v in row]
            best = min(v for v in row if v is not None)
            cells = ["-" if v is None else f"**{v:.2f}**" if v == best else f"{v:.2f}" for v in row]
            lines.append(f"| {d} | {math.exp(source[d]):.2f} | " + " | ".join(cells) + " |")
    gaps = {
        n: max(results["variants"][n]["final"][d] - source[d] for d in domains)
        for n in names
        if n.startswith("importance")
    }
    if gaps:
        lines += ["", "Worst domain's final loss gap to the source: "]
        lines += [", ".join(f"{n} {g:+.3f} nats" for n, g in gaps.items())]
    for n in names:
        masks = results["variants"][n]["masks"]
        if masks:
            lines += ["", f"Expected kept units per row at the end of pruning ({n}):", ""]
            lines += ["| mask | mean | min | max | target |", "|---|---|---|---|---|"]
            for m, r in masks.items():
                lines.append(f"| {m} | {r['mean']:.1f} | {r['min']:.1f} | {r['max']:.1f} | {r['target']} |")
    return "\n".join(lines)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate :func:`run_quality` results of several seeds.

    Args:
        runs: one result per seed, the same variants in each.

    Returns:
        ``{"seeds": [...], "mean": {variant: {stage: {domain: loss}}}, "wins": {variant: {stage:
        [domains beating one-shot, per seed]}}}``; a stage a variant lacks is ``None``, and
        ``wins`` is empty without the ``one-shot`` variant.
    """
    domains = list(runs[0]["source"])
    mean: dict[str, Any] = {}
    wins: dict[str, Any] = {}
    for name in runs[0]["variants"]:
        mean[name], wins[name] = {}, {}
        for stage in ("pruned", "final"):
            rows = [r["variants"][name][stage] for r in runs]
            if any(row is None for row in rows):
                mean[name][stage] = None
                continue
            mean[name][stage] = {d: sum(row[d] for row in rows) / len(rows) for d in domains}
            if name != "one-shot" and "one-shot" in runs[0]["variants"]:
                pairs = zip(rows, [r["variants"]["one-shot"][stage] for r in runs], strict=True)
                wins[name][stage] = [sum(row[d] < base[d] for d in domains) for row, base in pairs]
    return {"seeds": [r["seed"] for r in runs], "mean": mean, "wins": {n: w for n, w in wins.items() if w}}


def format_summary(summary: dict[str, Any], source: dict[str, float]) -> str:
    """Markdown: mean perplexity per domain over the seeds, and the wins against one-shot."""
    names = list(summary["mean"])
    lines = [f"Seeds {summary['seeds']}: perplexity of the mean loss per domain (pruning stage / total)", ""]
    lines += ["| domain | source | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for d in source:
        cells = []
        for n in names:
            stages = [summary["mean"][n][s] for s in ("pruned", "final")]
            cells.append(" / ".join("-" if v is None else f"{math.exp(v[d]):.2f}" for v in stages))
        lines.append(f"| {d} | {math.exp(source[d]):.2f} | " + " | ".join(cells) + " |")
    if summary["wins"]:
        lines += ["", f"Domains (of {len(source)}) on which each variant beats one-shot, per seed:", ""]
        for n, w in summary["wins"].items():
            lines.append(f"- {n}: " + "; ".join(f"{stage} {counts}" for stage, counts in w.items()))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/quality", help="folder of the runs")
    p.add_argument("--model", default="default", help="source model")
    p.add_argument("--data", help="data folder (default: the default corpus)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply both stages' steps (4: the 4x budget)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="one run of every variant per seed")
    args = p.parse_args()
    runs = []
    for seed in args.seeds:
        out = Path(args.out) if len(args.seeds) == 1 else Path(args.out) / f"seed-{seed}"
        variants = tuple(args.variants)
        runs.append(run_quality(out, args.model, args.data, scale=args.scale, variants=variants, seed=seed))
        print(f"\nseed {seed}:\n" + format_results(runs[-1]))
    if len(runs) > 1:
        summary = summarize(runs)
        write_text_atomic(Path(args.out) / "summary.json", json.dumps(summary, indent=2) + "\n")
        print("\n" + format_summary(summary, runs[0]["source"]))


if __name__ == "__main__":
    main()
