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
log of every step and evaluation; a non-finite loss or gradient norm stops the run and
keeps the last good checkpoint. The run folder's lock, recorded options, log and leftovers
are :mod:`shear.runfolder`'s.

Under ``torchrun`` (WORLD_SIZE > 1) the ranks (gloo on CPU, nccl on GPU) plan the same
global batch and each keeps its own slice; ``--strategy`` picks DistributedDataParallel or
FSDP2 (:mod:`shear.parallel`, where all the wrapping lives). Rank 0 logs and writes; under
FSDP every rank takes part in evaluations, sharded checkpoints and the export.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
import torch.distributed as dist
from torch import nn

from shear.checkpoint import checkpoint_sharded, checkpoint_step, load, save_atomic
from shear.data import Corpus, DomainBatchLoader, DomainSampler
from shear.errors import ShearError
from shear.evaluation import domain_losses
from shear.parallel import STRATEGIES, Parallel, load_sharded, remove_stale_shards
from shear.plan import measured_peak, run_plans, start_peak
from shear.reporting import Reporters, parse_report_to
from shear.runfolder import (
    CHECKPOINT_FILE,
    LOG_FILE,
    MEMORY_FILE,
    RunLock,
    RunLog,
    changed_options,
    check_output_folder,
    clean_leftovers,
    contents,
    read_run_config,
    write_run_config,
)

