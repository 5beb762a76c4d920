"""Targets from a budget: enumerate the uniform architectures under it, then rank them.

A budget is a target specification whose first key is one of:

* ``params=60M``: total parameters (embedding and LM head included, as ``shear info`` counts);
* ``prunable=40M``: the parameters the masks act on (attention and MLP projections);
* ``memory=1.2GB``: bf16 weights plus the bf16 KV cache of ``batch`` sequences of
  ``context`` tokens (``memory=1.2GB,context=4096,batch=1``, those are the defaults).

Further keys: ``grid=64`` (hidden and intermediate sizes are multiples of it, or the
source's own size) and ``candidates=6`` (how many are ranked).

The candidates (:func:`enumerate_candidates`) are uniform targets valid by today's rules
(:func:`shear.target.check_target`: GQA layout, hidden divisible by heads, vocabulary and
tying kept). The attention keeps the source's share of the width (heads scale with hidden,
each KV group keeping as many query heads as the source's where it can); every layer count
and hidden size on the grid is paired with the largest intermediate size under the budget,
and a candidate another candidate contains in every dimension is dropped. ``candidates``
of the rest, spread evenly over depth and width, are ranked (:func:`rank_candidates`) by
the mean held-out loss after the one-shot importance cut and the least-squares refit on the
calibration sequences (:mod:`shear.importance`, :mod:`shear.refit`), optionally after a few
training steps of each candidate (``--rank-steps``). Lower is better.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import torch

from shear.arch import Arch
from shear.errors import ShearError
from shear.target import check_target

#: The budget keys, each naming what :meth:`Budget.cost` counts.
BUDGET_KINDS = ("params", "prunable", "memory")
#: The refit's damping when ranking (the demo's; shear.refit).
RANK_REFIT = 0.3
_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def is_budget(spec: Any) -> bool:
    """Whether a target specification is a budget (``params=``, ``prunable=`` or ``memory=``)."""
    return isinstance(spec, str) and spec.strip().lower().split("=")[0].strip() in BUDGET_KINDS


def parse_count(text: str) -> int:
    """``60M`` -> 60_000_000; ``1.3B``, ``1.3e9``, ``500K`` too."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([KMBGT]?)\s*", text, re.IGNORECASE)
    if not m:
        raise ShearError(f"not a parameter count: {text!r} (e.g. 60M, 1.3B)")
    return int(float(m.group(1)) * _SUFFIX[m.group(2).upper()])


@dataclass(frozen=True)
class Budget:
    """A budget target (module docstring)."""

    kind: str
    limit: int
    context: int = 4096
    batch: int = 1
    grid: int = 64
    candidates: int = 6

    def cost(self, arch: Arch) -> int:
        """What the budget limits, for ``arch``: parameters or bytes."""
        if self.kind == "params":
            return arch.total_params()
        if self.kind == "prunable":
            return arch.prunable_params()
        return memory_bytes(arch, self.context, self.batch)

    def text(self) -> str:
        """The budget as the user would write it."""
        limit = f"{self.limit / 1e9:g}GB" if self.kind == "memory" else f"{self.limit / 1e6:g}M"
        kv = f",context={self.context},batch={self.batch}" if self.kind == "memory" else ""
        return f"{self.kind}={limit}{kv},grid={self.grid},candidates={self.candidates}"


def parse_budget(text: str) -> Budget:
    """Read ``params=60M``, ``prunable=40M`` or ``memory=1.2GB,context=4096,batch=1`` (plus grid, candidates).

    Raises:
        ShearError: an unknown key, a bad number, or context/batch on a parameter budget.
    """
    from shear.plan import parse_memory

    items = [p.strip() for p in text.split(",") if p.strip()]
    kind, _, value = items[0].partition("=")
    kind = kind.strip().lower()
    fields: dict[str, int] = {"limit": parse_memory(value) if kind == "memory" else parse_count(value)}
    for item in items[1:]:
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in ("context", "batch", "grid", "candidates"):
            raise ShearError(
                f"cannot read budget item {item!r}: after {kind}= give context=, batch= (memory only), "
                "grid= or candidates="
            )
        if key in ("context", "batch") and kind != "memory":
            raise ShearError(f"{key}= belongs to a memory budget (the KV cache), not to {kind}=")
        try:
            fields[key] = int(value)
        except ValueError:
            raise ShearError(f"budget {key} must be an integer, got {value.strip()!r}") from None
        if fields[key] <= 0:
            raise ShearError(f"budget {key} must be positive, got {fields[key]}")
    if fields["limit"] <= 0:
        raise ShearError(f"the budget must be positive, got {items[0]!r}")
    return Budget(kind=kind, **fields)


def memory_bytes(arch: Arch, context: int, batch: int) -> int:
    """bf16 weights plus the bf16 KV cache (keys and values) of ``batch`` x ``context`` tokens."""
    kv_cache = 2 * arch.layers * arch.kv_heads * arch.head_dim * context * batch
    return 2 * (arch.total_params() + kv_cache)


def _grid(size: int, step: int) -> list[int]:
    """Multiples of ``step`` up to ``size``, and ``size`` itself, ascending."""
    return sorted({*range(step, size + 1, step), size})


