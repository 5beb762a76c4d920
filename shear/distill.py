"""Distillation from a frozen teacher during ``shear prune`` and ``shear train``.

With ``--distill-weight A`` the objective's language-modelling term becomes

    (1 - A) * LM + A * T^2 * KL(softmax(teacher / T) || softmax(student / T))

over the same next-token positions as the LM loss (``T``: ``--distill-temperature``; the
``T^2`` keeps the gradient's size independent of ``T``, so ``A`` means the same at every
temperature). ``A = 0`` (the default) leaves the objective exactly Hugging Face's LM loss.

The loss is computed from the final hidden states by the fused linear-KL op
(:func:`shear.dispatch.linear_kl`: Triton on CUDA, the chunked PyTorch reference op on CPU),
so neither model's ``[tokens, vocabulary]`` logits are ever held: each model runs its own
forward with its LM head on the last position only (``logits_to_keep=1``), a hook keeps its
decoder's output (``model.base_model``, whose pre-hook samples the masks while pruning, and
whose final norm applies the hidden mask), and the loss applies the LM head weights.
Going through the model's own forward, not its decoder's, is what makes this work under
FSDP: the root's hooks gather the embedding, final norm and LM head, and the root keeps
them gathered after its forward (:meth:`shear.parallel.Parallel.shard`), so the loss sees
the whole LM head weights and the student's head gradient is reduce-scattered in its
backward like any other.

The teacher (pruning: a frozen copy of the source as loaded, unless ``--teacher``; training:
``--teacher``, else the source recorded in the pruned export's ``shear_export.json``) runs
in eval mode under ``torch.no_grad`` in the training dtype (bf16 when the run autocasts to
bf16), its parameters frozen. It is held by a plain object, not a submodule, so it is
outside the optimiser, DDP and every checkpoint; a resume rebuilds it from the options, and
its forward pass draws no random numbers, so resume stays exact. Under ``torchrun`` each
rank runs it on the rank's own slice of the batch; under FSDP it is sharded as the student
is (read on rank 0, broadcast into the shards, gathered a layer at a time), with no
gradients and no optimiser state, and its gathered root is freed once the loss is computed.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shear import dispatch
from shear.errors import ShearError
from shear.ops.linear_kl import IGNORE_INDEX
from shear.parallel import release_gathered

#: The export record that names a pruned model's source (written by ``shear prune``).
EXPORT_RECORD = "shear_export.json"


class Distiller:
    """The teacher and the distillation settings; :meth:`loss` is the objective's LM term.

    Args:
        teacher: the frozen teacher (made frozen here: eval mode, no gradients).
        weight: ``A`` in (0, 1].
        temperature: ``T`` > 0.
    """

    def __init__(self, teacher: nn.Module, weight: float, temperature: float):
        self.teacher = teacher.eval().requires_grad_(False)
        self.weight, self.temperature = weight, temperature

    def loss(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """``(1 - A) * LM + A * T^2 * KL`` of ``model`` on ``input_ids`` (next-token positions).

        Args:
            model: the student, a Hugging Face causal LM (masked or not).
            input_ids: ``[batch, seq]`` token ids.

        Returns:
            The scalar loss, differentiable in the student's parameters (and masks).
        """
        hidden = final_hidden(model, input_ids)
        with torch.no_grad():
            teacher_hidden = final_hidden(self.teacher, input_ids)
        # Hugging Face's causal LM loss: position i predicts token i + 1; the last predicts nothing
        labels = torch.cat([input_ids[:, 1:], input_ids.new_full((input_ids.shape[0], 1), IGNORE_INDEX)], 1)
        try:
            return dispatch.linear_kl(
                hidden, lm_head_weight(model), teacher_hidden, lm_head_weight(self.teacher), labels,
                self.temperature, self.weight,
            )  # fmt: skip
        finally:  # FSDP: the teacher has no backward to free its gathered root
            release_gathered(self.teacher)


def final_hidden(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The decoder's output (after the final norm) on ``input_ids``, from the whole model's
    forward with its LM head on the last position only (see the module docstring: under FSDP
    this leaves the LM head weight gathered).

    Args:
        model: a Hugging Face causal LM (masked or not, sharded or not).
        input_ids: ``[batch, seq]`` token ids.

    Returns:
        ``[batch, seq, hidden]``.
    """
    seen: list[torch.Tensor] = []
    hook = model.base_model.register_forward_hook(
        lambda module, args, out: seen.append(out.last_hidden_state)
    )
    try:
        model(input_ids, use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    return seen[0]


def lm_loss(model: nn.Module, input_ids: torch.Tensor, distiller: Distiller | None) -> torch.Tensor:
    """The objective's language-modelling term: Hugging Face's LM loss, or the distillation loss.

    Args:
        model: the student.
        input_ids: ``[batch, seq]`` token ids (also the labels).
        distiller: None for the plain LM loss.

    Returns:
        The scalar loss.
    """
    if distiller is None:
        return model(input_ids, labels=input_ids, use_cache=False).loss
    return distiller.loss(model, input_ids)


def lm_head_weight(model: nn.Module) -> torch.Tensor:
    """The LM head's weight ``[vocab, hidden]`` (tied or not).

    Raises:
        ShearError: the head has a bias (no supported family has one).
    """
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ShearError(f"{type(model).__name__}: distillation needs an LM head without a bias")
    return head.weight


def recorded_source(model: str) -> str | None:
    """The source model a pruned export was pruned from (its ``shear_export.json``), if recorded."""
    record = Path(model) / EXPORT_RECORD
    if not record.is_file():
        return None
    try:
        return json.loads(record.read_text()).get("source_model")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def build_distiller(cfg: Any, ctx: Any, student: nn.Module, copy_student: bool) -> Distiller | None:
    """The run's distiller, or None when ``cfg.distill_weight`` is 0.

    The teacher: ``cfg.teacher`` if given; else, with ``copy_student``, a frozen copy of
    ``student`` (pruning: the source as loaded, before masks or a checkpoint touch it); else
    the source recorded in the export ``cfg.model`` (training a pruned model). Its size is
    reported on stderr. Under FSDP the teacher is read again (rank 0 reads, the others
    receive their shards) and sharded (:meth:`shear.parallel.Parallel.shard_frozen`) rather
    than copied from the sharded student.

    Args:
        cfg: the run's :class:`~shear.trainer.TrainConfig`.
        ctx: the run's :class:`~shear.trainer.RunContext` (device, precision, messages).
        student: the model being trained, as loaded.
        copy_student: without ``--teacher``, copy ``student`` (pruning).

    Raises:
        ShearError: no teacher can be found, or its vocabulary differs from the student's.
    """
    if cfg.distill_weight == 0:
        return None
    from shear.loading import load_source  # transformers import

    parallel = getattr(ctx, "parallel", None)
    sharded = parallel is not None and parallel.sharded
    dtype = ctx.compute_dtype
    name = cfg.teacher
    if name is None and copy_student:
        name = f"{cfg.model} (a frozen copy of the source)"
        teacher = parallel.load(cfg.model)[0] if sharded else copy.deepcopy(student)
    else:
        name = name or recorded_source(cfg.model)
        if name is None:
            raise ShearError(
                f"--distill-weight {cfg.distill_weight} needs a teacher: give --teacher MODEL ({cfg.model} "
                f"records no source model in {EXPORT_RECORD})"
            )
        teacher = parallel.load(name)[0] if sharded else load_source(name, device=ctx.device)[0]
    mine, theirs = lm_head_weight(student).shape[0], lm_head_weight(teacher).shape[0]
    if mine != theirs:
        raise ShearError(f"teacher {name}: its vocabulary ({theirs}) differs from the student's ({mine})")
    if sharded:  # rank 0's host copy in the compute dtype, then its shards on the device
        teacher = parallel.shard_frozen(teacher.to(dtype=dtype))
    else:
        teacher = teacher.to(device=ctx.device, dtype=dtype)
    distiller = Distiller(teacher, cfg.distill_weight, cfg.distill_temperature)
    n = sum(p.numel() for p in teacher.parameters())
    size = sum(p.numel() * p.element_size() for p in teacher.parameters())
    ctx.say(
        f"distillation: teacher {name}, {n / 1e6:.1f} M parameters, {size / 2**20:.0f} MiB in "
        f"{str(dtype).removeprefix('torch.')} on {ctx.device}"
        + (f", sharded over {parallel.world} ranks" if sharded else "")
        + f"; weight {cfg.distill_weight}, "
        f"temperature {cfg.distill_temperature}"
    )
    return distiller
