"""report.md and PNG plots of a pruning or continued pre-training run, from its JSONL log.

Both reports show how dynamic batch loading behaved: the domain weights over time and each
domain's held-out loss minus its reference loss (the paper's figures 5 and 7), and a table
that says whether the weights moved toward the domains furthest above their reference.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path
from typing import Any

from shear.arch import Arch
from shear.checkpoint import write_bytes_atomic, write_text_atomic
from shear.downstream import RESULTS_FILE, report_section
from shear.errors import ShearError


def _save(fig: Any, path: Path) -> None:
    """Write a figure as PNG atomically (a full disk leaves the previous plot, or none)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


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
    _save(fig, path)


def _plot_dims(path: Path, steps: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(steps[0]["expected"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), squeeze=False)
    x = [r["step"] for r in steps]
    for ax, n in zip(axes[0], names, strict=True):
        ax.plot(x, [r["expected"][n] for r in steps], label="expected kept (mean over rows)")
        if "expected_min" in steps[0]:
            lo, hi = [r["expected_min"][n] for r in steps], [r["expected_max"][n] for r in steps]
            ax.fill_between(x, lo, hi, alpha=0.25, label="min-max over rows")
        ax.plot(x, [r["target"][n] for r in steps], "--", label="target (warm-up)")
        ax.axhline(steps[0]["final_target"][n], color="gray", lw=0.8, label="final target")
        ax.set_title(n)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("units per row")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def write_plots(out: Path, records: list[dict[str, Any]]) -> dict[str, Path]:
    """Write the run's plots into ``out/plots``; returns their paths by name.

    Always the loss; with dynamic batch loading the domain weights and the loss gaps; for
    pruning also the kept dimensions and the Lagrange multipliers.
    """
    steps = [r for r in records if "loss" in r]
    if not steps:
        return {}
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    try:
        _plot_all(plots, records, steps, paths)
    except ShearError as e:  # say which plots are there: the ones before the failed one
        written = ", ".join(p.name for p in list(paths.values())[:-1]) or "none"
        raise ShearError(f"{e}; plots written before it: {written}; report.md was not written") from e
    return paths


def _plot_all(
    plots: Path, records: list[dict[str, Any]], steps: list[dict[str, Any]], paths: dict[str, Path]
) -> None:
    """Write each plot of :func:`write_plots`, entering its path in ``paths`` before writing it."""
    x = [r["step"] for r in steps]
    paths["loss"] = plots / "loss.png"
    evals = [r for r in records if r.get("eval")]
    series = {"LM loss (train)": (x, [r["loss"] for r in steps])}
    for d in evals[0]["eval"] if evals else []:
        series[f"eval {d}"] = ([r["step"] for r in evals], [r["eval"][d] for r in evals])
    _plot_series(paths["loss"], "loss", series, "loss")
    if "expected" in steps[0]:
        paths["dims"] = plots / "dims.png"
        _plot_dims(paths["dims"], steps)
    if "lambda_1" in steps[0]:
        paths["lambdas"] = plots / "lambdas.png"
        lam = {}
        for n in steps[0]["lambda_1"]:
            lam[f"lambda_1 {n}"] = (x, [r["lambda_1"][n] for r in steps])
            lam[f"lambda_2 {n}"] = (x, [r["lambda_2"][n] for r in steps])
        _plot_series(paths["lambdas"], "Lagrange multipliers", lam, "value")
    if "domain_weights" in steps[0] and len({json.dumps(r["domain_weights"]) for r in steps}) > 1:
        paths["domain_weights"] = plots / "domain_weights.png"
        series = {d: (x, [r["domain_weights"][d] for r in steps]) for d in steps[0]["domain_weights"]}
        _plot_series(paths["domain_weights"], "domain weights (dynamic batch loading)", series, "weight")
    gaps = [r for r in evals if r.get("reference")]
    if gaps:
        paths["loss_gap"] = plots / "loss_gap.png"
        series = {
            d: ([r["step"] for r in gaps], [r["eval"][d] - r["reference"][d] for r in gaps])
            for d in gaps[0]["eval"]
        }
        _plot_series(paths["loss_gap"], "held-out loss minus reference loss", series, "loss gap (nats)")


def domain_weight_summary(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Per domain: reference, loss gap at the first and last evaluation, weight at start and end.

    Returns:
        ``{"domains": {d: {...}}, "largest_gap", "largest_gain"}`` (the domain with the largest
        mean gap over the evaluations, the one whose weight grew most), or None without
        reference losses in the log.
    """
    steps = [r for r in records if "loss" in r]
    gaps = [r for r in records if r.get("eval") and r.get("reference")]
    if not steps or not gaps:
        return None
    first_w, last_w = steps[0]["domain_weights"], steps[-1]["domain_weights"]
    rows = {}
    for d in gaps[0]["eval"]:
        g = [r["eval"][d] - r["reference"][d] for r in gaps]
        rows[d] = {
            "reference": gaps[-1]["reference"][d],
            "gap_first": g[0],
            "gap_last": g[-1],
            "gap_mean": sum(g) / len(g),
            "weight_start": first_w[d],
            "weight_end": last_w[d],
        }
    gain = max(rows, key=lambda d: rows[d]["weight_end"] - rows[d]["weight_start"])
    moved = rows[gain]["weight_end"] - rows[gain]["weight_start"] > 1e-9
    return {
        "domains": rows,
        "largest_gap": max(rows, key=lambda d: rows[d]["gap_mean"]),
        "largest_gain": gain if moved else None,
    }


def weight_verdict(summary: dict[str, Any]) -> str:
    """One sentence: did the weights move toward the domain furthest above its reference?"""
    top, gain = summary["largest_gap"], summary["largest_gain"]
    if gain is None:
        return f"Furthest above its reference on average: **{top}**; the domain weights did not change."
    verdict = "the same domain" if top == gain else f"not the same domain: {gain} gained the most"
    return f"Furthest above its reference on average: **{top}**; largest weight gain: **{gain}** ({verdict})."


def _domain_lines(records: list[dict[str, Any]]) -> list[str]:
    summary = domain_weight_summary(records)
    if summary is None:
        return []
    lines = [
        "",
        "## Dynamic batch loading",
        "",
        "| domain | reference loss | gap, first eval | gap, last eval | weight at start | weight at end |",
        "|---|---|---|---|---|---|",
    ]
    for d, r in summary["domains"].items():
        lines.append(
            f"| {d} | {r['reference']:.3f} | {r['gap_first']:+.3f} | {r['gap_last']:+.3f} | "
            f"{r['weight_start']:.3f} | {r['weight_end']:.3f} |"
        )
    return lines + ["", weight_verdict(summary)]


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
        f"Recipe `{cfg.recipe}` ({', '.join(f'{n} {v}' for n, v in cfg.recipe_record()['options'].items())}; "
        "shear.recipes).",
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
    ]
    lines += _ppl_table(
        {"source": source_eval, "masked (deterministic masks)": masked_eval, "exported": exported_eval}
    )
    lines += _domain_lines(records)
    if steps:
        last = steps[-1]
        lines += [
            "",
            "## Masks at the end",
            "",
            "| mask | expected kept per row: mean | min | max | target | lambda_1 | lambda_2 |",
            "|---|---|---|---|---|---|---|",
        ]
        lo, hi = last.get("expected_min", {}), last.get("expected_max", {})
        for n in last["expected"]:
            lines.append(
                f"| {n} | {last['expected'][n]:.1f} | {lo.get(n, float('nan')):.1f} | "
                f"{hi.get(n, float('nan')):.1f} | {last['final_target'][n]} | "
                f"{last['lambda_1'][n]:+.3f} | {last['lambda_2'][n]:+.3f} |"
            )
    return _finish(out, cfg, lines, steps, plots)


def _ppl_table(columns: dict[str, dict[str, float] | None]) -> list[str]:
    """The perplexity-per-domain table, one column per evaluation."""
    lines = ["", "## Perplexity per domain (held-out data)", ""]
    lines += ["| domain | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    domains = next((list(c) for c in columns.values() if c), [])
    for d in domains:
        lines.append(f"| {d} | " + " | ".join(_ppl((c or {}).get(d)) for c in columns.values()) + " |")
    return lines


def _finish(out: Path, cfg: Any, lines: list[str], steps: list[dict], plots: dict[str, Path]) -> Path:
    if steps:
        tps = sorted(r["tokens_per_s"] for r in steps)[len(steps) // 2]
        lines += ["", f"Median throughput: {tps:,.0f} tokens/s."]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{k}](plots/{p.name})" for k, p in plots.items()]
    downstream = out / RESULTS_FILE  # `shear eval RUN --tasks` ran on an earlier export: keep its table
    if downstream.is_file():
        lines += ["", *report_section(json.loads(downstream.read_text(encoding="utf-8")))]
    lines += ["", "## Options", "", "```json", json.dumps(dataclasses.asdict(cfg), indent=2), "```", ""]
    return write_text_atomic(out / "report.md", "\n".join(lines))


def write_train_report(
    out: Path,
    cfg: Any,
    records: list[dict[str, Any]],
    initial_eval: dict[str, float] | None,
    final_eval: dict[str, float] | None,
    saved_eval: dict[str, float] | None,
    reference: dict[str, float] | None,
) -> Path:
    """Write ``report.md`` of a continued pre-training run (perplexity, domain weights, plots).

    Returns:
        The report's path.
    """
    plots = write_plots(out, records)
    steps = [r for r in records if "loss" in r]
    mode = f"dynamic batch loading ({cfg.dynamic_rule} rule, every {cfg.dynamic_interval} steps)"
    lines = [
        "# Continued pre-training report",
        "",
        f"Model `{cfg.model}`, data `{cfg.data}`, {cfg.steps} steps of {cfg.batch_size} x "
        f"{cfg.grad_accum} sequences x {cfg.seq_len} tokens, "
        f"{mode if cfg.dynamic else 'fixed domain weights'}.",
    ]
    columns = {"start": initial_eval, "end": final_eval, "saved model": saved_eval}
    if reference:
        columns = {"reference": reference, **columns}
    lines += _ppl_table(columns)
    lines += _domain_lines(records)
    return _finish(out, cfg, lines, steps, plots)
