"""``shear demo``: the whole method on the embedded default model and the default corpus.

1. the default multi-domain corpus (:mod:`shear.corpus`, cached);
2. pruning SmolLM2-135M-Instruct to the demo target with dynamic batch loading; the
   reference losses are the source's measured held-out losses (the documented fallback:
   no other sizes of the family are available offline to fit the scaling law);
3. continued pre-training of the exported model with dynamic batch loading against the
   same references;
4. the baseline a user would otherwise pick, at equal training tokens: the one-shot
   activation-importance choice (``shear prune --one-shot``) trained with the same
   continued pre-training for the steps of both stages;
5. per-domain evaluation of the source, the pruned, the final and the baseline model,
   ``report.md``.

Each stage is skipped when its report exists and resumed from its checkpoint when one
exists, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from shear.checkpoint import write_text_atomic
from shear.report import domain_weight_summary, weight_verdict
from shear.runfolder import LOG_FILE, RunLog


def _say(message: str) -> None:
    print(f"shear demo: {message}", file=sys.stderr, flush=True)


def run_demo(
    out: str | Path,
    target: str,
    budget: dict[str, dict[str, Any]],
    data: str | None = None,
    num_workers: int = 0,
    model: str = "default",
) -> dict[str, Any]:
    """Run (or continue) the demo.

    Args:
        out: the demo folder.
        target: the target architecture.
        budget: ``{"prune": {...}, "train": {...}}`` config overrides of the two stages.
        data: a data folder (default: the default corpus, built into ``out/data``).
        num_workers: DataLoader workers.
        model: the source model (default: the embedded SmolLM2-135M-Instruct).

    Returns:
        ``{"out", "data", "pruned", "model", "report"}``.
    """
    from shear.prune import PruneConfig, run_prune
    from shear.train import run_train
    from shear.trainer import TrainConfig

    out = Path(out)
    # bad budgets (e.g. --prune-steps 0) fail before any work
    PruneConfig(
        model=model, target=target, data="", out="", num_workers=num_workers, **budget["prune"]
    ).check()
    TrainConfig(model=model, data="", out="", num_workers=num_workers, **budget["train"]).check()
    if data is None:
        from shear.corpus import build_default_corpus, format_manifest

        _say(f"building the default corpus in {out / 'data'} (cached after the first run)")
        _say(format_manifest(build_default_corpus(out / "data", log=_say)))
        data = str(out / "data")

    prune_dir, train_dir = out / "prune", out / "train"
    one_shot_dir, baseline_dir = out / "baseline" / "one-shot", out / "baseline" / "train"
    if not (prune_dir / "report.md").exists():
        resume = (prune_dir / "checkpoint.pt").exists()
        _say(f"{'resuming' if resume else 'starting'} pruning to {target} (dynamic batch loading)")
        cfg = PruneConfig(model=model, target=target, data=data, out=str(prune_dir), resume=resume,
                          dynamic=True, num_workers=num_workers, **budget["prune"])  # fmt: skip
        run_prune(cfg)
    reference = json.loads((prune_dir / "reference_losses.json").read_text())

    def train(name: str, source: Path, folder: Path, steps: int) -> None:
        if (folder / "report.md").exists():
            return
        resume = (folder / "checkpoint.pt").exists()
        _say(f"{'resuming' if resume else 'starting'} {name} (dynamic batch loading)")
        cfg = TrainConfig(model=str(source), data=data, out=str(folder), resume=resume, dynamic=True,
                          reference_losses=reference, num_workers=num_workers,
                          **{**budget["train"], "steps": steps})  # fmt: skip
        run_train(cfg)

    train("continued pre-training", prune_dir / "export", train_dir, budget["train"]["steps"])
    if not (one_shot_dir / "report.md").exists():
        _say("baseline: one-shot activation-importance pruning")
        one_shot = {**budget["prune"], "steps": 0, "search_steps": 0, "refit": 0.0}  # as cut
        run_prune(PruneConfig(model=model, target=target, data=data, out=str(one_shot_dir),
                              num_workers=num_workers, **one_shot))  # fmt: skip
    # equal training tokens: the pruning stage's steps and the continued pre-training's
    equal = budget["prune"]["steps"] * _tokens(budget["prune"]) // _tokens(budget["train"])
    train("baseline: training the one-shot model", one_shot_dir / "export", baseline_dir,
          equal + budget["train"]["steps"])  # fmt: skip
    report = write_demo_report(out, model, target, data, prune_dir, train_dir, reference)
    return {
        "out": str(out),
        "data": data,
        "pruned": str(prune_dir / "export"),
        "model": str(train_dir / "model"),
        "report": str(report),
    }


def _tokens(stage: dict[str, Any]) -> int:
    """Training tokens per step of a stage's budget."""
    return stage.get("batch_size", 4) * stage.get("grad_accum", 1) * stage.get("seq_len", 256)


def _records(run: Path) -> list[dict[str, Any]]:
    return list(RunLog(run / LOG_FILE, True).records())


def write_demo_report(
    out: Path,
    model: str,
    target: str,
    data: str,
    prune_dir: Path,
    train_dir: Path,
    reference: dict[str, float],
) -> Path:
    """``out/report.md``: perplexity per domain at every stage and how the domain weights moved."""
    pe = json.loads((prune_dir / "evals.json").read_text())
    te = json.loads((train_dir / "evals.json").read_text())
    baseline = out / "baseline"
    oe = json.loads((baseline / "one-shot" / "evals.json").read_text())
    be = json.loads((baseline / "train" / "evals.json").read_text())
    cols = {
        "reference": reference,
        "source": pe["source"],
        "pruned (exported)": pe["exported"],
        "after continued pre-training": te["saved"],
        "baseline: one-shot": oe["exported"],
        "baseline: one-shot + equal-token training": be["saved"],
    }
    name = "SmolLM2-135M-Instruct" if model == "default" else model
    lines = [
        "# shear demo",
        "",
        f"{name} pruned to `{target}`, then continued pre-training, both with dynamic "
        f"batch loading, on `{data}`. Reference losses: the source's measured held-out losses. "
        "The baseline keeps the one-shot activation-importance choice and trains it with the same "
        "continued pre-training for as many tokens as both stages used.",
        "",
        "## Perplexity per domain (held-out data)",
        "",
        "| domain | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for d in reference:
        lines.append(f"| {d} | " + " | ".join(f"{math.exp(c[d]):.2f}" for c in cols.values()) + " |")
    for title, run in (("Pruning", prune_dir), ("Continued pre-training", train_dir)):
        s = domain_weight_summary(_records(run))
        lines += ["", f"## {title}: domain weights", ""]
        if s is None:
            lines.append("No reference losses were logged.")
            continue
        lines += ["| domain | mean loss gap | weight at start | weight at end |", "|---|---|---|---|"]
        for d, r in s["domains"].items():
            lines.append(f"| {d} | {r['gap_mean']:+.3f} | {r['weight_start']:.3f} | {r['weight_end']:.3f} |")
        lines += [
            "",
            weight_verdict(s),
            f"Details: [{run.name}/report.md]({run.name}/report.md) and its plots.",
        ]
    return write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