def _attention(source: Arch, hidden: int) -> tuple[int, int] | None:
    """(heads, kv_heads) for a hidden size: the source's share of the width, a valid GQA layout."""
    for heads in range(max(1, source.heads * hidden // source.hidden), 0, -1):
        if source.model_type == "llama" and hidden % heads:
            continue
        per_group = source.heads_per_group
        groups = [g for g in range(1, source.kv_heads + 1) if heads % g == 0 and heads // g <= per_group]
        if groups:  # as many query heads per group as the source where it can
            return heads, min(groups, key=lambda g: (abs(heads // g - source.heads_per_group), -g))
    return None


def enumerate_candidates(source: Arch, budget: Budget) -> list[Arch]:
    """The uniform targets under the budget that no other candidate contains (module docstring).

    Returns:
        Candidates sorted by (layers, hidden); the source itself is never one.

    Raises:
        ShearError: nothing valid fits the budget.
    """
    found: list[Arch] = []
    for hidden in _grid(source.hidden, budget.grid):
        attention = _attention(source, hidden)
        if attention is None:
            continue
        heads, kv = attention
        for layers in range(1, source.layers + 1):
            fitting = [
                a for i in _grid(source.intermediate, budget.grid)
                if budget.cost(a := source.replace(layers=layers, hidden=hidden, heads=heads, kv_heads=kv,
                                                   intermediate=i)) <= budget.limit
            ]  # fmt: skip
            if fitting and fitting[-1] != source:
                check_target(source, fitting[-1])
                found.append(fitting[-1])
    dims = ("layers", "hidden", "heads", "kv_heads", "intermediate")
    kept = [
        a for a in found
        if not any(b != a and all(getattr(b, d) >= getattr(a, d) for d in dims) for b in found)
    ]  # fmt: skip
    if not kept:
        raise ShearError(
            f"no uniform target of the source fits {budget.text()} (the smallest has "
            f"{source.replace(layers=1, hidden=min(budget.grid, source.hidden), intermediate=min(budget.grid, source.intermediate)).total_params():,} parameters)"  # noqa: E501
        )
    return sorted(kept, key=lambda a: (a.layers, a.hidden))


def shortlist(candidates: list[Arch], count: int) -> list[Arch]:
    """``count`` candidates spread evenly over the list (sorted by depth, then width)."""
    if len(candidates) <= count:
        return list(candidates)
    if count == 1:
        return [max(candidates, key=Arch.total_params)]
    return [candidates[round(i * (len(candidates) - 1) / (count - 1))] for i in range(count)]


def target_text(arch: Arch) -> str:
    """A target string that :func:`shear.target.resolve_target` reads back as ``arch``."""
    return (
        f"layers={arch.layers},hidden={arch.hidden},heads={arch.heads},kv_heads={arch.kv_heads},"
        f"intermediate={arch.intermediate}"
    )


def candidate_rows(budget: Budget, candidates: list[Arch], scores: list[float] | None = None) -> list[dict]:
    """The candidate table as JSON-ready rows (ranked best first when there are scores)."""
    rows = [
        {
            "target": target_text(a),
            "layers": a.layers, "hidden": a.hidden, "heads": a.heads, "kv_heads": a.kv_heads,
            "intermediate": a.intermediate, "params": a.total_params(), "prunable": a.prunable_params(),
            "memory": memory_bytes(a, budget.context, budget.batch),
            "score": None if scores is None else scores[i],
        }  # fmt: skip
        for i, a in enumerate(candidates)
    ]
    return rows if scores is None else sorted(rows, key=lambda r: r["score"])


def format_rows(budget: Budget, rows: list[dict]) -> str:
    """The candidate table as text (score: mean held-out loss after cut + refit; lower is better)."""
    mem = f"memory@{budget.context}x{budget.batch}"
    head = f"{'layers':>6}{'hidden':>7}{'heads':>6}{'kv':>4}{'interm.':>8}{'params':>14}{mem:>18}{'score':>8}"
    lines = [head]
    for r in rows:
        score = "-" if r["score"] is None else f"{r['score']:.4f}"
        lines.append(
            f"{r['layers']:>6}{r['hidden']:>7}{r['heads']:>6}{r['kv_heads']:>4}{r['intermediate']:>8}"
            f"{r['params']:>14,}{r['memory'] / 1e9:>16.3f}GB{score:>8}"
        )
    return "\n".join(lines)


def _train(model: torch.nn.Module, batches: list[torch.Tensor], lr: float) -> None:
    """A few AdamW steps of the LM loss on ``batches`` (the masks fixed by the caller)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for batch in batches:
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    model.eval()


def score_candidate(
    model: torch.nn.Module,
    source: Arch,
    target: Arch,
    scores: dict[str, torch.Tensor],
    calibration: torch.Tensor,
    eval_sets: dict[str, torch.Tensor],
    batch_size: int,
    train_batches: list[torch.Tensor] = (),  # type: ignore[assignment]
    lr: float = 3e-4,
) -> float:
    """Mean held-out loss of one candidate after the importance cut, the refit and ``train_batches`` steps.

    Args:
        model: the source model (left unchanged: the candidate works on a copy).
        scores: activation importance of the source (:func:`shear.importance.activation_importance`).
        calibration: ``[n, seq_len]`` sequences the refit fits on.
        eval_sets: held-out sequences per domain.
    """
    from shear.evaluation import domain_losses
    from shear.importance import init_from_importance, keep_indicators
    from shear.masks import HardConcreteMasks
    from shear.patch import attach_masks
    from shear.refit import refit_masked

    net = copy.deepcopy(model)
    masks = HardConcreteMasks(source, target).to(next(net.parameters()).device)
    init_from_importance(masks, scores)
    attach_masks(net, masks)
    z = keep_indicators(masks)
    refit_masked(net, masks, z, calibration, batch_size, RANK_REFIT)
    masks.requires_grad_(False)
    with masks.fixed(z):
        if train_batches:
            _train(net, list(train_batches), lr)
        with torch.no_grad():
            losses = domain_losses(net, eval_sets, batch_size)
    return sum(losses.values()) / len(losses)


def rank_candidates(
    model: torch.nn.Module,
    source: Arch,
    candidates: list[Arch],
    calibration: torch.Tensor,
    eval_sets: dict[str, torch.Tensor],
    batch_size: int,
    train_batches: list[torch.Tensor] = (),  # type: ignore[assignment]
    log: Any = None,
    refit_batch: torch.Tensor | None = None,
) -> list[float]:
    """The score of every candidate (:func:`score_candidate`), activation importance measured once
    on ``calibration``; the refit fits on ``refit_batch`` (default: ``calibration``)."""
    from shear.importance import activation_importance

    scores = activation_importance(model, source, calibration, batch_size)
    refit_batch = calibration if refit_batch is None else refit_batch
    out = []
    for i, target in enumerate(candidates, 1):
        out.append(score_candidate(model, source, target, scores, refit_batch, eval_sets, batch_size,
                                   train_batches))  # fmt: skip
        if log is not None:
            log(f"candidate {i}/{len(candidates)} {target_text(target)}: score {out[-1]:.4f}")
    return out


def rank_budget(
    model: str,
    data: str,
    spec: str,
    *,
    seq_len: int = 256,
    batch_size: int = 4,
    eval_sequences: int = 4,
    calibration_sequences: int = 32,
    refit_sequences: int | None = None,
    rank_steps: int = 0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    log: Any = None,
) -> dict[str, Any]:
    """Enumerate the candidates of a budget for a source and rank them on its data.

    Args:
        model: the source (a model folder or ``default``).
        data: the data (its training split gives the calibration and training sequences, its
            held-out split the score).
        spec: the budget (module docstring).
        calibration_sequences: sequences the importance uses (and the refit, by default).
        refit_sequences: sequences the refit fits on, the importance's first (as ``shear prune``
            draws them, so that a one-shot run's export is what its candidate's score measured).
        rank_steps: training steps of each candidate before it is scored (0: none).

    Returns:
        ``{"budget", "enumerated", "ranked_by", "candidates": rows best first, "chosen": target text}``.
    """
    from shear.data import build_corpus
    from shear.importance import calibration_batch, calibration_rows
    from shear.loading import load_source

    if rank_steps < 0:
        raise ShearError(f"rank_steps must be >= 0, got {rank_steps}")
    net, tokenizer = load_source(model, device=device)
    if tokenizer is None:
        raise ShearError(f"{model} has no tokenizer; ranking a budget's candidates needs one to read --data")
    source = Arch.from_config(net.config)
    budget = parse_budget(spec)
    enumerated = enumerate_candidates(source, budget)
    candidates = shortlist(enumerated, budget.candidates)
    corpus = build_corpus(data, tokenizer, seq_len, eval_sequences, log=log)
    calibration = calibration_batch(corpus, calibration_rows(corpus, calibration_sequences, seed)).to(device)
    refit_rows = calibration_rows(corpus, refit_sequences or calibration_sequences, seed)
    refit_batch = calibration_batch(corpus, refit_rows).to(device)
    train_rows = calibration_rows(corpus, rank_steps * batch_size, seed + 1) if rank_steps else {}
    train = calibration_batch(corpus, train_rows).to(device).split(batch_size) if rank_steps else ()
    eval_sets = {d: s.to(device) for d, s in corpus.eval.items()}
    if log is not None:
        log(f"ranking {len(candidates)} of {len(enumerated)} candidates under {budget.text()}")
    scores = rank_candidates(net, source, candidates, calibration, eval_sets, batch_size, list(train), log,
                             refit_batch)  # fmt: skip
    rows = candidate_rows(budget, candidates, scores)
    cut = (f"one-shot importance cut + refit on {len(refit_batch)} calibration sequences (importance on "
           f"{len(calibration)})")  # fmt: skip
    return {
        "budget": budget.text(),
        "enumerated": len(enumerated),
        "ranked_by": cut + (f" + {rank_steps} training steps" if rank_steps else "")
        + ": mean held-out loss over the domains (lower is better)",
        "candidates": rows,
        "chosen": rows[0]["target"],
    }
