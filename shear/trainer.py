"""The training loop that pruning and continued pre-training share.

One optimiser step: for each of ``grad_accum`` micro-batches, the task's objective (LM
loss plus whatever the task adds), backward; then gradient clipping, the optimiser, the
cosine schedule with warm-up, and the task's own after-step hook. Around it: batches from
:class:`~shear.data.DomainBatchLoader` (DataLoader workers, domain-weighted); every
``eval_interval`` steps a per-domain held-out evaluation; with dynamic batch loading,
every ``dynamic_interval`` steps new domain weights from the loss gaps to the reference
losses (:mod:`shear.dynamic`), computed on rank 0 and broadcast; every
``checkpoint_interval`` steps an atomic checkpoint of everything (model, task state,
optimiser, schedule, data position, RNGs), so ``resume`` continues bit for bit; a JSONL
log of every step and evaluation; a non-finite loss stops the run and keeps the last good
checkpoint.

Under ``torchrun`` (WORLD_SIZE > 1) the objective runs in DistributedDataParallel (gloo on
CPU, nccl on GPU): every rank plans the same global batch and keeps its own slice; rank 0
evaluates, logs and checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from shear.checkpoint import load, save_atomic
from shear.data import Corpus, DomainBatchLoader, DomainSampler
from shear.errors import ShearError
from shear.evaluation import domain_losses


@dataclass(kw_only=True)
class TrainConfig:
    """Options shared by ``shear prune`` and ``shear train`` (see their ``--help``)."""

    model: str
    data: str
    out: str
    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    lr_weights: float = 1e-4
    lr_warmup: float = 0.1
    min_lr_ratio: float = 0.1
    eval_interval: int = 50
    checkpoint_interval: int = 50
    eval_sequences: int = 4
    max_train_sequences: int | None = None
    max_grad_norm: float = 1.0
    seed: int = 0
    precision: str = "auto"
    device: str = "auto"
    num_workers: int = 0
    domain_weights: dict[str, float] | None = None
    dynamic: bool = True
    dynamic_interval: int = 400
    dynamic_rule: str = "paper"
    reference_losses: dict[str, float] | None = None
    reference_model: str | None = None
    export: bool = True
    resume: bool = False
    stop_after: int | None = None

    def check(self) -> None:
        """Raise ShearError for option values that cannot work."""
        from shear.dynamic import RULES

        positive = ("steps", "batch_size", "grad_accum", "eval_interval", "checkpoint_interval", "seq_len")
        for name in positive + ("dynamic_interval",):
            if getattr(self, name) <= 0:
                raise ShearError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ShearError(f"num_workers must be >= 0, got {self.num_workers}")
        if not 0 <= self.lr_warmup < 1:
            raise ShearError("lr_warmup must be in [0, 1)")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ShearError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.dynamic_rule not in RULES:
            raise ShearError(f"dynamic_rule must be {' or '.join(RULES)}, got {self.dynamic_rule!r}")


def lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


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


@dataclass
class RunContext:
    """Where and how a run executes: ranks, device, precision, its folder and log."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    out: Path
    log: RunLog

    @property
    def main(self) -> bool:
        """True on rank 0 (evaluates, logs, checkpoints, exports)."""
        return self.rank == 0

    @property
    def checkpoint_path(self) -> Path:
        """The run's checkpoint file."""
        return self.out / "checkpoint.pt"

    def say(self, message: str) -> None:
        """A progress line on stderr (rank 0 only)."""
        if self.main:
            print(f"shear: {message}", file=sys.stderr, flush=True)

    def autocast(self) -> Any:
        """bf16 autocast on GPU (or when asked), else nothing."""
        p = self.cfg.precision
        bf16 = p == "bf16" or (p == "auto" and self.device.type == "cuda")
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def evaluate(self, model: nn.Module, corpus: Corpus) -> dict[str, float] | None:
        """Per-domain held-out loss on rank 0 (None elsewhere)."""
        if not self.main:
            return None
        with self.autocast():
            return domain_losses(model, corpus.eval, batch_size=self.cfg.batch_size)


