"""The memory planner: per-rank memory of a pruning or training run, for DDP and for FSDP.

From the source's config alone (no weights), :func:`plan_memory` estimates what one rank
holds at its peak, in bytes:

* weights: fp32 master weights, all of them (DDP) or 1/N of them (FSDP) plus the gathered
  parameters in flight (FSDP: the root's embedding / LM head / final norm, and two decoder
  layers, the one computing and the one prefetched; in bf16 on GPU, fp32 on CPU);
* gradients: fp32, the same split (FSDP: plus the unsharded gradients of the parameters in
  flight, before they are reduce-scattered). FSDP with ``--grad-accum`` > 1 reduces only on
  the last micro-batch: until then every rank keeps the unsharded fp32 gradients of the
  whole model (FSDP2 accumulates them in the reduce dtype), 4 bytes per parameter;
* optimiser: AdamW's two fp32 moments, the same split;
* activations: what one micro-batch keeps for the backward pass, per token and layer
  (the norms' inputs and outputs, q/k/v before and after RoPE, the attention output, the
  MLP's gate, up, activation and product, and the masked outputs); with activation
  checkpointing only each layer's input plus one layer's recomputation; and the logits
  with the loss's fp32 copies (with ``--distill``, the fused linear-KL loss holds no
  logits: both models' final hidden states, one chunk of both models' logits with the
  reference op's fp32 work buffers on CPU, and the LM head's fp32 gradient);
* masks: log_alpha, the multipliers, their gradients and AdamW state (replicated);
* teacher (``--distill``): the unpruned source's weights in the compute dtype, replicated
  (DDP) or sharded with the parameters in flight gathered (FSDP); no gradients, no
  optimiser state;
* refit (``--refit``): the least-squares refit at the cut runs before the first step,
  when there are no gradients, no optimiser state and no training activations yet. It
  streams (:mod:`shear.refit`): it holds the float64 statistics of the largest group of
  linears that share an input (``G = d x d`` over the pruned inputs and its Cholesky
  factor, ``C = D x d`` against the source's, one linear's ``W_src C``; for down_proj the
  widths are the MLP's), the dense pruned model (fp32, on every rank), the hidden states
  entering the layer being refitted for the rank's share of the refit sequences (source
  and pruned, fp32) and one chunk of activations: one micro-batch per rank
  (``--batch-size / N`` sequences) through a source and a pruned layer (fp32, no autograd)
  with the group's inputs cast for the float32 products. The total is the larger of the two phases:
  weights, masks and teacher plus either training's gradients, optimiser state and
  activations, or the refit.

Each run logs its measured peak (CUDA max allocated on GPU; on CPU the peak resident set
above what the process held before the model loaded) next to this figure
(:func:`measured_peak`). ``auto`` strategy: FSDP when DDP's plan does not fit the device.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch

from shear.arch import Arch
from shear.errors import ShearError
from shear.masks import plan_masks

#: Part of the device memory a plan may use: the rest is the CUDA context, the allocator's
#: fragmentation and the workspaces of kernels (and, on CPU, the process itself).
USABLE_FRACTION = 0.9
_GB = 1e9


@dataclass
class MemoryPlan:
    """Per-rank bytes of one strategy's peak (see the module docstring)."""

    strategy: str
    weights: int
    gradients: int
    optimizer: int
    activations: int
    masks: int
    teacher: int
    refit: int = 0

    @property
    def total(self) -> int:
        """The peak of the two phases: what every phase holds (weights, masks, teacher) plus
        the larger of training's gradients, optimiser state and activations and the refit's
        working memory (the refit ends before the first step)."""
        training = self.gradients + self.optimizer + self.activations
        return self.weights + self.masks + self.teacher + max(training, self.refit)

    def fits(self, device_bytes: int) -> bool:
        """Whether the plan fits :data:`USABLE_FRACTION` of ``device_bytes``."""
        return self.total <= USABLE_FRACTION * device_bytes

    def summary(self) -> dict[str, Any]:
        """The parts and the total in bytes."""
        return {**asdict(self), "total": self.total}


def _layer_params(arch: Arch) -> int:
    return arch.attention_params() + arch.mlp_params() + 2 * arch.hidden


def _layer_activations(arch: Arch, masked: bool) -> int:
    """Values one decoder layer keeps per token for its backward pass."""
    h, i = arch.hidden, arch.intermediate
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    # two norms (input and output: 4h), q/k/v before and after RoPE (2q + 4kv), the attention
    # output and o_proj's input (2q), two residual sums (2h), the MLP's gate, up, silu(gate)
    # and product (4i); masking adds the masked o_proj / MLP outputs and the hidden-masked
    # norms' outputs (3h)
    return 6 * h + 4 * q + 4 * kv + 4 * i + (3 * h if masked else 0)


