"""report.md and PNG plots of a pruning run, from its JSONL log."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from shear.arch import Arch


def _plot_series(
    path: Path, title: str, series: dict[str, tuple[list[int], list[float]]], ylabel: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (x, y) in series.items():
        ax.plot(x, y, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_dims(path: Path, steps: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(steps[0]["expected"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), squeeze=False)
    x = [r["step"] for r in steps]
    for ax, n in zip(axes[0], names, strict=True):
        ax.plot(x, [r["expected"][n] for r in steps], label="expected kept")
        ax.plot(x, [r["target"][n] for r in steps], "--", label="target (warm-up)")
        ax.axhline(steps[0]["final_target"][n], color="gray", lw=0.8, label="final target")
        ax.set_title(n)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("units per row")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(out: Path, records: list[dict[str, Any]]) -> dict[str, Path]:
    """Write loss, dimensions and lambda plots; returns their paths by name."""
    steps = [r for r in records if "loss" in r]
    if not steps:
        return {}
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    x = [r["step"] for r in steps]
    paths = {"loss": plots / "loss.png", "dims": plots / "dims.png", "lambdas": plots / "lambdas.png"}
    evals = [r for r in records if "eval" in r]
    series = {"LM loss (train)": (x, [r["loss"] for r in steps])}
    for d in evals[0]["eval"] if evals else []:
        series[f"eval {d}"] = ([r["step"] for r in evals], [r["eval"][d] for r in evals])
    _plot_series(paths["loss"], "loss", series, "loss")
    _plot_dims(paths["dims"], steps)
    lam = {}
    for n in steps[0]["lambda_1"]:
        lam[f"lambda_1 {n}"] = (x, [r["lambda_1"][n] for r in steps])
        lam[f"lambda_2 {n}"] = (x, [r["lambda_2"][n] for r in steps])
    _plot_series(paths["lambdas"], "Lagrange multipliers", lam, "value")
    if "domain_weights" in steps[0] and len({json.dumps(r["domain_weights"]) for r in steps}) > 1:
        paths["domain_weights"] = plots / "domain_weights.png"
        series = {d: (x, [r["domain_weights"][d] for r in steps]) for d in steps[0]["domain_weights"]}
        _plot_series(paths["domain_weights"], "domain weights (dynamic batch loading)", series, "weight")
    return paths


def _ppl(loss: float | None) -> str:
    return "n/a" if loss is None else f"{math.exp(loss):.2f}"


def write_report(
    out: Path,
    cfg: Any,
    source: Arch,
    target: Arch,
    records: list[dict[str, Any]],
    source_eval: dict[str, float] | None,
    masked_eval: dict[str, float] | None,
    exported_eval: dict[str, float] | None,
) -> Path:
    """Write ``report.md`` (parameter counts, per-domain perplexity, plots) into ``out``.

    Returns:
        The report's path.
    """
    plots = write_plots(out, records)
    steps = [r for r in records if "loss" in r]
    lines = [
        "# Pruning report",
        "",
        f"Source `{cfg.model}` -> target `{cfg.target}`, data `{cfg.data}`, {cfg.steps} steps of "
        f"{cfg.batch_size} x {cfg.grad_accum} sequences x {cfg.seq_len} tokens.",
        "",
        "## Parameters",
        "",
        "| | layers | hidden | heads | kv heads | intermediate | prunable | total |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, a in (("source", source), ("pruned", target)):
        lines.append(
            f"| {name} | {a.layers} | {a.hidden} | {a.heads} | {a.kv_heads} | {a.intermediate} | "
            f"{a.prunable_params():,} | {a.total_params():,} |"
        )
    lines += [
        "",
        f"Kept {target.total_params() / source.total_params():.1%} of all parameters.",
        "",
        "## Perplexity per domain (held-out data)",
        "",
        "| domain | source | masked (deterministic masks) | exported |",
        "|---|---|---|---|",
    ]
    domains = list((masked_eval or source_eval or exported_eval or {}).keys())
    for d in domains:
        lines.append(
            f"| {d} | {_ppl((source_eval or {}).get(d))} | {_ppl((masked_eval or {}).get(d))} | "
            f"{_ppl((exported_eval or {}).get(d))} |"
        )
    if steps:
        last = steps[-1]
        lines += [
            "",
            "## Masks at the end",
            "",
            "| mask | expected kept per row | target | lambda_1 | lambda_2 |",
            "|---|---|---|---|---|",
        ]
        for n in last["expected"]:
            lines.append(
                f"| {n} | {last['expected'][n]:.1f} | {last['final_target'][n]} | "
                f"{last['lambda_1'][n]:+.3f} | {last['lambda_2'][n]:+.3f} |"
            )
        tps = sorted(r["tokens_per_s"] for r in steps)[len(steps) // 2]
        lines += ["", f"Median throughput: {tps:,.0f} tokens/s."]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{k}](plots/{p.name})" for k, p in plots.items()]
    lines += ["", "## Options", "", "```json", json.dumps(dataclasses.asdict(cfg), indent=2), "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