def start_run(cfg: TrainConfig) -> RunContext:
    """Check the options, join the process group, pick the device, create the run folder.

    Raises:
        ShearError: bad options; ``resume`` without a checkpoint, or a fresh run into a folder
            that holds one.
    """
    cfg.check()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    out = Path(cfg.out)
    ckpt = out / "checkpoint.pt"
    if cfg.resume and not ckpt.is_file():
        raise ShearError(f"--resume: no checkpoint at {ckpt}")
    if not cfg.resume and ckpt.exists():
        raise ShearError(f"{out} already holds a run (checkpoint.pt); pass --resume or choose another --out")
    if cfg.batch_size % world:
        raise ShearError(f"batch size {cfg.batch_size} is not divisible by {world} ranks")
    if cfg.device != "auto":
        device = torch.device(cfg.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    else:
        device = torch.device("cpu")
    torch.manual_seed(cfg.seed)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    return RunContext(cfg, rank, world, device, out, RunLog(out / "log.jsonl", rank == 0))


class Task(Protocol):
    """What a run trains; the loop calls these hooks.

    Attributes:
        name: shown on the progress bar (``prune``, ``train``).
        extra_name: the log name of the objective's second loss (None: it is always 0).
        model: the Hugging Face model (evaluated per domain).
        objective: ``forward(input_ids, step) -> (lm_loss, extra_loss)``; wrapped in DDP.
        optimizer: steps every parameter the run learns.
    """

    name: str
    extra_name: str | None
    model: nn.Module
    objective: nn.Module
    optimizer: torch.optim.Optimizer

    def clip_parameters(self) -> list[torch.Tensor]:
        """Parameters whose gradient norm is clipped together."""
        ...

    def after_step(self) -> None:
        """Called after every optimiser step (e.g. the log_alpha clamp)."""
        ...

    def record(self, step: int) -> dict[str, Any]:
        """Task-specific fields of a step's log record."""
        ...

    def postfix(self, record: dict[str, Any]) -> str:
        """The progress bar's text for a step record."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Task state beyond the model and optimiser (masks, multipliers, RNGs)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        ...


@dataclass
class LoopResult:
    """How a loop ended: steps done, the last per-domain evaluation, whether it stopped early."""

    steps: int
    final_eval: dict[str, float] | None
    stopped_early: bool
    reference: dict[str, float] | None


def run_loop(
    ctx: RunContext,
    task: Task,
    corpus: Corpus,
    fallback_reference: dict[str, float] | None,
    extra_state: dict[str, Any] | None = None,
) -> tuple[LoopResult, dict[str, Any]]:
    """Train ``task`` for ``cfg.steps`` steps (or resume, or stop at ``stop_after``).

    Args:
        ctx: from :func:`start_run`.
        task: the hooks (see :class:`Task`).
        corpus: training and held-out data.
        fallback_reference: reference losses used by dynamic batch loading when the config
            gives none (pruning: the source model's measured losses).
        extra_state: saved in every checkpoint and returned (restored on resume).

    Returns:
        The result and the (restored) extra state.

    Raises:
        ShearError: a non-finite loss (the last good checkpoint is kept) or a failed write.
    """
    cfg, device, log = ctx.cfg, ctx.device, ctx.log
    reference = cfg.reference_losses or fallback_reference
    if cfg.reference_losses is None and cfg.reference_model and not cfg.resume and ctx.main:
        reference = measure_reference(cfg.reference_model, corpus, ctx)
    extra_state = dict(extra_state or {})
    warmup = round(cfg.lr_warmup * cfg.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        task.optimizer, lambda s: lr_factor(s, cfg.steps, warmup, cfg.min_lr_ratio)
    )
    weights = cfg.domain_weights or {d: 1.0 for d in corpus.domains}
    sampler = DomainSampler(corpus, weights, seed=cfg.seed, rank=ctx.rank, world_size=ctx.world)
    loader = DomainBatchLoader(sampler, cfg.batch_size, cfg.num_workers, pin_memory=device.type == "cuda")

    start = 0
    if cfg.resume:
        state = load(ctx.checkpoint_path)
        task.model.load_state_dict(state["model"])
        task.load_state_dict(state["task"])
        task.optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        extra_state, start = state["extra"], int(state["step"])
        reference = cfg.reference_losses or state["reference"]
        log.truncate_after(start)
    if cfg.dynamic and ctx.main:
        _check_reference(reference, corpus)
    if cfg.dynamic and any(w <= 0 for w in loader.weights.values()):
        zero = [d for d, w in loader.weights.items() if w <= 0]
        raise ShearError(
            f"dynamic batch loading needs a positive initial weight for every domain; {zero} have 0"
        )

    trainable = task.objective
    if ctx.world > 1:
        trainable = nn.parallel.DistributedDataParallel(
            task.objective, device_ids=[device.index] if device.type == "cuda" else None
        )

    def checkpoint(step: int) -> None:
        if ctx.main:
            rng = {"torch": torch.get_rng_state()}
            if device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(device)
            state = {
                "step": step,
                "model": task.model.state_dict(),
                "task": task.state_dict(),
                "optimizer": task.optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "sampler": loader.state_dict(),
                "rng": rng,
                "extra": extra_state,
                "reference": reference,
            }
            save_atomic(state, ctx.checkpoint_path)
        if ctx.world > 1:
            dist.barrier()

    clip = task.clip_parameters()
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    progress = _progress(task.name, cfg.steps, start, ctx.main)
    final_eval: dict[str, float] | None = None
    last_good = start if cfg.resume else None
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
    for step in range(start, end):
        t0 = time.perf_counter()
        task.model.train()
        lm_sum, extra_value, counts = 0.0, 0.0, dict.fromkeys(corpus.domains, 0)
        t_data = 0.0
        for micro in range(cfg.grad_accum):
            td = time.perf_counter()
            ids, doms = next(loader)
            t_data += time.perf_counter() - td
            for d in doms:
                counts[d] += 1
            sync = nullcontext() if ctx.world == 1 or micro == cfg.grad_accum - 1 else trainable.no_sync()
            with sync:
                with ctx.autocast():
                    lm, extra = trainable(ids.to(device, non_blocking=True), step)
                ((lm + extra) / cfg.grad_accum).backward()
            lm_sum += lm.detach().float().item() / cfg.grad_accum
            extra_value = extra.detach().float().item()
        if ctx.world > 1:
            t = torch.tensor([lm_sum], device=device)
            dist.all_reduce(t)
            lm_sum = t.item() / ctx.world
        if not math.isfinite(lm_sum) or not math.isfinite(extra_value):
            kept = (
                f"kept the last good checkpoint {ctx.checkpoint_path} (step {last_good})"
                if last_good
                else "no checkpoint yet"
            )
            bad = lm_sum if not math.isfinite(lm_sum) else extra_value
            raise ShearError(f"the loss became {bad} at step {step + 1}; stopped ({kept})")
        torch.nn.utils.clip_grad_norm_(clip, cfg.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        task.optimizer.step()
        scheduler.step()
        task.optimizer.zero_grad(set_to_none=True)
        task.after_step()
        done = step + 1
        elapsed = time.perf_counter() - t0
        record = {
            "step": done,
            "loss": lm_sum,
            **({task.extra_name: extra_value} if task.extra_name else {}),
            **task.record(done),
            "lr": lr,
            "domains": counts,
            "domain_weights": loader.weights,
            "tokens_per_s": tokens_per_step / elapsed,
            "data_s": t_data,
            "step_s": elapsed,
        }
        log.write(record)
        if progress is not None:
            progress.update(1)
            progress.set_postfix_str(task.postfix(record))
        eval_now = done % cfg.eval_interval == 0 or done == cfg.steps
        dynamic_now = cfg.dynamic and done % cfg.dynamic_interval == 0 and done < cfg.steps
        if eval_now or dynamic_now:
            losses = ctx.evaluate(task.model, corpus)
            if eval_now:
                final_eval = losses
                entry: dict[str, Any] = {"step": done, "eval": losses}
                if reference and losses is not None:
                    entry["reference"] = reference
                log.write(entry)
            if dynamic_now:
                new = None
                if ctx.main:
                    from shear.dynamic import update_weights

                    new = update_weights(loader.weights, losses, reference, cfg.dynamic_rule)
                    log.write({"step": done, "dynamic": {"losses": losses, "weights": new}})
                loader.set_weights(_broadcast(new, ctx.world))
        if done % cfg.checkpoint_interval == 0 or done == end:
            checkpoint(done)
            last_good = done
    if progress is not None:
        progress.close()
    if end < cfg.steps:
        return LoopResult(end, final_eval, True, reference), extra_state
    if final_eval is None:  # resumed at the end
        final_eval = ctx.evaluate(task.model, corpus)
    return LoopResult(cfg.steps, final_eval, False, reference), extra_state


def measure_reference(model: str, corpus: Corpus, ctx: RunContext) -> dict[str, float]:
    """The documented fallback reference: another model's held-out losses on the run's data.

    Raises:
        ShearError: the model's vocabulary does not fit the data's token ids.
    """
    from shear.loading import load_source

    ref, _ = load_source(model, device=ctx.device)
    vocab = ref.get_input_embeddings().num_embeddings
    top = max(int(t.max()) for t in corpus.eval.values())
    if top >= vocab:
        raise ShearError(f"reference model {model}: its vocabulary ({vocab}) misses the data's tokens")
    losses = ctx.evaluate(ref, corpus)
    del ref
    return losses


def _check_reference(reference: dict[str, float] | None, corpus: Corpus) -> None:
    if reference is None:
        raise ShearError(
            "dynamic batch loading needs reference losses: give --reference-losses (a JSON object "
            "or file, e.g. from `shear reference-losses`), or pass --fixed for fixed domain weights"
        )
    missing = [d for d in corpus.domains if d not in reference]
    if missing:
        raise ShearError(f"no reference loss for domain(s) {missing}: every data domain needs one")


def _broadcast(obj: Any, world: int) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _progress(name: str, steps: int, start: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=steps, initial=start, desc=name, unit="step", dynamic_ncols=True)


def evaluate_folder(folder: str | os.PathLike, corpus: Corpus, batch_size: int, device: torch.device):
    """Per-domain held-out loss of a saved model folder (a fresh ``from_pretrained``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
    return domain_losses(model, corpus.eval, batch_size=batch_size)


def finish(ctx: RunContext) -> None:
    """Wait for every rank at the end of a run."""
    if ctx.world > 1:
        dist.barrier()