def _activation_bytes(
    arch: Arch, tokens: int, act_bytes: int, checkpointing: bool, masked: bool, distill: bool, gpu: bool
) -> int:
    """Bytes one micro-batch of ``tokens`` tokens keeps for its backward pass."""
    per_layer = _layer_activations(arch, masked)
    if checkpointing:  # each layer's input, and one layer recomputed at a time
        layers = arch.layers * arch.hidden + per_layer
    else:
        layers = arch.layers * per_layer
    if not distill:  # the logits in the compute dtype, their fp32 copy and the loss's fp32 log-softmax
        return tokens * (layers * act_bytes + arch.vocab * (act_bytes + 8))
    return tokens * layers * act_bytes + _linear_kl_bytes(arch, tokens, act_bytes, gpu)


def _linear_kl_bytes(arch: Arch, tokens: int, act_bytes: int, gpu: bool) -> int:
    """The fused linear-KL loss (:mod:`shear.ops.linear_kl`): both models' final hidden states
    and the student's gradient of them, one chunk of both models' logits in the compute dtype
    and the LM head's fp32 gradient. On CPU the reference op's row work adds four fp32
    buffers the size of the chunk's logits; on GPU the Triton kernel works in place, but
    each chunk's 16-bit head gradient is added to the fp32 one through an fp32 copy."""
    from shear.ops.linear_kl import default_chunk

    chunk = default_chunk(tokens, arch.vocab, arch.hidden)
    hidden = tokens * arch.hidden * (2 * act_bytes + 4)
    logits = chunk * arch.vocab * (2 * act_bytes + (0 if gpu else 16))
    head = arch.vocab * arch.hidden * (4 + (act_bytes + 4 if gpu else 0))
    return hidden + logits + head


def _refit_bytes(source: Arch, target: Arch, sequences: int, chunk: int, seq_len: int) -> int:
    """The refit's working memory on one rank (see the module docstring).

    Args:
        sequences: the rank's share of the refit sequences.
        chunk: sequences per forward pass on the rank.
    """
    attention = target.heads * target.head_dim
    widths = (  # (source, pruned) input widths of each group of linears that share an input, and
        # the most output rows of one of its pruned linears
        (source.hidden, target.hidden, attention),  # q/k/v
        (source.hidden, target.hidden, target.intermediate),  # gate/up
        (source.heads * source.head_dim, attention, target.hidden),  # o_proj
        (source.intermediate, target.intermediate, target.hidden),  # down_proj
    )
    # float64: G and its Cholesky factor (d x d), C (D x d), one linear's W_src C (rows x d)
    stats = max(8 * (2 * d * d + big * d + rows * d) for big, d, rows in widths)
    inputs = sequences * seq_len * (source.hidden + target.hidden) * 4
    per_token = 4 * (_layer_activations(source, False) + _layer_activations(target, False))
    per_token += 4 * max(big + d for big, d, _ in widths)  # the group's inputs (float32 products)
    return stats + 4 * target.total_params() + inputs + chunk * seq_len * per_token


