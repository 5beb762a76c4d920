"""Continued pre-training of a (pruned) model with dynamic batch loading.

The same trainer as pruning (:mod:`shear.trainer`): checkpoints and exact resume, the JSONL
log, torchrun, per-domain evaluation, and domain weights that follow each domain's loss
gap to its reference loss, every 400 steps by default (the paper's interval for this
stage); ``--fixed`` keeps the initial proportions as the baseline. The objective is the
plain LM loss, or with ``--distill-weight`` the distillation loss (:mod:`shear.distill`;
the teacher: ``--teacher``, else the source the pruned model's export records); AdamW with
the reference betas (0.9, 0.95).

Run directory::

    RUN_DIR/config.json           the TrainConfig (and the task, working directory, version)
    RUN_DIR/log.jsonl             one line per step, evaluation and weight update
    RUN_DIR/checkpoint.pt         latest checkpoint (atomically replaced)
    RUN_DIR/.lock                 held while a process uses the folder (see shear.runfolder)
    RUN_DIR/reference_losses.json the reference losses used
    RUN_DIR/model/                the trained model (save_pretrained, written atomically;
                                  `shear export RUN_DIR` rewrites it from the checkpoint)
    RUN_DIR/report.md, plots/     domain weights and loss gaps over time, per-domain perplexity
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shear.checkpoint import write_text_atomic
from shear.data import build_corpus
from shear.distill import build_distiller, lm_loss
from shear.errors import ShearError
from shear.runfolder import hold_run_lock
from shear.trainer import TrainConfig, evaluate_folder, export_at_end, finish, run_loop, start_run


class LMObjective(nn.Module):
    """The causal LM loss, or the distillation loss (and a zero second term, as the trainer
    expects a pair)."""

    #: set by run_train with --distill-weight > 0 (a plain object: the teacher is no submodule)
    distiller = None

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        lm = lm_loss(self.model, input_ids, self.distiller)
        return lm, lm.new_zeros(())


class TrainTask:
    """The trainer's hooks for continued pre-training."""

    name = "train"
    extra_name = None

    def __init__(self, cfg: TrainConfig, model: nn.Module):
        self.model = model
        self.objective = LMObjective(model)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr_weights, betas=(0.9, 0.95), weight_decay=0.0)

    def clip_parameters(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def after_step(self) -> None:
        pass

    def record(self, step: int) -> dict[str, Any]:
        return {}

    def postfix(self, r: dict[str, Any]) -> str:
        w = " ".join(f"{d}={v:.2f}" for d, v in r["domain_weights"].items())
        return f"loss={r['loss']:.3f} weights[{w}]"

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def export(
        self, out: str | os.PathLike, tokenizer: Any = None, max_shard_size: int | str | None = None
    ) -> Path:
        """Save the model (safetensors) and tokenizer to ``out`` (atomically replaced); a
        sharded model is gathered one tensor at a time, rank 0 writing (every rank calls this)."""
        from shear.parallel import save_model

        self.model.eval()
        return save_model(self.model, Path(out), tokenizer, max_shard_size)


@hold_run_lock
def run_train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) continued pre-training.

    Args:
        cfg: the options; ``cfg.model`` is a model folder (e.g. a pruned export) or ``default``.

    Returns:
        ``{"out", "model", "report", "initial_eval", "final_eval", "steps", "stopped_early"}``.

    Raises:
        ShearError: bad input, missing reference losses with dynamic loading, a non-finite
            loss (the last good checkpoint is kept), or a failed write.
    """
    ctx = start_run(cfg)
    model, tokenizer = ctx.parallel.load(cfg.model)
    model = ctx.parallel.shard(model)
    if tokenizer is None:
        raise ShearError(f"{cfg.model} has no tokenizer; shear train needs one to read --data")
    corpus = build_corpus(
        cfg.data, tokenizer, cfg.seq_len, cfg.eval_sequences, cfg.max_train_sequences, log=ctx.say
    )
    initial_eval = None if cfg.resume else ctx.evaluate(model, corpus)
    task = TrainTask(cfg, model)
    task.objective.distiller = build_distiller(cfg, ctx, model, copy_student=False)
    loop, extra = run_loop(ctx, task, corpus, None, {"initial_eval": initial_eval})
    initial_eval = extra["initial_eval"]
    if ctx.main and loop.reference is not None:
        write_text_atomic(ctx.out / "reference_losses.json", json.dumps(loop.reference, indent=2) + "\n")
    result = {
        "out": str(ctx.out),
        "steps": loop.steps,
        "stopped_early": loop.stopped_early,
        "initial_eval": initial_eval,
        "final_eval": loop.final_eval,
        "model": None,
        "report": None,
    }
    if loop.stopped_early:
        return result
    folder = None
    if cfg.export and (ctx.main or ctx.parallel.sharded):  # sharded: every rank sends its shards
        folder = export_at_end(ctx, task, ctx.out / "model", tokenizer)
    if ctx.main and folder is not None:
        from shear.model_card import update_card
        from shear.report import write_train_report

        saved_eval = evaluate_folder(folder, corpus, cfg.batch_size, ctx.device)
        update_card(folder, perplexity=saved_eval)
        result["model"] = str(folder)
        evals = {"start": initial_eval, "end": loop.final_eval, "saved": saved_eval}
        write_text_atomic(ctx.out / "evals.json", json.dumps(evals, indent=2) + "\n")
        records = list(ctx.log.records())
        evals = (initial_eval, loop.final_eval, saved_eval)
        result["report"] = str(write_train_report(ctx.out, cfg, records, *evals, loop.reference))
    finish(ctx)
    return result
