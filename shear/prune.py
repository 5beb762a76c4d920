"""The pruning driver: learn masks to a target under the Lagrangian, then export.

One optimiser step (method.md): for each of ``grad_accum`` micro-batches, a fresh mask
sample, LM loss (or with ``--distill-weight`` the distillation loss from a frozen copy of
the source, :mod:`shear.distill`) plus the Lagrangian, backward; then gradient clipping
(weights and log_alpha), AdamW over the three groups (lambdas by ascent), the cosine
schedule with warm-up, and the log_alpha clamp. The loop, evaluation, dynamic batch loading (every 50
steps by default, as in the paper), checkpoints and resume are the shared trainer's
(:mod:`shear.trainer`). At the end the masks are finalized and the model exported;
``report.md`` and plots summarise the run.

Run directory::

    RUN_DIR/config.json           the PruneConfig (and the task, working directory, version)
    RUN_DIR/log.jsonl             one line per step, evaluation and weight update
    RUN_DIR/checkpoint.pt         latest checkpoint (atomically replaced)
    RUN_DIR/.lock                 held while a process uses the folder (see shear.runfolder)
    RUN_DIR/reference_losses.json the reference losses dynamic batch loading used
    RUN_DIR/export/               the pruned Hugging Face model (`shear export RUN_DIR` rewrites it)
    RUN_DIR/report.md, plots/     the report
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from shear.arch import Arch
from shear.budget import is_budget
from shear.checkpoint import write_text_atomic
from shear.data import build_corpus
from shear.data.corpus import Corpus
from shear.distill import build_distiller, lm_loss
from shear.errors import ShearError
from shear.export import DEFAULT_MAX_SHARD_SIZE
from shear.importance import (
    activation_importance,
    calibration_batch,
    calibration_rows,
    decided_sparsity,
    init_from_importance,
    keep_indicators,
)
from shear.lagrangian import Lagrangian, build_optimizer
from shear.masks import HardConcreteMasks
from shear.patch import attach_masks
from shear.recipes import DEFAULT_RECIPE, RECIPE_OPTIONS, recipe_options
from shear.runfolder import hold_run_lock
from shear.target import resolve_target
from shear.trainer import (
    LoopResult,
    RunContext,
    TrainConfig,
    check_rate,
    evaluate_folder,
    export_at_end,
    finish,
    run_loop,
    start_run,
)


@dataclass(kw_only=True)
class PruneConfig(TrainConfig):
    """Options of ``shear prune`` (see ``shear prune --help`` for each one's meaning).

    The options left at None are filled from ``recipe`` (:mod:`shear.recipes`) when the
    config is made; those given explicitly stay as given.
    """

    target: str
    recipe: str = DEFAULT_RECIPE
    steps: int | None = None
    dynamic_eta: float | None = None
    min_domain_weight: float | None = None
    lr_masks: float = 1.0
    lr_lambdas: float = 1.0
    target_warmup: float = 0.2
    mask_types: list[str] | None = None
    dynamic_interval: int = 50
    init: str | None = None
    calibration_sequences: int = 32
    freeze_masks: float | None = None
    search_steps: int | None = None
    refit: float | None = None
    refit_sequences: int | None = None
    rank_steps: int = 0
    #: the budget the target was chosen from (``--target params=60M``; shear.budget), else None
    budget: str | None = None

    TASK: ClassVar[str] = "prune"
    MIN_STEPS: ClassVar[int] = 0

    def __post_init__(self) -> None:
        for name, value in recipe_options(self.recipe).items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def recipe_record(self) -> dict[str, Any]:
        """The recipe and the options it governs as resolved (the log, checkpoint and report's)."""
        return {"recipe": self.recipe, "options": {n: getattr(self, n) for n in RECIPE_OPTIONS}}

    def recipe_summary(self) -> str:
        """:meth:`recipe_record` in one line."""
        resolved = ", ".join(f"{n}={v}" for n, v in self.recipe_record()["options"].items())
        return f"recipe {self.recipe}: {resolved}"

    def check(self) -> None:
        """Raise ShearError for option values that cannot work."""
        from shear.importance import INITS

        super().check()
        check_rate("lr_masks", self.lr_masks)
        check_rate("lr_lambdas", self.lr_lambdas)
        if not 0 <= self.target_warmup <= 1:
            raise ShearError(f"target_warmup must be in [0, 1], got {self.target_warmup}")
        if self.init not in INITS:
            raise ShearError(f"init must be {' or '.join(INITS)}, got {self.init!r}")
        if not 0 <= self.freeze_masks <= 1:
            raise ShearError(f"freeze_masks must be in [0, 1], got {self.freeze_masks}")
        if self.calibration_sequences <= 0:
            raise ShearError(f"calibration_sequences must be positive, got {self.calibration_sequences}")
        if self.search_steps < 0:
            raise ShearError(f"search_steps must be >= 0, got {self.search_steps}")
        if self.search_steps and self.init != "importance":
            raise ShearError("--search-steps starts from activation importance: it needs --init importance")
        if self.rank_steps < 0:
            raise ShearError(f"rank_steps must be >= 0, got {self.rank_steps}")
        if self.refit_sequences is not None and self.refit_sequences <= 0:
            raise ShearError(f"refit_sequences must be positive, got {self.refit_sequences}")
        if self.refit < 0:
            raise ShearError(f"refit must be >= 0 (0: no refit), got {self.refit}")
        if self.refit and self.init != "importance":
            raise ShearError("--refit refits the importance choice: it needs --init importance")
        if self.refit and self.steps and self.freeze_masks < 1:
            # the refit fits the kept blocks to the units the choice dropped: a unit that came
            # back later would count twice
            raise ShearError("--refit needs a choice that no longer changes: --freeze-masks 1 or --one-shot")
        if self.steps == 0 and self.init != "importance":
            raise ShearError(
                "--steps 0 (--one-shot) exports the importance choice: it needs --init importance"
            )


class PruningObjective(nn.Module):
    """Model, masks and multipliers in one module, so DDP reduces all their gradients.

    Args:
        freeze_step: from this step on the masks are frozen at their deterministic values
            (:meth:`HardConcreteMasks.freeze`) and the Lagrangian no longer acts; None: never.
    """

    #: set by run_prune with --distill-weight > 0 (a plain object: the teacher is no submodule)
    distiller = None

    def __init__(
        self,
        model: nn.Module,
        masks: HardConcreteMasks,
        lagrangian: Lagrangian,
        freeze_step: int | None = None,
    ):
        super().__init__()
        self.model, self.masks, self.lagrangian = model, masks, lagrangian
        self.freeze_step = freeze_step

    def forward(self, input_ids: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.freeze_step is not None and step >= self.freeze_step and self.masks.frozen is None:
            self.masks.freeze()  # every rank: the same log_alpha, the same deterministic masks
        lm = lm_loss(self.model, input_ids, self.distiller)
        lag, _ = self.lagrangian(self.masks.expected_sparsity(), step)
        if self.masks.frozen is not None:
            lag = lag * 0.0  # zero gradients, not none: DDP's reduction still sees every parameter
        return lm, lag


class PruneTask:
    """The trainer's hooks for pruning: masks, multipliers, the three optimiser groups."""

    name = "prune"
    extra_name = "lagrangian"

    def __init__(self, cfg: PruneConfig, model: nn.Module, masks: HardConcreteMasks, gen: torch.Generator):
        self.model, self.masks, self.gen = model, masks, gen
        self.source_model = cfg.model  # recorded in the export: `shear train` distils from it
        self.recipe = cfg.recipe_record()  # recorded in the checkpoint
        if cfg.init == "importance":  # decided from the start: hold them there, no ramp
            start = final = decided_sparsity(masks)
        else:  # the paper's: ramp from where the initialisation puts the masks (~0) to 1 - k / n
            with torch.no_grad():
                start, final = {n: float(e.mean()) for n, e in masks.expected_sparsity().items()}, None
        self.lagrangian = Lagrangian(
            masks, warmup_steps=round(cfg.target_warmup * cfg.steps), start=start, final=final
        ).to(next(masks.parameters()).device)
        attach_masks(model, masks)
        frozen_steps = round(cfg.freeze_masks * cfg.steps)
        freeze_step = cfg.steps - frozen_steps if frozen_steps else None
        self.objective = PruningObjective(model, masks, self.lagrangian, freeze_step)
        self.optimizer = build_optimizer(
            model, masks, self.lagrangian, cfg.lr_weights, cfg.lr_masks, cfg.lr_lambdas
        )

    def clip_parameters(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad] + list(self.masks.parameters())

    def after_step(self) -> None:
        self.masks.clamp_()

    def record(self, step: int) -> dict[str, Any]:
        frozen = self.masks.frozen
        if frozen is None:
            kept = self.masks.expected_kept()
        else:  # decided: the units the frozen masks keep
            kept = {n: (z != 0).reshape(-1, z.shape[-1]).sum(-1).float() for n, z in frozen.items()}
        lag = self.lagrangian
        return {
            "frozen": frozen is not None,
            "expected": {n: float(k.mean()) for n, k in kept.items()},
            "expected_min": {n: float(k.min()) for n, k in kept.items()},
            "expected_max": {n: float(k.max()) for n, k in kept.items()},
            "target": {n: s.size * (1 - lag.target_at(n, step)) for n, s in self.masks.specs.items()},
            "final_target": {n: s.target for n, s in self.masks.specs.items()},
            "lambda_1": {n: v.detach().item() for n, v in lag.lambda_1.items()},
            "lambda_2": {n: v.detach().item() for n, v in lag.lambda_2.items()},
        }

    def postfix(self, r: dict[str, Any]) -> str:
        # the spread over rows, not only the mean: the Lagrangian holds every row to the target
        dims = " ".join(
            f"{n}={r['expected_min'][n]:.0f}-{r['expected_max'][n]:.0f}/{r['final_target'][n]}"
            for n in r["expected"]
        )
        lam = " ".join(f"{v:+.2f}" for v in r["lambda_1"].values())
        return f"loss={r['loss']:.3f} lag={r['lagrangian']:+.3f} {dims} lambda1=[{lam}]"

    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": self.masks.state_dict(),
            "lagrangian": self.lagrangian.state_dict(),
            "mask_rng": self.gen.get_state(),
            "recipe": self.recipe,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks.load_state_dict(state["masks"])
        self.lagrangian.load_state_dict(state["lagrangian"])
        self.gen.set_state(state["mask_rng"])

    def export(
        self,
        out: str | os.PathLike,
        tokenizer: Any = None,
        backend: str | None = None,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    ) -> Path:
        """Finalize the masks and write the pruned model to ``out`` (atomically replaced)."""
        from shear.export import export_pruned

        self.model.eval()
        return export_pruned(
            self.model, self.masks, out, tokenizer=tokenizer, overwrite=True, backend=backend,
            max_shard_size=max_shard_size, source_model=self.source_model,
        )  # fmt: skip


@hold_run_lock
def run_prune(cfg: PruneConfig) -> dict[str, Any]:
    """Run (or resume) a pruning run; returns the paths and final metrics.

    Args:
        cfg: the options.

    Returns:
        ``{"out", "export", "report", "final_eval", "steps", "stopped_early"}``.

    Raises:
        ShearError: bad input (a target equal to the source among it: said before any work),
            a non-finite loss or gradient (the last good checkpoint is kept), a failed write,
            or another process using ``cfg.out``.
    """
    from shear.loading import load_config  # transformers import

    ranking = None
    # config.json records the chosen target, so a plain --resume reads it; a budget given again
    # ranks again and must choose the same (the resume's check of the options says so otherwise)
    if is_budget(cfg.target):
        cfg.check()
        ranking = _choose_from_budget(cfg)
        cfg = dataclasses.replace(cfg, target=ranking["chosen"], budget=cfg.target)
    source = Arch.from_config(load_config(cfg.model))
    target = resolve_target(source, cfg.target)
    check_prunes(source, target, cfg.model)
    ctx = start_run(cfg)
    ctx.say(cfg.recipe_summary())
    model, tokenizer = ctx.parallel.load(cfg.model)
    model = ctx.parallel.shard(model)
    if tokenizer is None:
        raise ShearError(f"{cfg.model} has no tokenizer; shear prune needs one to read --data")
    corpus = build_corpus(
        cfg.data, tokenizer, cfg.seq_len, cfg.eval_sequences, cfg.max_train_sequences, log=ctx.say
    )
    # written once the weights and data have loaded: a run that fails to load leaves no folder
    if ranking is not None and ctx.main:
        write_text_atomic(ctx.out / "budget.json", json.dumps(ranking, indent=2) + "\n")
        ctx.say(f"budget {cfg.budget}: chose {cfg.target} (candidates in budget.json)")
    if ctx.main and not cfg.resume:
        ctx.log.write(cfg.recipe_record())
    # the source's losses, measured before the masks go in: the report's baseline and the
    # documented fallback reference for dynamic batch loading
    source_eval = None if cfg.resume else ctx.evaluate(model, corpus)
    # the teacher: a copy of the source as loaded, before masks or a checkpoint touch it
    distiller = build_distiller(cfg, ctx, model, copy_student=True) if cfg.steps else None
    calibration, scores = None, None
    if cfg.init == "importance" and not cfg.resume:  # a resume restores log_alpha instead
        calibration = calibration_rows(corpus, cfg.calibration_sequences, cfg.seed)
        ctx.say(f"measuring activation importance on {cfg.calibration_sequences} training sequences")
        scores = activation_importance(model, source, calibration_batch(corpus, calibration), cfg.batch_size)
        ctx.parallel.reshard(model)  # FSDP: every rank measured the same scores
        if ctx.main:
            write_text_atomic(ctx.out / "calibration.json", json.dumps(calibration) + "\n")
        if cfg.search_steps:
            scores = _search(ctx, model, source, target, scores, calibration_batch(corpus, calibration))
    task = build_task(cfg, model, source, target, ctx.device, scores)
    task.objective.distiller = distiller
    if cfg.refit and not cfg.resume:  # a resume restores the refitted weights
        _refit(ctx, task, corpus)
    if cfg.steps == 0:
        # one-shot: the importance choice at unit scale, exactly what the masks start from
        with task.masks.fixed(keep_indicators(task.masks)):
            return _finish_run(ctx, task, corpus, tokenizer, source, target, source_eval, LoopResult(
                0, ctx.evaluate(model, corpus), False, None))  # fmt: skip
    loop, extra = run_loop(ctx, task, corpus, source_eval, {"source_eval": source_eval})
    return _finish_run(ctx, task, corpus, tokenizer, source, target, extra["source_eval"], loop)


def _choose_from_budget(cfg: PruneConfig) -> dict[str, Any]:
    """Rank the candidates of a budget ``--target`` on the run's data (:func:`shear.budget.rank_budget`)."""
    from shear.budget import rank_budget
    from shear.trainer import resolve_device

    say = (lambda m: print(f"shear: {m}", file=sys.stderr)) if int(os.environ.get("RANK", "0")) == 0 else None
    return rank_budget(
        cfg.model, cfg.data, cfg.target, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
        eval_sequences=cfg.eval_sequences, calibration_sequences=cfg.calibration_sequences,
        refit_sequences=cfg.refit_sequences, rank_steps=cfg.rank_steps, seed=cfg.seed,
        device=resolve_device(cfg.device), log=say,
    )  # fmt: skip


def _search(
    ctx: RunContext,
    model: nn.Module,
    source: Arch,
    target: Arch,
    scores: dict[str, torch.Tensor],
    calibration: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The mask search of ``--search-steps`` (:mod:`shear.mask_search`); returns its scores."""
    from shear.mask_search import search_masks

    cfg = ctx.cfg
    if ctx.parallel.sharded:
        raise ShearError("--search-steps does not run under FSDP yet; use --strategy ddp or --search-steps 0")
    ctx.say(f"searching the masks for {cfg.search_steps} steps on the calibration sequences, weights frozen")
    records: list[dict[str, Any]] = []
    searched = search_masks(
        model, source, target, scores, calibration, cfg.search_steps, batch_size=cfg.batch_size,
        lr_masks=cfg.lr_masks, lr_lambdas=cfg.lr_lambdas, seed=cfg.seed, mask_types=cfg.mask_types,
        log=records.append,
    )  # fmt: skip
    if ctx.main:
        for r in records:
            ctx.log.write(r)
        swapped = ", ".join(f"{n} {v}" for n, v in records[-1]["swapped"].items())
        ctx.say(f"search: loss {records[0]['search_loss']:.3f} -> {records[-1]['search_loss']:.3f}; "
                f"units swapped against activation importance: {swapped}")  # fmt: skip
    return searched


def _refit(ctx: RunContext, task: PruneTask, corpus: Corpus) -> None:
    """Refit the kept weights to the source on calibration sequences (:mod:`shear.refit`).

    The refit fits whole weight matrices, so it may take more sequences than the importance
    needs (``--refit-sequences``); drawn with the same seed, they start with the importance's.
    """
    from shear.refit import refit_masked

    cfg = ctx.cfg
    rows = calibration_rows(corpus, cfg.refit_sequences or cfg.calibration_sequences, cfg.seed)
    calibration = calibration_batch(corpus, rows)
    z = keep_indicators(task.masks) if cfg.steps == 0 else task.masks.deterministic()
    ctx.say(f"refitting the kept weights to the source on {len(calibration)} calibration sequences")
    # under torchrun every rank streams its share of the sequences (shear.refit)
    errors = refit_masked(
        task.model, task.masks, z, calibration, cfg.batch_size, cfg.refit, ctx.parallel.world > 1
    )
    before, after = (sum(e[i] for e in errors.values()) / len(errors) for i in (0, 1))
    ctx.say(f"relative reconstruction error of the kept linears: {before:.3f} cut, {after:.3f} refitted")
    if ctx.main:
        errors = {k: {"cut": b, "refit": a} for k, (b, a) in errors.items()}
        record = {"damping": cfg.refit, "rows": rows, "error": errors}
        write_text_atomic(ctx.out / "refit.json", json.dumps(record, indent=2) + "\n")


def _finish_run(
    ctx: RunContext,
    task: PruneTask,
    corpus: Corpus,
    tokenizer: Any,
    source: Arch,
    target: Arch,
    source_eval: dict[str, float] | None,
    loop: LoopResult,
) -> dict[str, Any]:
    """After the steps: the reference losses, the export, its evaluation and the report."""
    cfg = ctx.cfg
    reference = loop.reference or source_eval
    if ctx.main and reference is not None:
        write_text_atomic(ctx.out / "reference_losses.json", json.dumps(reference, indent=2) + "\n")
    result = {
        "out": str(ctx.out),
        "steps": loop.steps,
        "stopped_early": loop.stopped_early,
        "final_eval": loop.final_eval,
        "export": None,
        "report": None,
    }
    if loop.stopped_early:  # resume later with --resume
        return result
    export_dir = None
    if cfg.export and (ctx.main or ctx.parallel.sharded):  # sharded: every rank sends its shards
        export_dir = export_at_end(ctx, task, ctx.out / "export", tokenizer)
    if ctx.main and export_dir is not None:
        from shear.model_card import update_card
        from shear.report import write_report

        exported_eval = evaluate_folder(export_dir, corpus, cfg.batch_size, ctx.device)
        update_card(export_dir, perplexity=exported_eval)
        result["export"] = str(export_dir)
        evals = {"source": source_eval, "masked": loop.final_eval, "exported": exported_eval}
        write_text_atomic(ctx.out / "evals.json", json.dumps(evals, indent=2) + "\n")
        records = list(ctx.log.records())
        result["report"] = str(
            write_report(ctx.out, cfg, source, target, records, source_eval, loop.final_eval, exported_eval)
        )
    finish(ctx)
    return result


def check_prunes(source: Arch, target: Arch, model: str) -> None:
    """Raise ShearError when the target equals the source: there would be nothing to prune."""
    if target == source:
        raise ShearError(
            f"the target equals the source {model} ({source.layers} layers, hidden {source.hidden}, "
            f"{source.heads} heads in {source.kv_heads} KV groups, intermediate {source.intermediate}): "
            f"there is nothing to prune; give smaller sizes (`shear info {model} --target ...` shows what "
            "a target removes)"
        )


def build_task(
    cfg: PruneConfig,
    model: nn.Module,
    source: Arch,
    target: Arch,
    device: torch.device,
    scores: dict[str, torch.Tensor] | None = None,
) -> PruneTask:
    """The pruning task of a run (a run and ``shear export`` build it the same way).

    Args:
        scores: activation importance (:mod:`shear.importance`) to initialise the masks
            from; None keeps the uniform initialisation (the paper's, or a resume's, which
            loads log_alpha from the checkpoint).

    Returns:
        The task, its masks attached to ``model``.
    """
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    masks = HardConcreteMasks(source, target, cfg.mask_types, generator=gen).to(device)
    if scores is not None:
        init_from_importance(masks, scores)
    return PruneTask(cfg, model, masks, gen)
