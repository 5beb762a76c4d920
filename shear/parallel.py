"""Data-parallel engines of ``shear prune`` / ``shear train``: DDP or FSDP2, all in one place.

* ``ddp``: every rank holds the whole model; :class:`~torch.nn.parallel.DistributedDataParallel`
  all-reduces the gradients of the objective (model, masks, multipliers).
* ``fsdp``: PyTorch's FSDP2 (``fully_shard``) on every decoder layer and on the root, as
  torchtitan does: parameters, gradients and AdamW state are sharded over the ranks (DTensors
  sharded on dim 0); a layer's parameters are gathered for its forward and backward only. On
  GPU a mixed-precision policy computes in bf16 and reduces gradients in fp32 (the sharded
  master weights and the optimiser state stay fp32). The masks and the Lagrange multipliers
  are tiny and stay replicated: their gradients are all-reduced, so every rank keeps the same
  log_alpha and draws the same masks. Rank 0 alone reads the source; the other ranks build
  the model on the meta device and receive their shards by broadcast
  (:func:`~torch.distributed.checkpoint.state_dict.set_model_state_dict`), so no rank but 0
  ever holds a full copy. Checkpoints are sharded (:mod:`torch.distributed.checkpoint`).
  A distillation teacher is sharded the same way (:meth:`Parallel.shard_frozen`), frozen:
  no gradients, no optimiser state.
* ``auto``: FSDP when :mod:`shear.plan` says DDP does not fit the device's memory, else DDP.

With one process there is nothing to distribute: the model trains as it is (an ``fsdp`` run
still writes sharded checkpoints, so it can resume on more ranks and vice versa).
``--activation-checkpointing`` recomputes each decoder layer's activations in the backward
pass (Hugging Face's gradient checkpointing, non-reentrant), with either strategy.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from shear.errors import ShearError

#: Values of ``--strategy``.
STRATEGIES: tuple[str, ...] = ("auto", "ddp", "fsdp")


@dataclass
class Parallel:
    """How a run spreads over its ranks (see the module docstring).

    Attributes:
        strategy: ``ddp`` or ``fsdp`` (``auto`` resolved).
        rank: this process's rank.
        world: number of ranks.
        device: this rank's device.
        activation_checkpointing: recompute each decoder layer in the backward pass.
        bf16: bf16 compute (FSDP's mixed-precision policy on GPU).
    """

    strategy: str
    rank: int
    world: int
    device: torch.device
    activation_checkpointing: bool = False
    bf16: bool = False

    @property
    def sharded(self) -> bool:
        """True when the weights are sharded over several ranks (FSDP with more than one)."""
        return self.strategy == "fsdp" and self.world > 1

    @property
    def main(self) -> bool:
        """True on rank 0."""
        return self.rank == 0

    def load(self, name: str | os.PathLike) -> tuple[nn.Module, Any]:
        """The source model and tokenizer: read from disk on rank 0, built on the meta device
        elsewhere when sharded (:meth:`shard` then broadcasts the weights).

        Raises:
            ShearError: as :func:`shear.loading.load_source`.
        """
        from shear.loading import load_source, load_tokenizer, meta_model

        if not self.sharded:
            return load_source(name, device=self.device)
        error, model, tokenizer = None, None, None
        try:
            # rank 0's copy stays on the host: fully_shard moves only its shard to the device
            model, tokenizer = load_source(name) if self.main else (meta_model(name), load_tokenizer(name))
        except ShearError as e:
            error = str(e)
        if _any(error is not None, self.world, self.device):
            raise ShearError(error or "loading the model failed on another rank")
        return model, tokenizer

    def shard(self, model: nn.Module) -> nn.Module:
        """Prepare a loaded model for training: activation checkpointing, then (FSDP) shard it.

        FSDP: ``fully_shard`` on each decoder layer and on the root, then rank 0's weights are
        broadcast into every rank's shards, and its buffers (RoPE frequencies) to every rank.
        Call it before the optimiser is built: sharding replaces the parameters.

        Returns:
            The same model object (FSDP changes its class in place).
        """
        if self.activation_checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        if not self.sharded:
            return model
        from torch.distributed.fsdp import MixedPrecisionPolicy

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        return self._fully_shard(model, {"mp_policy": policy} if self.bf16 else {})

    def shard_frozen(self, model: nn.Module) -> nn.Module:
        """Freeze a loaded model that only runs forward (the distillation teacher) and, under
        FSDP, shard it as :meth:`shard` does: its weights, in the dtype they are in, are split
        over the ranks and gathered a layer at a time; it has no gradients and no optimiser state.

        Returns:
            The same model object, in eval mode.
        """
        model.eval().requires_grad_(False)  # before sharding: FSDP's gathered parameters copy the flag
        return self._fully_shard(model, {}) if self.sharded else model

    def _fully_shard(self, model: nn.Module, options: dict[str, Any]) -> nn.Module:
        """``fully_shard`` on each decoder layer and on the root, then rank 0's weights and
        buffers broadcast into every rank's shards (see :meth:`load`).

        The root keeps its parameters (embedding, final norm, LM head) gathered after its
        forward (``reshard_after_forward=False``, FSDP2's default for a root, made explicit):
        the distillation loss reads the whole LM head weight after the model's forward
        (:mod:`shear.distill`); the backward frees them.
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.fsdp import fully_shard

        full = model.state_dict() if self.main else {}  # rank 0's one host copy, kept until set
        for layer in model.base_model.layers:
            fully_shard(layer, **options)
        fully_shard(model, reshard_after_forward=False, **options)
        if not self.main:
            model.to_empty(device=self.device)
        set_model_state_dict(
            model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        )
        for buffer in model.buffers():  # non-persistent buffers are in no state dict
            dist.broadcast(buffer.data, src=0)
        del full
        return model

    def wrap(self, objective: nn.Module) -> nn.Module:
        """What the step calls: ``objective`` in DDP (several ranks), else itself."""
        if self.strategy == "ddp" and self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # gradients as views of the buckets: no second copy of them (what the planner counts)
            ddp = nn.parallel.DistributedDataParallel
            return ddp(objective, device_ids=ids, gradient_as_bucket_view=True)
        return objective

    def accumulating(self, trainable: nn.Module, objective: nn.Module, last: bool) -> Any:
        """Context of one micro-batch's forward and backward: gradients are reduced across
        ranks only on the last micro-batch of a step."""
        if self.world == 1:
            return nullcontext()
        if self.sharded:
            return _gradient_sync(objective, last)
        return nullcontext() if last else trainable.no_sync()

    def reduce_replicated(self, objective: nn.Module) -> None:
        """FSDP: average the gradients of the replicated parameters (masks, multipliers)
        across ranks, in one all-reduce (FSDP reduces the sharded ones itself)."""
        if not self.sharded:
            return
        grads = [p.grad for p in objective.parameters() if p.grad is not None and not isinstance(p, DTensor)]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(part.view_as(g))

    def clip(self, parameters: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Clip the gradients' total norm to ``max_norm``; returns the norm before clipping
        (a tensor on the device; no host sync).

        Sharded (DTensor) and replicated parameters cannot go through one
        ``clip_grad_norm_`` call: each kind's norm comes from torch's ``get_total_norm``
        (for DTensors, the norm over all shards), the two combine, and torch's
        ``clip_grads_with_norm_`` scales both.
        """
        with_grad = [p for p in parameters if p.grad is not None]
        groups = [
            [p for p in with_grad if isinstance(p, DTensor)],
            [p for p in with_grad if not isinstance(p, DTensor)],
        ]
        groups = [g for g in groups if g]
        if len(groups) < 2:
            total = torch.nn.utils.clip_grad_norm_(with_grad, max_norm)
            return total.full_tensor() if isinstance(total, DTensor) else total
        norms = []
        for group in groups:
            norm = torch.nn.utils.get_total_norm([p.grad for p in group])
            norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
        total = torch.linalg.vector_norm(torch.stack([n.to(self.device) for n in norms]))
        for group in groups:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
        return total

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of a per-rank tensor over the ranks (on the device)."""
        if self.world == 1:
            return value
        value = value.clone()
        dist.all_reduce(value)
        return value

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a per-rank tensor over the ranks (on the device)."""
        return value if self.world == 1 else self.total(value) / self.world

    def raise_if_any(self, error: str | None) -> None:
        """Raise :class:`ShearError` on every rank with the first rank's error, if any rank
        had one. Every rank calls it (it is a collective), so after a failure on one rank
        no other is left waiting at a later barrier."""
        errors = [e for e in self.gather_objects(error) if e is not None]
        if errors:
            raise ShearError(errors[0])

    def reshard(self, model: nn.Module) -> None:
        """Free the gathered parameters a forward without backward (an evaluation) leaves on
        the root, so the model's parameters are the sharded ones again (which the optimiser
        and the checkpoints refer to)."""
        if self.sharded:
            release_gathered(model)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def save_sharded(
        self,
        out: Path,
        step: int,
        model: nn.Module,
        objective: nn.Module,
        optimizer: torch.optim.Optimizer,
    ) -> Path:
        """Write the model and optimiser state with :mod:`torch.distributed.checkpoint`, each
        rank its own shards, into a temporary folder renamed to ``out/checkpoint-shards-STEP``
        when every rank is done (a kill leaves the previous folder whole).

        Returns:
            The folder.

        Raises:
            ShearError: the write failed (nothing partial is kept).
        """
        import torch.distributed.checkpoint as dcp

        from shear.checkpoint import replace_dir
        from shear.errors import interrupted, write_failed

        final = out / f"{SHARDS_PREFIX}{step:08d}"
        what, kept = f"the checkpoint shards to {final}", "the previous checkpoint is kept"
        tmp, error = None, None
        if self.main:
            try:
                tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=out))
            except OSError as e:
                error = str(write_failed(what, e, kept))
        tmp, error = self.gather_objects((tmp, error))[0]
        if error is not None:  # on every rank: none goes on to the collectives of the save
            raise ShearError(error)
        try:
            # a write failing on one rank fails the save on every rank (DCP gathers the results)
            with _one_process_is_meant():
                dcp.save(_dcp_state(model, objective, optimizer), checkpoint_id=tmp)
            if self.world > 1:
                dist.barrier()
            if self.main:
                replace_dir(tmp, final)
        except BaseException as e:
            if self.main:
                shutil.rmtree(tmp, ignore_errors=True)
            if interrupted(e):
                raise KeyboardInterrupt from None
            if isinstance(e, Exception) and not isinstance(e, ShearError):
                raise write_failed(what, e, kept) from e
            raise
        return final


def release_gathered(model: nn.Module) -> None:
    """Free the parameters FSDP keeps gathered in ``model`` (the root's, after a forward); a
    model that is not sharded is left as it is."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def save_model(
    model: nn.Module, out: Path, tokenizer: Any = None, max_shard_size: int | str | None = None
) -> Path:
    """Save a model as ``save_pretrained`` does (safetensors weights, config, generation
    config, tokenizer), atomically. A sharded model is gathered one tensor at a time, as the
    pruning export does (:func:`shear.export.gather_sharded`): rank 0 holds the saved
    weights and one gathered tensor, never a second copy of the model, and writes; every
    rank must call it. An unsharded model goes through ``save_pretrained``.

    Raises:
        ShearError: the write failed (nothing partial is left).
    """
    from shear.checkpoint import atomic_dir, save_model_atomic
    from shear.export import DEFAULT_MAX_SHARD_SIZE, GatherSpec, gather_sharded, write_weights
    from shear.trainer import model_class_name

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return save_model_atomic(model, out, tokenizer, max_shard_size)
    specs, seen = [], set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:  # tied weights are saved once, under their first name
            seen.add(id(tensor))
            specs.append(GatherSpec(name, tensor.detach()))
    plan = gather_sharded(specs)
    if plan is None:
        return out
    config = copy.deepcopy(model.config)
    config.architectures = [model_class_name(model)]
    with atomic_dir(out, "the model") as tmp:
        write_weights(tmp, plan, max_shard_size=max_shard_size or DEFAULT_MAX_SHARD_SIZE)
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out


#: Folder name of the sharded checkpoints (followed by the step).
SHARDS_PREFIX = "checkpoint-shards-"


def _dcp_state(
    model: nn.Module, objective: nn.Module | None, optimizer: torch.optim.Optimizer | None
) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(objective, optimizer)
    return state


def load_sharded(
    folder: Path,
    model: nn.Module,
    objective: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Restore a sharded checkpoint folder (see :meth:`Parallel.save_sharded`) into ``model``
    (sharded or not) and, when given, the optimiser over ``objective``'s parameters."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _dcp_state(model, objective, optimizer)
    with _one_process_is_meant():
        dcp.load(state, checkpoint_id=folder)
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(objective, optimizer, state["optimizer"])


def remove_stale_shards(out: Path, keep: str) -> None:
    """Delete the sharded checkpoint folders in ``out`` other than ``keep`` (older steps, or a
    newer one whose checkpoint.pt a kill prevented)."""
    for entry in out.glob(SHARDS_PREFIX + "*"):
        if entry.name != keep and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def _one_process_is_meant() -> Iterator[None]:
    """Silence DCP's warning that it saves or loads in one process (no process group): a
    one-process run (or ``shear export``) means to."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninit")
        yield


@contextmanager
def _gradient_sync(objective: nn.Module, sync: bool) -> Iterator[None]:
    from torch.distributed.fsdp import FSDPModule

    roots = [m for m in objective.modules() if isinstance(m, FSDPModule)]
    for m in roots:
        m.set_requires_gradient_sync(sync, recurse=False)
    try:
        yield
    finally:
        for m in roots:
            m.set_requires_gradient_sync(True, recurse=False)


def _any(flag: bool, world: int, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    if world == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