#: The data stream each task reads (:class:`shear.data.DomainSampler`): continued pre-training
#: after pruning reads sequences the pruning stage did not, at the same seed.
DATA_STREAMS = {"train": 0, "prune": 1}


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
    dynamic_eta: float = 0.3
    min_domain_weight: float = 0.05
    reference_losses: dict[str, float] | None = None
    reference_model: str | None = None
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    teacher: str | None = None
    export: bool = True
    resume: bool = False
    stop_after: int | None = None
    strategy: str = "auto"
    activation_checkpointing: bool = False
    report_to: str = "none"

    #: Options a resume may change: those of one session, and those that do not change what
    #: the remaining steps compute. Every other option is fixed for the life of a run.
    SESSION_OPTIONS: ClassVar[frozenset[str]] = frozenset({"out", "resume", "stop_after", "export"})
    RESUMABLE_CHANGES: ClassVar[frozenset[str]] = SESSION_OPTIONS | {
        "num_workers",
        "device",
        "eval_interval",
        "checkpoint_interval",
        "activation_checkpointing",
        "report_to",
    }
    #: The task name recorded in the run folder (``shear train``).
    TASK: ClassVar[str] = "train"
    #: Fewest steps a run may have (pruning allows 0: the one-shot export).
    MIN_STEPS: ClassVar[int] = 1

    def input_paths(self) -> dict[str, str | None]:
        """``{option: path}`` of everything the run reads; it never writes into any of them."""
        return {
            "--model": self.model,
            "--data": self.data,
            "--reference-model": self.reference_model,
            "--teacher": self.teacher,
        }

    def check(self) -> None:
        """Raise ShearError for option values that cannot work."""
        from shear.dynamic import RULES

        if self.steps < self.MIN_STEPS:
            raise ShearError(f"steps must be at least {self.MIN_STEPS}, got {self.steps}")
        positive = ("batch_size", "grad_accum", "eval_interval", "checkpoint_interval", "seq_len")
        for name in positive + ("dynamic_interval", "eval_sequences"):
            if getattr(self, name) <= 0:
                raise ShearError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("max_train_sequences", "stop_after"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ShearError(f"{name} must be positive, got {getattr(self, name)}")
        parse_report_to(self.report_to)
        if self.num_workers < 0:
            raise ShearError(f"num_workers must be >= 0, got {self.num_workers}")
        check_rate("lr_weights", self.lr_weights)
        if not 0 <= self.lr_warmup < 1:
            raise ShearError(f"lr_warmup must be in [0, 1), got {self.lr_warmup}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ShearError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not self.max_grad_norm > 0:  # NaN fails too
            raise ShearError(f"max_grad_norm must be positive, got {self.max_grad_norm}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ShearError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ShearError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if not 0 <= self.distill_weight <= 1:  # NaN fails too
            raise ShearError(f"distill_weight must be in [0, 1], got {self.distill_weight}")
        if not (math.isfinite(self.distill_temperature) and self.distill_temperature > 0):
            raise ShearError(f"distill_temperature must be finite and > 0, got {self.distill_temperature}")
        if self.strategy not in STRATEGIES:
            raise ShearError(f"strategy must be {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if not (math.isfinite(self.dynamic_eta) and self.dynamic_eta >= 0):
            raise ShearError(f"dynamic_eta must be a finite number >= 0, got {self.dynamic_eta}")
        if not 0 <= self.min_domain_weight < 1:
            raise ShearError(f"min_domain_weight must be in [0, 1), got {self.min_domain_weight}")
        if self.dynamic_rule not in RULES:
            raise ShearError(f"dynamic_rule must be {' or '.join(RULES)}, got {self.dynamic_rule!r}")
        for name in ("domain_weights", "reference_losses"):
            values = getattr(self, name) or {}
            bad = {d: v for d, v in values.items() if not math.isfinite(v)}
            if name == "domain_weights":
                bad.update({d: v for d, v in values.items() if v < 0})
            if bad:
                raise ShearError(
                    f"{name} must be finite{' and >= 0' if name == 'domain_weights' else ''}: {bad}"
                )


def check_rate(name: str, value: float) -> None:
    """Raise ShearError unless a learning rate is finite and >= 0."""
    if not (math.isfinite(value) and value >= 0):
        raise ShearError(f"{name} must be a finite number >= 0, got {value}")


def lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class RunContext:
    """Where and how a run executes: ranks, device, precision, its folder and log."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    out: Path
    log: RunLog
    parallel: Parallel
    lock: RunLock | None = None
    memory_baseline: int = 0

    @property
    def main(self) -> bool:
        """True on rank 0 (evaluates, logs, checkpoints, exports)."""
        return self.rank == 0

    @property
    def checkpoint_path(self) -> Path:
        """The run's checkpoint file."""
        return self.out / CHECKPOINT_FILE

    def say(self, message: str) -> None:
        """A progress line on stderr (rank 0 only)."""
        if self.main:
            print(f"shear: {message}", file=sys.stderr, flush=True)

    @property
    def compute_dtype(self) -> torch.dtype:
        """bfloat16 where the run autocasts (GPU, or when asked), else float32."""
        return torch.bfloat16 if bf16_compute(self.cfg.precision, self.device) else torch.float32

    def autocast(self) -> Any:
        """bf16 autocast on GPU (or when asked), else nothing."""
        bf16 = bf16_compute(self.cfg.precision, self.device)
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def evaluate(self, model: nn.Module, corpus: Corpus) -> dict[str, float] | None:
        """Per-domain held-out loss on rank 0 (None elsewhere); a sharded model's forward needs
        every rank, so there every rank evaluates."""
        if not self.main and not self.parallel.sharded:
            return None
        with self.autocast():
            losses = domain_losses(model, corpus.eval, batch_size=self.cfg.batch_size)
        self.parallel.reshard(model)
        return losses if self.main else None


def bf16_compute(precision: str, device: torch.device) -> bool:
    """Whether a run computes in bf16: asked for, or ``auto`` on GPU."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def start_run(cfg: TrainConfig) -> RunContext:
    """Check the options, join the process group, pick the device, open the run folder.

    Rank 0 opens the folder (:func:`open_run_folder`): checks where it is, takes its lock,
    removes leftovers, checks a resume against the recorded options, writes config.json.
    Its error, if any, is raised on every rank.

    Raises:
        ShearError: bad options (``--seq-len`` beyond the model's positions among them) or
            device; see :func:`open_run_folder`.
    """
    from shear.loading import check_seq_len, load_config

    cfg.check()
    check_seq_len(load_config(cfg.model), cfg.seq_len)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if cfg.batch_size % world:
        raise ShearError(f"batch size {cfg.batch_size} is not divisible by {world} ranks")
    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index is not None:  # FSDP's mesh and NCCL read it from here
        torch.cuda.set_device(device)
    out = Path(cfg.out)
    lock, error = None, None
    if rank == 0:
        try:
            lock = open_run_folder(cfg)
        except ShearError as e:
            error = str(e)
    error = _broadcast(error, world)
    if error is not None:
        raise ShearError(error)
    torch.manual_seed(cfg.seed)
    parallel = Parallel(
        resolve_run_strategy(cfg, world, device), rank, world, device, cfg.activation_checkpointing,
        bf16_compute(cfg.precision, device),
    )  # fmt: skip
    names = parse_report_to(cfg.report_to) if rank == 0 else []
    log = RunLog(out / LOG_FILE, rank == 0, Reporters(names, out, cfg) if names else None)
    if parallel.strategy == "fsdp" and world == 1 and rank == 0:
        print(
            "shear: --strategy fsdp in one process: nothing is sharded (start the run with torchrun "
            "--nproc_per_node N to shard it over N ranks); its checkpoints are sharded files, which a "
            "resume on any number of ranks reads",
            file=sys.stderr,
        )
    return RunContext(cfg, rank, world, device, out, log, parallel, lock, start_peak(device))


def resolve_run_strategy(cfg: TrainConfig, world: int, device: torch.device) -> str:
    """``--strategy``, with ``auto`` decided by the memory planner (:mod:`shear.plan`); one
    process has nothing to shard (``auto``: DDP's plain checkpoints); a resume keeps the
    strategy of its checkpoint (the planner may answer otherwise on other ranks or devices)."""
    if cfg.strategy != "auto":
        return cfg.strategy
    if world == 1:
        return "ddp"
    if cfg.resume:  # the checkpoint's own: its tensors are whole (DDP) or sharded (FSDP)
        return "fsdp" if checkpoint_sharded(Path(cfg.out) / CHECKPOINT_FILE) else "ddp"
    from shear.plan import ddp_fits

    return "ddp" if ddp_fits(cfg, world, device) else "fsdp"


def resolve_device(name: str) -> torch.device:
    """The device of ``--device`` (``auto``: this rank's GPU if there is one, else the CPU).

    Raises:
        ShearError: CUDA asked for where there is none, or a GPU index out of range.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
            raise ShearError(f"--device {name}: no CUDA device is available here ({build})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ShearError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    return device


def open_run_folder(cfg: TrainConfig) -> RunLock:
    """Make ``cfg.out`` this run's folder: checked, locked, cleaned, its options recorded.

    A fresh run needs a new or empty folder, or one whose earlier attempt of the same task
    was killed before its first checkpoint (its log starts over); it records its options in
    config.json. A resume needs a checkpoint, and the options that cannot change must equal
    the recorded ones (config.json keeps the options the run started with).

    Returns:
        The lock (released by :func:`~shear.runfolder.hold_run_lock` or :func:`finish`).

    Raises:
        ShearError: ``--out`` is or holds an input; another process holds the folder; a
            fresh run into a folder with a checkpoint or with foreign contents; a resume
            without a checkpoint or with changed options; a failed write.
    """
    out = Path(cfg.out)
    check_output_folder(out, cfg.input_paths())
    if out.exists() and not out.is_dir():
        raise ShearError(f"--out {out} is a file, not a folder")
    if not cfg.resume and contents(out) and read_run_config(out) is None:
        shown = ", ".join(contents(out)[:5])
        raise ShearError(
            f"--out {out} is not empty and holds no shear run ({shown}...); choose a new or empty folder"
        )
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ShearError(f"cannot create the run folder {out}: {e}") from e
    lock = RunLock.acquire(out)
    lock.created = created
    try:
        _prepare(cfg, out, lock)
    except BaseException:
        lock.release()
        raise
    return lock


def _prepare(cfg: TrainConfig, out: Path, lock: RunLock) -> None:
    removed = clean_leftovers(out)
    if lock.previous:
        print(
            f"shear: the previous run in {out} ({lock.previous}) was stopped before it finished",
            file=sys.stderr,
        )
    if removed:
        print(f"shear: removed what interrupted writes left in {out}: {', '.join(removed)}", file=sys.stderr)
    ckpt = out / CHECKPOINT_FILE
    recorded = read_run_config(out)
    if recorded is not None and recorded[0] != cfg.TASK:
        raise ShearError(
            f"{out} holds a `shear {recorded[0]}` run; a `shear {cfg.TASK}` run needs another --out"
        )
    if cfg.resume:
        if not ckpt.is_file():
            raise ShearError(
                f"--resume: no checkpoint at {ckpt} (the run stopped before its first checkpoint); "
                "run the same command without --resume to start over"
            )
        if recorded is not None:
            changed = changed_options(
                recorded[1], recorded[2], dataclasses.asdict(cfg), cfg.RESUMABLE_CHANGES
            )
            if changed:
                raise ShearError(
                    f"--resume: these options differ from the run's ({out / 'config.json'}) and cannot "
                    f"change within a run: {'; '.join(changed)}. Leave them out to continue with the "
                    "recorded values, or start a new run in another --out"
                )
        step = checkpoint_step(ckpt)
        if cfg.stop_after is not None and step is not None and cfg.stop_after <= step:
            raise ShearError(f"--stop-after {cfg.stop_after}: the run is already at step {step}")
        if recorded is None:  # a folder from before config.json recorded the task
            write_run_config(out, cfg, cfg.TASK)
    else:
        if ckpt.exists():
            raise ShearError(
                f"{out} already holds a run (checkpoint.pt); pass --resume or choose another --out"
            )
        RunLog(out / LOG_FILE, True).reset()  # an attempt killed before its first checkpoint
        write_run_config(out, cfg, cfg.TASK)


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

    def export(self, out: str | os.PathLike, tokenizer: Any = None, **options: Any) -> Path:
        """Write the run's model to the folder ``out`` atomically (at the end of a run, and by
        ``shear export`` from a checkpoint: the same bytes)."""
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
    sampler = DomainSampler(
        corpus, weights, seed=cfg.seed, stream=DATA_STREAMS[task.name], rank=ctx.rank, world_size=ctx.world
    )
    loader = DomainBatchLoader(sampler, cfg.batch_size, cfg.num_workers, pin_memory=device.type == "cuda")

    parallel = ctx.parallel
    start = 0
    if cfg.resume:
        state = load(ctx.checkpoint_path)
        check_checkpoint_fits(state, task, ctx.checkpoint_path)
        try:
            if "shards" in state:  # sharded: model and optimiser from the DCP folder, resharded
                load_sharded(ctx.out / state["shards"], task.model, task.objective, task.optimizer)
            else:
                task.model.load_state_dict(state["model"])
                task.optimizer.load_state_dict(state["optimizer"])
            task.load_state_dict(state["task"])
            scheduler.load_state_dict(state["scheduler"])
            loader.load_state_dict(state["sampler"])
            rng = state["rng"]
            rng = rng[min(ctx.rank, len(rng) - 1)] if isinstance(rng, list) else rng  # per rank
            torch.set_rng_state(rng["torch"])
            if device.type == "cuda" and "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"], device)
            extra_state, start = state["extra"], int(state["step"])
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise ShearError(
                f"--resume: {ctx.checkpoint_path} does not fit this run ({type(e).__name__}: {e})"
            ) from e
        reference = cfg.reference_losses or state.get("reference")
        log.truncate_after(start)
    if cfg.dynamic and ctx.main:
        _check_reference(reference, corpus)
    if cfg.dynamic and cfg.min_domain_weight * len(corpus.domains) >= 1:
        raise ShearError(
            f"min_domain_weight {cfg.min_domain_weight} leaves no room to move the weights of "
            f"{len(corpus.domains)} domains; give less than 1 / {len(corpus.domains)}"
        )
    if cfg.dynamic and any(w <= 0 for w in loader.weights.values()):
        zero = [d for d, w in loader.weights.items() if w <= 0]
        raise ShearError(
            f"dynamic batch loading needs a positive initial weight for every domain; {zero} have 0"
        )

    trainable = parallel.wrap(task.objective)

    def checkpoint(step: int) -> None:
        rng = {"torch": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        state = {
            "step": step,
            "meta": {"task": task.name, "model": model_class_name(task.model)},
            "task": task.state_dict(),
            "scheduler": scheduler.state_dict(),
            "sampler": loader.state_dict(),
            "rng": rng,
            "extra": extra_state,
            "reference": reference,
        }
        error = None
        try:
            if parallel.strategy == "fsdp":  # model and optimiser sharded; every rank's RNG
                state["model_shapes"] = {k: list(v.shape) for k, v in task.model.state_dict().items()}
                state["rng"] = parallel.gather_objects(rng)
                state["shards"] = parallel.save_sharded(
                    ctx.out, step, task.model, task.objective, task.optimizer
                ).name
            elif ctx.main:
                state.update(model=task.model.state_dict(), optimizer=task.optimizer.state_dict())
            if ctx.main:
                save_atomic(state, ctx.checkpoint_path, _kept(ctx, last_good))
                if "shards" in state:
                    remove_stale_shards(ctx.out, state["shards"])
        except ShearError as e:
            error = str(e)
        parallel.raise_if_any(error)  # in place of a barrier: a rank's failure stops every rank

    clip = task.clip_parameters()
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    progress = _progress(task.name, cfg.steps, start, ctx.main)
    final_eval: dict[str, float] | None = None
    last_good = start if cfg.resume else None
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
    for step in range(start, end):
        t0 = time.perf_counter()
        task.model.train()
        lm_sum, counts = torch.zeros((), device=device), dict.fromkeys(corpus.domains, 0)
        t_data = 0.0
        for micro in range(cfg.grad_accum):
            td = time.perf_counter()
            ids, doms = next(loader)
            t_data += time.perf_counter() - td
            for d in doms:
                counts[d] += 1
            # one micro-batch: masks sampled (the decoder's pre-hook), loss, backward; the
            # gradients are reduced across ranks on the last micro-batch only
            with parallel.accumulating(trainable, task.objective, last=micro == cfg.grad_accum - 1):
                with ctx.autocast():
                    lm, extra = trainable(ids.to(device, non_blocking=True), step)
                ((lm + extra) / cfg.grad_accum).backward()
            lm_sum += lm.detach().float() / cfg.grad_accum  # stays on the device
        parallel.reduce_replicated(task.objective)
        grad_norm_t = parallel.clip(clip, cfg.max_grad_norm)
        # every rank's sequences per domain: the step's, not rank 0's share
        summed = parallel.total(torch.tensor([float(counts[d]) for d in corpus.domains], device=device))
        # the step's one host sync: the log needs the numbers, and a NaN loss or gradient
        # must stop the run before it reaches the optimiser
        lm_sum, extra_value, grad_norm, *per_domain = torch.cat(
            [torch.stack([parallel.mean(lm_sum), extra.detach().float(), grad_norm_t.float()]), summed]
        ).tolist()
        counts = {d: round(n) for d, n in zip(corpus.domains, per_domain, strict=True)}
        if not math.isfinite(lm_sum) or not math.isfinite(extra_value):
            bad = lm_sum if not math.isfinite(lm_sum) else extra_value
            raise ShearError(f"the loss became {bad} at step {step + 1}; stopped ({_kept(ctx, last_good)})")
        if not math.isfinite(grad_norm):
            raise ShearError(
                f"the gradient norm became {grad_norm} at step {step + 1} (the loss was {lm_sum:.4g}); "
                f"stopped before the optimiser step ({_kept(ctx, last_good)})"
            )
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
            "grad_norm": grad_norm,
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

                    new = update_weights(
                        loader.weights, losses, reference, cfg.dynamic_rule,
                        eta=cfg.dynamic_eta, floor=cfg.min_domain_weight,
                    )  # fmt: skip
                    log.write({"step": done, "dynamic": {"losses": losses, "weights": new}})
                loader.set_weights(_broadcast(new, ctx.world))
        if done % cfg.checkpoint_interval == 0 or done == end:
            checkpoint(done)
            last_good = done
    if progress is not None:
        progress.close()
    log_memory(ctx, end)
    if end < cfg.steps:
        return LoopResult(end, final_eval, True, reference), extra_state
    if start == cfg.steps:  # resumed at the end: no evaluation ran (None off rank 0 anyway)
        final_eval = ctx.evaluate(task.model, corpus)
    return LoopResult(cfg.steps, final_eval, False, reference), extra_state


def log_memory(ctx: RunContext, step: int) -> None:
    """Record the planner's per-rank figure for this session next to each rank's measured
    peak (CUDA max allocated; on CPU the peak resident set above the one before the model
    loaded) in ``memory.jsonl``, and say both on stderr."""
    peaks = ctx.parallel.gather_objects(measured_peak(ctx.device, ctx.memory_baseline))
    if not ctx.main:
        return
    plan = run_plans(ctx.cfg, ctx.world, ctx.device)[ctx.parallel.strategy]
    record = {"step": step, "strategy": ctx.parallel.strategy, "world_size": ctx.world}
    # its own file: the step log of a resumed run stays that of a straight one
    RunLog(ctx.out / MEMORY_FILE, True).write({**record, "planned": plan.summary(), "measured_peak": peaks})
    if peaks[0] is not None:
        ctx.say(
            f"peak memory per rank: planned {plan.total / 1e9:.3f} GB, measured "
            + ", ".join(f"{p / 1e9:.3f}" for p in peaks if p is not None)
            + " GB"
        )


def export_at_end(ctx: RunContext, task: Task, out: Path, tokenizer: Any) -> Path:
    """The end-of-run export; a failure says that the checkpoint can be exported again.

    Raises:
        ShearError: the export failed (nothing partial is left).
    """
    try:
        folder = task.export(out, tokenizer)
        if ctx.main:  # the model card (shear.model_card); the run adds its perplexity once measured
            from shear.model_card import write_card

            write_card(folder, ctx.cfg, ctx.cfg.steps)
        return folder
    except ShearError as e:
        raise ShearError(
            f"{e}. The run's checkpoint is kept: `shear export {ctx.out}` writes it again"
        ) from e


def _kept(ctx: RunContext, last_good: int | None) -> str:
    """What survives a failure now: the last good checkpoint, or none."""
    if last_good:
        return f"the checkpoint of step {last_good} is kept: {ctx.checkpoint_path}"
    return "there is no checkpoint yet"


def check_checkpoint_fits(
    state: dict[str, Any], task: Task, path: Path, task_keys: tuple[str, ...] | None = None
) -> None:
    """Raise ShearError, saying why, unless ``state`` is a checkpoint of a run like ``task``'s:
    the same task (prune or train), model class and tensor names and shapes (which fixes
    the architecture, the head layout and the mask types).

    Args:
        state: the loaded checkpoint.
        task: the task it is to be restored into.
        path: the checkpoint's file, for the message.
        task_keys: compare only these entries of the task state (None: all of it).
    """
    meta = state.get("meta") or {}
    problems = []
    model_class = model_class_name(task.model)
    if meta.get("task", task.name) != task.name:
        problems.append(f"it is from a `shear {meta['task']}` run, this is `shear {task.name}`")
    if meta.get("model", model_class) != model_class:
        problems.append(f"its model is a {meta['model']}, this run's is a {model_class}")
    if not problems:
        current_task, saved_task = task.state_dict(), state.get("task")
        if task_keys is not None and isinstance(saved_task, dict):
            current_task = {k: current_task[k] for k in task_keys}
            saved_task = {k: saved_task.get(k) for k in task_keys}
        saved_model = _tensor_shapes("model", state.get("model"))
        if "model_shapes" in state:  # a sharded checkpoint records the shapes
            saved_model = {f"model.{k}": v for k, v in state["model_shapes"].items()}
        problems += _shape_differences(saved_model, _tensor_shapes("model", task.model.state_dict()))
        problems += _shape_differences(
            _tensor_shapes("task", saved_task), _tensor_shapes("task", current_task)
        )
    if problems:
        raise ShearError(f"--resume: the checkpoint {path} does not fit this run: {'; '.join(problems)}")


def model_class_name(model: nn.Module) -> str:
    """The model's own class name (FSDP's wrapper class, ``FSDPLlamaForCausalLM``, is not)."""
    cls = type(model)
    while cls.__name__.startswith("FSDP") and len(cls.__bases__) > 1:
        cls = cls.__bases__[1]
    return cls.__name__


def _shape_differences(a: dict[str, list[int]], b: dict[str, list[int]]) -> list[str]:
    """Tensors missing on either side (``a`` is the checkpoint's) or of another shape, summarised."""
    out = []
    for what, names in (
        ("only in the checkpoint", [n for n in a if n not in b]),
        ("missing from the checkpoint", [n for n in b if n not in a]),
    ):
        if names:
            out.append(
                f"tensors {what}: {', '.join(names[:3])}"
                + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            )
    shapes = [f"{n} {a[n]} in the checkpoint, {b[n]} here" for n in a if n in b and a[n] != b[n]]
    if shapes:
        out.append(
            "shapes differ: "
            + "; ".join(shapes[:3])
            + (f" and {len(shapes) - 3} more" if len(shapes) > 3 else "")
        )
    return out


def _tensor_shapes(prefix: str, obj: Any) -> dict[str, list[int]]:
    """``{dotted name: shape}`` of every tensor in nested dicts and lists."""
    if isinstance(obj, torch.Tensor):
        return {prefix: list(obj.shape)}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list | tuple) else ()
    out: dict[str, list[int]] = {}
    for k, v in items:
        if k == "_extra_state":  # a module's optional state (frozen masks): present or not, it fits
            continue
        out.update(_tensor_shapes(f"{prefix}.{k}", v))
    return out


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
    """Wait for every rank at the end of a run, then release the run folder."""
    if ctx.world > 1:
        dist.barrier()
    if ctx.log.mirror is not None:
        ctx.log.mirror.close()
    if ctx.lock is not None:
        ctx.lock.release()
