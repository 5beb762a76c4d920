"""The model card (README.md in the Hugging Face format) that every shear export carries.

The card is YAML front matter (library, pipeline, tags, base model, and a ``model-index``
with the downstream metrics once ``shear eval --tasks`` ran on the folder) and a body: the
source, the architecture and parameters, the recipe (the run's options), the tokens the run
trained on, per-domain perplexity when the run measured it, and the downstream table. The
facts behind it live in ``shear_card.json`` beside it, so a later evaluation adds to the
card instead of guessing at its text; both files are written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import yaml

from shear.checkpoint import write_text_atomic

CARD_FILE = "README.md"
FACTS_FILE = "shear_card.json"
#: The hub id of ``default`` (shear.default_model), for the card's ``base_model``.
DEFAULT_SOURCE = "HuggingFaceTB/SmolLM2-135M-Instruct"
#: Options a card's recipe leaves out: where things were, not how the model was made.
_NOT_RECIPE = ("out", "resume", "export", "stop_after", "num_workers", "device", "model", "data")


def write_card(
    folder: str | os.PathLike, cfg: Any, steps: int, perplexity: dict[str, float] | None = None
) -> Path:
    """Write the card of a run's export (a run adds the perplexity with :func:`update_card` once measured).

    Args:
        folder: the exported model folder.
        cfg: the run's config (``PruneConfig`` or ``TrainConfig``).
        steps: the optimiser steps the exported weights trained for.
        perplexity: held-out loss per domain of these weights, when known.
    """
    from shear.arch import Arch
    from shear.loading import load_config

    arch = Arch.from_config(load_config(folder))
    options = dataclasses.asdict(cfg)
    facts = {
        "task": cfg.TASK,
        "source": DEFAULT_SOURCE if cfg.model == "default" else str(cfg.model),
        "data": str(cfg.data),
        "architecture": {k: v for k, v in arch.summary().items() if k != "params"},
        "params": arch.summary()["params"],
        "budget": options.get("budget"),
        "recipe": {k: v for k, v in options.items() if k not in _NOT_RECIPE and v is not None},
        "steps": steps,
        "tokens_seen": steps * cfg.batch_size * cfg.grad_accum * cfg.seq_len,
        "perplexity": perplexity,
        "downstream": None,
    }
    return _write(Path(folder), facts)


def update_card(folder: str | os.PathLike, **changes: Any) -> Path | None:
    """Add facts (``perplexity={domain: loss}``, ``downstream=...``) to a shear export's card.

    Returns:
        The card's path, or None when the folder has no shear card (not a shear export).
    """
    path = Path(folder) / FACTS_FILE
    if not path.is_file():
        return None
    facts = json.loads(path.read_text(encoding="utf-8"))
    facts.update(changes)
    return _write(Path(folder), facts)


def _write(folder: Path, facts: dict[str, Any]) -> Path:
    write_text_atomic(folder / FACTS_FILE, json.dumps(facts, indent=2) + "\n")
    # named after the source, not the folder: the card reads the same wherever the model is written
    name = f"{Path(facts['source']).name}-{'pruned' if facts['task'] == 'prune' else 'trained'}"
    return write_text_atomic(folder / CARD_FILE, render(facts, name))


def _front_matter(facts: dict[str, Any], name: str) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["shear", "pruned" if facts["task"] == "prune" else "continued-pretraining", "sheared-llama"],
    }
    if not os.path.isabs(facts["source"]) and not facts["source"].startswith("."):
        meta["base_model"] = facts["source"]  # a hub id; a local path means nothing to a reader
    downstream = facts.get("downstream")
    if downstream:
        meta["model-index"] = [{
            "name": name,
            "results": [
                {
                    "task": {"type": "text-generation"},
                    "dataset": {"name": task, "type": task},
                    "metrics": [
                        {"type": metric, "value": round(m["value"], 6), "name": metric,
                         "verified": False}  # fmt: skip
                        for metric, m in r["metrics"].items()
                    ],
                }
                for task, r in downstream["tasks"].items()
            ],
        }]  # fmt: skip
    return meta


def render(facts: dict[str, Any], name: str) -> str:
    """The card's text from its facts."""
    from shear.downstream import format_table

    a, p = facts["architecture"], facts["params"]
    made = "pruned with" if facts["task"] == "prune" else "trained (continued pre-training) with"
    lines = [
        "---",
        yaml.safe_dump(_front_matter(facts, name), sort_keys=False).rstrip(),
        "---",
        "",
        f"# {name}",
        "",
        f"`{facts['source']}` {made} shear (Sheared-LLaMA structured pruning) on `{facts['data']}`.",
        "",
        "## Architecture",
        "",
        f"{a['architecture']}: {a['layers']} layers, hidden {a['hidden']}, {a['heads']} heads in "
        f"{a['kv_heads']} KV groups (head dimension {a['head_dim']}), intermediate {a['intermediate']}, "
        f"vocabulary {a['vocab']}{', tied embeddings' if a['tied'] else ''}.",
        "",
        f"Parameters: {p['total']:,} in all, {p['prunable']:,} in the attention and MLP projections.",
    ]
    if facts.get("budget"):
        lines += ["", f"The architecture is the best-ranked candidate under the budget `{facts['budget']}`."]
    lines += [
        "",
        "## Recipe",
        "",
        f"{facts['steps']} optimiser steps, {facts['tokens_seen']:,} training tokens "
        f"(steps x batch size x gradient accumulation x sequence length). The run's options:",
        "",
        "```json",
        json.dumps(facts["recipe"], indent=2),
        "```",
    ]
    if facts.get("perplexity"):
        lines += ["", "## Per-domain perplexity (held out, token level)", "",
                  "| domain | perplexity | loss |", "|---|---|---|"]  # fmt: skip
        lines += [f"| {d} | {math.exp(v):.2f} | {v:.4f} |" for d, v in facts["perplexity"].items()]
    if facts.get("downstream"):
        r = facts["downstream"]
        lines += ["", "## Downstream tasks (lm-evaluation-harness)", "",
                  f"lm-evaluation-harness {r['harness_version']}, few-shot "
                  f"{'default' if r['num_fewshot'] is None else r['num_fewshot']}, "
                  f"{'all' if r['limit'] is None else 'at most ' + str(r['limit'])} examples per task.",
                  "", format_table(r)]  # fmt: skip
    return "\n".join(lines) + "\n"
