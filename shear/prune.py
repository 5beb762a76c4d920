"""The pruning driver: learn masks to a target under the Lagrangian, then export.

One optimiser step (method.md): for each of ``grad_accum`` micro-batches, a fresh mask
sample, LM loss plus the Lagrangian, backward; then gradient clipping (weights and
log_alpha), AdamW over the three groups (lambdas by ascent), the cosine schedule with
warm-up, and the log_alpha clamp. Every ``eval_interval`` steps the model is evaluated per
data domain under the deterministic masks; every ``checkpoint_interval`` steps the whole
state is checkpointed atomically, so ``resume`` continues exactly. At the end the masks
are finalized and the model exported; ``report.md`` and plots summarise the run.

Run directory::

    RUN_DIR/config.json        the PruneConfig
    RUN_DIR/log.jsonl          one line per step and per evaluation
    RUN_DIR/checkpoint.pt      latest checkpoint (atomically replaced)
    RUN_DIR/export/            the pruned Hugging Face model
    RUN_DIR/report.md, plots/  the report

Under ``torchrun`` (WORLD_SIZE > 1) the objective runs in DistributedDataParallel
(gloo on CPU, nccl on GPU): every rank draws the same masks and the same global batch
and keeps its own slice; rank 0 evaluates, checkpoints and exports.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shear.arch import Arch
from shear.checkpoint import load, save_atomic
from shear.data import Corpus, DomainSampler, build_corpus
from shear.errors import ShearError
from shear.evaluation import domain_losses
from shear.lagrangian import Lagrangian, build_optimizer
from shear.masks import HardConcreteMasks
from shear.patch import attach_masks
from shear.target import resolve_target


@dataclass
class PruneConfig:
    """Options of ``shear prune`` (see ``shear prune --help`` for each one's meaning)."""

    model: str
    target: str
    data: str
    out: str
    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    lr_weights: float = 1e-4
    lr_masks: float = 1.0
    lr_lambdas: float = 1.0
    lr_warmup: float = 0.1
    min_lr_ratio: float = 0.1
    target_warmup: float = 0.2
    eval_interval: int = 50
    checkpoint_interval: int = 50
    eval_sequences: int = 4
    max_train_sequences: int | None = None
    max_grad_norm: float = 1.0
    seed: int = 0
    precision: str = "auto"
    device: str = "auto"
    mask_types: list[str] | None = None
    domain_weights: dict[str, float] | None = None
    export: bool = True
    resume: bool = False
    stop_after: int | None = None
    dynamic: bool = False
    dynamic_interval: int = 50
    dynamic_rule: str = "paper"
    reference_losses: dict[str, float] | None = None

    def check(self) -> None:
        """Raise ShearError for option values that cannot work."""
        positive = ("steps", "batch_size", "grad_accum", "eval_interval", "checkpoint_interval", "seq_len")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ShearError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.lr_warmup < 1 or not 0 <= self.target_warmup <= 1:
            raise ShearError("lr_warmup must be in [0, 1) and target_warmup in [0, 1]")
        if self.dynamic_interval <= 0:
            raise ShearError(f"dynamic_interval must be positive, got {self.dynamic_interval}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ShearError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")


def lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class PruningObjective(nn.Module):
    """Model, masks and multipliers in one module, so DDP reduces all their gradients."""

    def __init__(self, model: nn.Module, masks: HardConcreteMasks, lagrangian: Lagrangian):
        super().__init__()
        self.model, self.masks, self.lagrangian = model, masks, lagrangian

    def forward(self, input_ids: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        lm = self.model(input_ids, labels=input_ids, use_cache=False).loss
        lag, _ = self.lagrangian(self.masks.expected_sparsity(), step)
        return lm, lag


def _device(cfg: PruneConfig) -> torch.device:
    if cfg.device != "auto":
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _autocast(cfg: PruneConfig, device: torch.device) -> Any:
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def _dist_info() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


class RunLog:
    """Append-only JSONL log of a run (rank 0 writes)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        """Drop entries after ``step`` (a resume replays them)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        """Append one record."""
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def records(self) -> Iterator[dict[str, Any]]:
        """Every record so far."""
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                yield json.loads(line)


def _expected_kept(masks: HardConcreteMasks) -> dict[str, float]:
    with torch.no_grad():
        return {n: float(p.sum(-1).mean()) for n, p in masks.keep_probabilities().items()}


def run_prune(cfg: PruneConfig) -> dict[str, Any]:
    """Run (or resume) a pruning run; returns the paths and final metrics.

    Args:
        cfg: the options.

    Returns:
        ``{"out", "export", "report", "final_eval", "steps"}``.

    Raises:
        ShearError: bad input, a non-finite loss (the last good checkpoint is kept), or a
            failed checkpoint write.
    """
    from shear.loading import load_source  # transformers import

    cfg.check()
    rank, world = _dist_info()
    main_rank = rank == 0
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    if cfg.resume and not ckpt_path.is_file():
        raise ShearError(f"--resume: no checkpoint at {ckpt_path}")
    if not cfg.resume and ckpt_path.exists():
        raise ShearError(f"{out} already holds a run (checkpoint.pt); pass --resume or choose another --out")
    if (cfg.batch_size % world) != 0:
        raise ShearError(f"batch size {cfg.batch_size} is not divisible by {world} ranks")
    device = _device(cfg)
    torch.manual_seed(cfg.seed)

    model, tokenizer = load_source(cfg.model, device=device)
    if tokenizer is None:
        raise ShearError(f"{cfg.model} has no tokenizer; shear prune needs one to read --data")
    source = Arch.from_config(model.config)
    target = resolve_target(source, cfg.target)
    corpus = build_corpus(cfg.data, tokenizer, cfg.seq_len, cfg.eval_sequences, cfg.max_train_sequences)
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    log = RunLog(out / "log.jsonl", main_rank)
    autocast = _autocast(cfg, device)

    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    masks = HardConcreteMasks(source, target, cfg.mask_types, generator=gen).to(device)
    lagrangian = Lagrangian(masks, warmup_steps=round(cfg.target_warmup * cfg.steps)).to(device)
    source_eval = None if cfg.resume else _evaluate(model, corpus, cfg, autocast, main_rank)
    attach_masks(model, masks)
    objective = PruningObjective(model, masks, lagrangian)
    optimizer = build_optimizer(model, masks, lagrangian, cfg.lr_weights, cfg.lr_masks, cfg.lr_lambdas)
    warmup = round(cfg.lr_warmup * cfg.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.steps, warmup, cfg.min_lr_ratio)
    )
    weights = cfg.domain_weights or {d: 1.0 for d in corpus.domains}
    sampler = DomainSampler(corpus, weights, seed=cfg.seed, rank=rank, world_size=world)

    start = 0
    if cfg.resume:
        state = load(ckpt_path)
        model.load_state_dict(state["model"])
        masks.load_state_dict(state["masks"])
        lagrangian.load_state_dict(state["lagrangian"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng"]["torch"])
        gen.set_state(state["rng"]["masks"])
        if device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        source_eval, start = state["source_eval"], int(state["step"])
        log.truncate_after(start)

    trainable = objective
    if world > 1:
        trainable = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None
        )

    def checkpoint(step: int) -> None:
        if main_rank:
            rng = {"torch": torch.get_rng_state(), "masks": gen.get_state()}
            if device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(device)
            state = {
                "step": step,
                "model": model.state_dict(),
                "masks": masks.state_dict(),
                "lagrangian": lagrangian.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "sampler": sampler.state_dict(),
                "rng": rng,
                "source_eval": source_eval,
            }
            save_atomic(state, ckpt_path)
        if world > 1:
            dist.barrier()

    clip_params = [p for p in model.parameters() if p.requires_grad] + list(masks.parameters())
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    progress = _progress(cfg.steps, start, main_rank)
    final_eval: dict[str, float] | None = None
    last_good = start if cfg.resume else None
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
    for step in range(start, end):
        t0 = time.perf_counter()
        model.train()
        lm_sum, lag_value, counts = 0.0, 0.0, dict.fromkeys(corpus.domains, 0)
        for micro in range(cfg.grad_accum):
            ids, doms = sampler.next_batch(cfg.batch_size)
            for d in doms:
                counts[d] += 1
            sync = nullcontext() if world == 1 or micro == cfg.grad_accum - 1 else trainable.no_sync()
            with sync:
                with autocast:
                    lm, lag = trainable(ids.to(device), step)
                ((lm + lag) / cfg.grad_accum).backward()
            lm_sum += lm.detach().float().item() / cfg.grad_accum
            lag_value = lag.detach().float().item()
        if world > 1:
            t = torch.tensor([lm_sum], device=device)
            dist.all_reduce(t)
            lm_sum = t.item() / world
        if not math.isfinite(lm_sum) or not math.isfinite(lag_value):
            kept = (
                f"kept the last good checkpoint {ckpt_path} (step {last_good})"
                if last_good
                else "no checkpoint yet"
            )
            bad = lm_sum if not math.isfinite(lm_sum) else lag_value
            raise ShearError(f"the loss became {bad} at step {step + 1}; stopped ({kept})")
        torch.nn.utils.clip_grad_norm_(clip_params, cfg.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        masks.clamp_()
        done = step + 1
        record = {
            "step": done,
            "loss": lm_sum,
            "lagrangian": lag_value,
            "lr": lr,
            "expected": _expected_kept(masks),
            "target": {n: s.size * (1 - lagrangian.target_at(n, done)) for n, s in masks.specs.items()},
            "final_target": {n: s.target for n, s in masks.specs.items()},
            "lambda_1": {n: v.detach().item() for n, v in lagrangian.lambda_1.items()},
            "lambda_2": {n: v.detach().item() for n, v in lagrangian.lambda_2.items()},
            "domains": counts,
            "domain_weights": dict(sampler.weights),
            "tokens_per_s": tokens_per_step / (time.perf_counter() - t0),
        }
        log.write(record)
        if progress is not None:
            progress.update(1)
            progress.set_postfix_str(_postfix(record))
        eval_now = done % cfg.eval_interval == 0 or done == cfg.steps
        dynamic_now = cfg.dynamic and done % cfg.dynamic_interval == 0 and done < cfg.steps
        if eval_now or dynamic_now:
            losses = _evaluate(model, corpus, cfg, autocast, main_rank)
            if eval_now:
                final_eval = losses
                log.write({"step": done, "eval": losses})
            if dynamic_now:
                _update_domain_weights(sampler, losses, cfg.reference_losses or source_eval, cfg, world)
        if done % cfg.checkpoint_interval == 0 or done == end:
            checkpoint(done)
            last_good = done
    if progress is not None:
        progress.close()
    if end < cfg.steps:  # stopped early on request: resume later with --resume
        return {"out": str(out), "steps": end, "final_eval": final_eval, "export": None, "report": None}
    if final_eval is None:  # resumed at the end
        final_eval = _evaluate(model, corpus, cfg, autocast, main_rank)
    result = {"out": str(out), "steps": cfg.steps, "final_eval": final_eval, "export": None, "report": None}
    if main_rank and cfg.export:
        from shear.export import export_pruned
        from shear.report import write_report

        model.eval()
        export_dir = export_pruned(model, masks, out / "export", tokenizer=tokenizer, overwrite=True)
        exported_eval = evaluate_folder(export_dir, corpus, cfg, device)
        result["export"] = str(export_dir)
        result["report"] = str(
            write_report(
                out, cfg, source, target, list(log.records()), source_eval, final_eval, exported_eval
            )
        )
    if world > 1:
        dist.barrier()
    return result


def _update_domain_weights(
    sampler: DomainSampler, losses: dict | None, reference: dict | None, cfg: PruneConfig, world: int
) -> None:
    """Dynamic batch loading: rank 0 computes the new weights, every rank receives them."""
    from shear.dynamic import update_weights

    weights = [None]
    if losses is not None:  # rank 0
        weights[0] = update_weights(sampler.weights, losses, reference, cfg.dynamic_rule)
    if world > 1:
        dist.broadcast_object_list(weights, src=0)
    sampler.set_weights(weights[0])


def _evaluate(model: nn.Module, corpus: Corpus, cfg: PruneConfig, autocast: Any, main_rank: bool):
    if not main_rank:
        return None
    with autocast:
        return domain_losses(model, corpus.eval, batch_size=cfg.batch_size)


def evaluate_folder(folder: str | os.PathLike, corpus: Corpus, cfg: PruneConfig, device: torch.device):
    """Per-domain held-out loss of a saved model folder (a fresh ``from_pretrained``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
    return domain_losses(model, corpus.eval, batch_size=cfg.batch_size)


def _progress(steps: int, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=steps, initial=start, desc="prune", unit="step", dynamic_ncols=True)


def _postfix(r: dict[str, Any]) -> str:
    dims = " ".join(f"{n}={r['expected'][n]:.0f}/{r['final_target'][n]}" for n in r["expected"])
    lam = " ".join(f"{v:+.2f}" for v in r["lambda_1"].values())
    return f"loss={r['loss']:.3f} lag={r['lagrangian']:+.3f} {dims} lambda1=[{lam}]"