def plan_memory(
    source: Arch,
    target: Arch | None,
    world: int,
    batch: int,
    seq_len: int,
    strategy: str,
    checkpointing: bool = False,
    distill: bool = False,
    gpu: bool = True,
    grad_accum: int = 1,
    refit_sequences: int = 0,
) -> MemoryPlan:
    """Per-rank peak memory of a run (see the module docstring).

    Args:
        source: the model trained (pruning: the unpruned source).
        target: the pruning target (None: continued pre-training, no masks).
        world: number of ranks.
        batch: sequences per micro-batch, global (each rank holds ``batch / world``).
        seq_len: tokens per sequence.
        strategy: ``ddp`` or ``fsdp``.
        checkpointing: activation checkpointing per decoder layer.
        distill: a teacher (the unpruned source) runs beside the student.
        gpu: bf16 compute and FSDP's bf16 gathered parameters (GPU); fp32 on CPU.
        grad_accum: micro-batches per optimiser step.
        refit_sequences: calibration sequences of the refit at the cut (global; 0: no refit,
            and none without a target).

    Returns:
        The plan.
    """
    if strategy not in ("ddp", "fsdp"):
        raise ShearError(f"the planner knows ddp and fsdp, not {strategy!r}")
    if min(world, batch, seq_len, grad_accum) < 1 or refit_sequences < 0:
        raise ShearError(
            "world size, batch, sequence length and grad-accum must be positive, refit sequences >= 0"
        )
    params = source.total_params()
    act_bytes = 2 if gpu else 4
    per_rank = -(-batch // world)
    tokens = per_rank * seq_len
    masks = 0
    if target is not None:
        units = sum(math.prod(s.shape) for s in plan_masks(source, target))
        # log_alpha + grad + two moments, the sampled and deterministic z (fp32)
        masks = units * 4 * 6
    if strategy == "ddp":
        weights, gradients, optimizer = 4 * params, 4 * params, 8 * params
        teacher = act_bytes * params if distill else 0
    else:
        in_flight = source.embedding_params() + source.hidden + 2 * _layer_params(source)
        weights = 4 * params // world + act_bytes * in_flight
        gradients = 4 * params // world + act_bytes * in_flight  # unsharded until reduce-scattered
        if grad_accum > 1 and world > 1:  # no reduce-scatter before the last micro-batch
            gradients = 4 * params + act_bytes * in_flight
        optimizer = 8 * params // world
        teacher = act_bytes * (params // world + in_flight) if distill else 0
    masked = target is not None
    activations = _activation_bytes(source, tokens, act_bytes, checkpointing, masked, distill, gpu)
    refit = 0
    if target is not None and refit_sequences:
        refit = _refit_bytes(source, target, -(-refit_sequences // world), per_rank, seq_len)
    return MemoryPlan(strategy, weights, gradients, optimizer, activations, masks, teacher, refit)


def parse_memory(text: str) -> int:
    """Bytes from ``80GB``, ``80GiB``, ``512MB`` or a plain number.

    Raises:
        ShearError: not a size.
    """
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise ShearError(f"not a memory size: {text!r} (e.g. 80GB)")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


def device_memory(device: torch.device) -> int:
    """The memory of ``device``: the GPU's total, or the host's RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def run_plans(cfg: Any, world: int, device: torch.device) -> dict[str, MemoryPlan]:
    """The DDP and FSDP plans of a run's options (a ``TrainConfig`` or ``PruneConfig``)."""
    from shear.loading import load_config
    from shear.target import resolve_target

    source = Arch.from_config(load_config(cfg.model))
    target = resolve_target(source, cfg.target) if getattr(cfg, "target", None) else None
    return {
        s: plan_memory(
            source, target, world, cfg.batch_size, cfg.seq_len, s, cfg.activation_checkpointing,
            cfg.distill_weight > 0, device.type == "cuda", cfg.grad_accum, refit_sequences(cfg),
        )
        for s in ("ddp", "fsdp")
    }  # fmt: skip


def refit_sequences(cfg: Any) -> int:
    """The sequences a run's refit at the cut reads (0: it does not refit, or it resumes and
    the checkpoint holds the refitted weights)."""
    if not getattr(cfg, "refit", 0) or cfg.resume:
        return 0
    return cfg.refit_sequences or cfg.calibration_sequences


def ddp_fits(cfg: Any, world: int, device: torch.device) -> bool:
    """Whether the planner says a DDP run of ``cfg`` fits this device (``--strategy auto``)."""
    return run_plans(cfg, world, device)["ddp"].fits(device_memory(device))


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def start_peak(device: torch.device) -> int:
    """Start measuring a run's peak: reset the peak counters; returns the baseline (CPU: the
    resident set now, which the planner does not count; GPU: 0)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return 0
    try:  # Linux: "5" resets the peak resident set size (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_kb("VmRSS") or 0


def measured_peak(device: torch.device, baseline: int) -> int | None:
    """The peak since :func:`start_peak`: CUDA max allocated, or the peak resident set minus
    the baseline (None where the system does not say)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = _status_kb("VmHWM")
    return None if peak is None else peak - baseline


def format_plans(plans: dict[str, MemoryPlan], device_bytes: int | None) -> str:
    """A table of the plans in GB, and whether each fits ``device_bytes``."""
    parts = ("weights", "gradients", "optimizer", "activations", "masks", "teacher", "refit", "total")
    lines = [f"{'per rank (GB)':<14}" + "".join(f"{s:>10}" for s in plans)]
    for part in parts:
        row = [plans[s].summary()[part] / _GB for s in plans]
        lines.append(f"{part:<14}" + "".join(f"{v:>10.2f}" for v in row))
    if device_bytes:
        fits = ["yes" if plans[s].fits(device_bytes) else "no" for s in plans]
        label = f"fits {device_bytes / _GB:.0f} GB"
        lines.append(f"{label:<14}" + "".join(f"{f:>10}" for f in fits))
    if any(p.refit for p in plans.values()):
        lines.append("(the refit runs before the first step: the total counts it or training, the larger)")
    return "\n".join(lines)
