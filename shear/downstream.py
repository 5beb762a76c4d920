"""Downstream tasks through lm-evaluation-harness (``shear eval MODEL --tasks ...``).

The harness is an optional dependency (``pip install "shear[eval]"``). shear loads the model
itself (no remote code, no hub), hands it to the harness's ``HFLM`` wrapper and keeps, per
task, every metric the harness reports under the harness's own name (``acc`` and
``acc_norm`` both, where a task has them) with its standard error, the task's version and
the harness's version.

The harness's stock tasks download their data from the Hugging Face Hub; offline, a task is
a YAML file in the harness's format over local files, found through ``--include-path``
(README: "Downstream tasks").
"""

from __future__ import annotations

import math
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from shear.errors import ShearError

#: File a downstream evaluation writes beside the model (a shear export) or into a run folder.
RESULTS_FILE = "downstream.json"


def require_harness() -> Any:
    """The ``lm_eval`` module.

    Raises:
        ShearError: lm-evaluation-harness is not installed (naming the extra that installs it).
    """
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401  (HFLM: a failure here is a broken install)
    except ImportError as e:
        raise ShearError(
            f'downstream tasks need lm-evaluation-harness: pip install "shear[eval]" ({e})'
        ) from None
    return lm_eval


def parse_tasks(text: str) -> list[str]:
    """``"arc_easy,piqa"`` -> ``["arc_easy", "piqa"]``; raises ShearError when empty."""
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise ShearError("--tasks: give task names separated by commas, e.g. arc_easy,piqa")
    return tasks


def _metrics(result: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """``{"acc,none": v, "acc_stderr,none": s}`` -> ``{"acc": {"value": v, "stderr": s}}``."""
    out: dict[str, dict[str, float | None]] = {}
    for key, value in result.items():
        name, comma, filt = key.partition(",")  # metrics are "name,filter"; "alias", "sample_len" are not
        if not comma or "_stderr" in name or not isinstance(value, int | float) or isinstance(value, bool):
            continue
        label = name if filt == "none" else key
        stderr = result.get(f"{name}_stderr,{filt}")
        stderr = float(stderr) if isinstance(stderr, int | float) and math.isfinite(stderr) else None
        out[label] = {"value": float(value), "stderr": stderr}
    return out


def evaluate_tasks(
    model: str | os.PathLike,
    tasks: list[str],
    num_fewshot: int | None = None,
    limit: int | None = None,
    include_path: str | None = None,
    batch_size: int = 8,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run harness tasks on a model folder.

    Args:
        model: a Hugging Face model folder (a source, a pruned export, a trained model) or
            ``default``.
        tasks: harness task names.
        num_fewshot: few-shot examples per prompt (None: each task's default).
        limit: at most this many examples per task (None: all).
        include_path: a folder of extra task YAML files (local tasks).
        batch_size: sequences per forward pass.
        device: where the model runs.

    Returns:
        ``{"model", "harness_version", "num_fewshot", "limit", "tasks": {name: {"version",
        "n_samples", "metrics": {metric: {"value", "stderr"}}}}}``.

    Raises:
        ShearError: the harness is missing, a task is unknown, or the model cannot be loaded.
    """
    lm_eval = require_harness()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from shear.loading import load_source

    if limit is not None and limit < 1:
        raise ShearError(f"--limit must be at least 1, got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise ShearError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    if include_path is not None and not Path(include_path).is_dir():
        raise ShearError(f"--include-path {include_path} is not a folder of task YAML files")
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ShearError(
            f"unknown task(s) {', '.join(unknown)}: not among the harness's tasks"
            + ("" if include_path else " (a local task's YAML needs --include-path)")
        )
    net, tokenizer = load_source(model, device=device)
    if tokenizer is None:
        raise ShearError(f"{model} has no tokenizer; downstream tasks need one")
    lm = HFLM(pretrained=net, tokenizer=tokenizer, batch_size=batch_size, device=device)
    raw = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
        log_samples=False, bootstrap_iters=1000,
    )  # fmt: skip
    results = raw["results"]
    return {
        "model": str(model),
        "harness_version": metadata.version("lm_eval"),
        "num_fewshot": num_fewshot,
        "limit": limit,
        "tasks": {
            t: {
                "version": raw.get("versions", {}).get(t),
                "n_samples": (raw.get("n-samples", {}).get(t) or {}).get("effective"),
                "metrics": _metrics(results[t]),
            }
            for t in tasks
            if t in results
        },
    }


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table: task, version, metric, value ± stderr, examples."""
    lines = ["| task | version | metric | value | stderr | examples |", "|---|---|---|---|---|---|"]
    for task, r in result["tasks"].items():
        for metric, m in r["metrics"].items():
            stderr = "n/a" if m["stderr"] is None else f"{m['stderr']:.4f}"
            lines.append(
                f"| {task} | {r['version']} | {metric} | {m['value']:.4f} | {stderr} | {r['n_samples']} |"
            )
    return "\n".join(lines)


#: Heading of the downstream section in a run's report.md (replaced on each evaluation).
REPORT_HEADING = "## Downstream tasks"


def report_section(result: dict[str, Any]) -> list[str]:
    """The report's downstream section: the harness's settings and the metric table."""
    shots = "each task's default" if result["num_fewshot"] is None else result["num_fewshot"]
    limit = "all" if result["limit"] is None else f"at most {result['limit']}"
    return [
        REPORT_HEADING,
        "",
        f"lm-evaluation-harness {result['harness_version']} on `{result['model']}`: few-shot {shots}, "
        f"{limit} examples per task (acc_norm: accuracy over length-normalised log-likelihoods).",
        "",
        format_table(result),
        "",
    ]


def model_of_run(run_dir: Path) -> Path | None:
    """The model a shear run folder wrote (``export/`` or ``model/``); None if ``run_dir`` is no
    run, or a run that has not written its model yet (loading it then says what to pass)."""
    from shear.runfolder import MODEL_FOLDER, run_task

    task = run_task(run_dir)
    model = None if task is None else run_dir / MODEL_FOLDER[task]
    return model if model is not None and model.is_dir() else None


def record_in_run(run_dir: Path, result: dict[str, Any]) -> Path:
    """Write ``downstream.json`` into a run folder and put its table in ``report.md`` (both atomically).

    Returns:
        The report's path.
    """
    import json

    from shear.checkpoint import write_text_atomic

    write_text_atomic(run_dir / RESULTS_FILE, json.dumps(result, indent=2) + "\n")
    report = run_dir / "report.md"
    text = report.read_text(encoding="utf-8") if report.is_file() else ""
    before, _, after = text.partition(REPORT_HEADING)  # an earlier evaluation's section goes
    text = before + (after[after.find("\n## ") + 1:] if "\n## " in after else "")
    before, options, after = text.partition("## Options")  # where the report puts it (shear.report)
    section = "\n".join(report_section(result)) + "\n"
    return write_text_atomic(report, before + ("\n" if before and not before.endswith("\n\n") else "")
                             + section + ("\n" + options + after if options else ""))
