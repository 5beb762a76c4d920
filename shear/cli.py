"""The ``shear`` command line.

``shear info MODEL [--target TARGET] [--types T ...] [--json]``: architecture, parameter
counts and, with a target, the target's counts, the masks a run would learn and the
fractions it would prune. MODEL is a model folder, ``default`` or a bare config.json.

Errors in the input print one line (``shear: error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from shear.arch import Arch
from shear.errors import ShearError
from shear.masks import MASK_TYPES, plan_masks
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


def _cmd_info(args: argparse.Namespace) -> int:
    r = info(args.model, args.target, args.types)
    print(json.dumps(r, indent=2) if args.json else _format_info(r))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``shear`` command."""
    p = argparse.ArgumentParser(prog="shear", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pi = sub.add_parser("info", help="architecture, parameter counts and the masks a target needs")
    pi.add_argument("model", help="model folder, 'default' (SmolLM2-135M-Instruct) or a config.json")
    pi.add_argument(
        "--target",
        help="target: 'layers=24,hidden=384,heads=6,kv_heads=2,intermediate=1024' (unnamed sizes "
        "keep the source's) or a config.json / model folder",
    )
    pi.add_argument(
        "--types",
        nargs="+",
        choices=MASK_TYPES,
        help="mask types to learn (default: every dimension the target shrinks)",
    )
    pi.add_argument("--json", action="store_true", help="print one JSON object")
    pi.set_defaults(func=_cmd_info)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``shear`` console script.

    Returns:
        The exit status: 0 on success, 2 on bad input.
    """
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ShearError as e:
        print(f"shear: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
