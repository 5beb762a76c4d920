"""Least-squares refit at the cut: the kept weights take over what the pruned units did.

After a one-shot cut every linear layer of the pruned model reads fewer inputs than in the
source: q/k/v and gate/up lose hidden channels (and see an RMSNorm taken over the kept
channels only), o_proj loses query heads, down_proj MLP channels. The refit replaces each
kept weight block with the one that best reproduces, on calibration sequences, what the
source's layer computed there:

    W' = argmin_W' sum_tokens || W_src[rows] u_src - W' u_pruned ||^2
       = W_src[rows] C G^-1,   C = sum u_src u_pruned^T,   G = sum u_pruned u_pruned^T (+ damping)

with ``u_src`` the input of the linear in the source and ``u_pruned`` its input in the pruned
model (OBS-style reconstruction, as SparseGPT and the structured-pruning methods that
followed it do). Layers are refitted in order, and within a layer q/k/v, then o_proj, then
gate/up, then down_proj, each on the inputs the already-refitted pruned model produces, so
a layer also corrects the error the layers before it left. Embeddings, norms and the LM
head are kept as the cut gives them.

The plain least-squares fit overfits a few thousand calibration tokens: the weights move by
more than their own norm and the refitted model, though 1.3 nats better right after the cut,
recovers far worse in training (RESULTS.md). The fit is therefore held near the cut weights:

    W' = argmin sum_tokens || W_src[rows] u_src - W' u_pruned ||^2 + lam || W' - W_cut ||^2
       = (W_src[rows] C + lam W_cut) (G + lam I)^-1,   lam = damping * mean(diag G)

``damping`` 0 is the plain fit, large values keep the cut. :func:`refit_masked` refits the
choice of a masked model in place (``shear prune --refit``); :func:`refit_pruned` works on a
dense pruned model.

The refit streams: for each stage, chunk by chunk of ``batch_size`` sequences, the source
layer runs up to the stage's linears and the pruned layer up to their input, and the chunk
adds to ``G``, ``C`` and, per linear, ``Y = sum ||W_src[rows] u_src||^2`` (the source
linear's output, which its forward computes anyway). The errors before and after follow from
these alone, ``||W u_src - W' u||^2 = Y - 2 <W C, W'> + <W' G, W'>``, with no second pass
over the tokens. Products are float32 per chunk, summed in float64, solved in float64
(:data:`PRODUCT_DTYPE`). Memory: ``G`` and ``C`` of one stage in float64 plus one chunk's
activations, and the hidden states entering the current layer for every calibration
sequence, in the source and in the pruned model (as the layer-by-layer order needs). Under
torchrun each rank streams its share of the sequences and the statistics are all-reduced
(``distributed``), so every rank solves the same system.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from shear.arch import Arch
from shear.errors import ShearError
from shear.export import GatherSpec, export_config, export_plan, gather, kept_layers
from shear.masks import HardConcreteMasks

#: The linear layers refitted in one step: each group shares its input.
STAGES = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))  # fmt: skip


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass once the input it wants is seen."""


def _full(t: torch.Tensor) -> torch.Tensor:
    """A tensor as a whole: a sharded one (FSDP) is all-gathered (every rank must call)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@contextmanager
def _unsharded(module: nn.Module) -> Iterator[None]:
    """FSDP: the module's own parameters gathered for the block (every rank must enter it),
    resharded after it; anything else as it is."""
    if not isinstance(module, FSDPModule):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def _call(module: nn.Module, *args, **kwargs):
    # an FSDP module's hooks would gather and free its parameters around every call (one
    # collective per chunk, skipped when a pass stops early): its caller holds them gathered
    return module.forward(*args, **kwargs) if isinstance(module, FSDPModule) else module(*args, **kwargs)


def _chunks(input_ids: torch.Tensor, batch_size: int, distributed: bool) -> list[torch.Tensor]:
    """The chunks this process streams: all sequences by ``batch_size``, or (``distributed``)
    this rank's share, in as many chunks on every rank (FSDP gathers in lockstep)."""
    if not distributed:
        return list(input_ids.split(batch_size))
    world = dist.get_world_size()
    count = math.ceil(math.ceil(len(input_ids) / world) / batch_size)
    if len(input_ids) // world < count:  # the smallest share: the same decision on every rank
        raise ShearError(
            f"{len(input_ids)} refit sequences over {world} ranks leave a rank with fewer than {count} "
            f"chunks of --batch-size {batch_size}: give at least {world * count} sequences"
        )
    return list(input_ids.tensor_split(world)[dist.get_rank()].tensor_split(count))


def _first_layer_inputs(model: nn.Module, chunks: Sequence[torch.Tensor]) -> list[tuple]:
    """``(hidden_states, kwargs)`` entering the first decoder layer, per chunk of sequences."""
    out: list[tuple] = []
    layer0 = model.base_model.layers[0]

    def grab(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        out.append((hidden, {k: v for k, v in kwargs.items() if k != "past_key_values"}))
        raise _Stop

    handle = layer0.register_forward_pre_hook(grab, with_kwargs=True, prepend=True)  # before FSDP's
    device = next(model.parameters()).device
    try:
        with _unsharded(model):
            for chunk in chunks:
                try:
                    _call(model, chunk.to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return out


def _run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = _call(layer, hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _stage_pass(
    layer: nn.Module, names: Sequence[str], hidden: torch.Tensor, kwargs: dict, outputs: bool, stop: bool
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
    """One chunk through ``layer``: the input of the stage's linears ``names`` (they share it) and,
    if ``outputs``, each one's output less its bias; the pass ends there if ``stop``, else the
    layer's output comes back too."""
    seen: dict[str, torch.Tensor] = {}
    last = names[-1] if outputs else names[0]

    def pre(module, args):
        seen["u"] = args[0].detach().flatten(0, -2)
        if stop and not outputs:
            raise _Stop

    def post(module, args, out, n):
        seen[n] = out.detach().flatten(0, -2) - (module.bias if module.bias is not None else 0)
        if stop and n == last:
            raise _Stop

    handles = [layer.get_submodule(names[0]).register_forward_pre_hook(pre)]
    if outputs:
        handles += [layer.get_submodule(n).register_forward_hook(partial(post, n=n)) for n in names]
    try:
        out = _run_layer(layer, hidden, kwargs)
    except _Stop:
        out = None
    finally:
        for h in handles:
            h.remove()
    return seen["u"], [seen[n] for n in names] if outputs else [], out


#: dtype of the per-chunk products ``u^T u``; their sums are float64 (measured in RESULTS.md,
#: "Streaming refit": float32 products change the refitted weights by ~1e-7 relative to float64).
PRODUCT_DTYPE = torch.float32


class RefitStats:
    """What the refit of one stage needs, summed chunk by chunk over the calibration tokens:
    ``G = sum u u^T``, ``C = sum u_src u^T`` (float64; shared by the stage's linears) and, per
    linear, ``Y = sum ||W_src[rows] u_src||^2`` (the errors' denominator)."""

    def __init__(self, n: int):
        self.g: torch.Tensor | float = 0.0
        self.c: torch.Tensor | float = 0.0
        self.y = torch.zeros(n, dtype=torch.float64)

    def add(
        self,
        u_src: torch.Tensor,
        u_new: torch.Tensor,
        y_src: Sequence[torch.Tensor],
        rows: Sequence[torch.Tensor | None],
    ) -> None:
        """Add one chunk: the inputs of the stage in the source and in the pruned model (rows:
        tokens), and the outputs (less bias) of the stage's source linears, of which the pruned
        linears keep ``rows`` (None: all)."""
        a, b = u_src.to(PRODUCT_DTYPE), u_new.to(PRODUCT_DTYPE)
        self.g = self.g + (b.T @ b).double()
        self.c = self.c + (a.T @ b).double()
        for i, (y, r) in enumerate(zip(y_src, rows, strict=True)):
            y = y if r is None else y[:, r.to(y.device)]
            self.y[i] += float(y.to(PRODUCT_DTYPE).square().sum(dtype=torch.float64))

    def all_reduce(self) -> None:
        """Sum the statistics over the ranks of the default process group (each rank summed its
        share of the sequences)."""
        import torch.distributed as dist

        g, c = torch.as_tensor(self.g), torch.as_tensor(self.c)
        flat = torch.cat([g.reshape(-1), c.reshape(-1), self.y.to(g.device)])
        dist.all_reduce(flat)
        self.g = flat[: g.numel()].view_as(g)
        self.c = flat[g.numel() : g.numel() + c.numel()].view_as(c)
        self.y = flat[g.numel() + c.numel() :].cpu()

    def error(self, i: int, wc: torch.Tensor, fit: torch.Tensor, fit_g: torch.Tensor) -> float:
        """Relative error ``||W u_src - W' u|| / ||W u_src||`` over the tokens of linear ``i``
        (``wc = W_src[rows] C``, ``fit = W'``, ``fit_g = W' G``), from the statistics alone:
        ``||.||^2 = Y - 2 <W C, W'> + <W' G, W'>``."""
        y = float(self.y[i])
        num = y - 2 * float((wc * fit).sum()) + float((fit_g * fit).sum())
        return (max(num, 0.0) / max(y, 1e-30)) ** 0.5


@torch.no_grad()
def refit_pruned(
    source: nn.Module,
    pruned: nn.Module,
    plan: Sequence[GatherSpec],
    input_ids: torch.Tensor,
    batch_size: int = 4,
    damping: float = 0.3,
    distributed: bool = False,
) -> dict[str, tuple[float, float]]:
    """Refit the kept linear weights of ``pruned`` to reproduce the source (module docstring).

    Args:
        source: the unpruned model (not changed).
        pruned: the dense pruned model that ``plan`` gathered from ``source`` (changed in place).
        plan: the export plan (:func:`shear.export.export_plan` on ``source``): which source
            rows every pruned weight kept.
        input_ids: ``[n, seq_len]`` calibration sequences (with ``distributed``, this rank's share).
        batch_size: sequences per forward pass (one chunk of the statistics).
        damping: strength of the pull toward the cut weights, a fraction of the mean
            diagonal of ``G`` (module docstring).
        distributed: sum the statistics over the ranks of the default process group; every
            rank must call with the same number of chunks and ends with the same weights.

    Returns:
        The relative reconstruction error ``||Y - W U'|| / ||Y||`` of every refitted linear
        over the calibration tokens, with the cut weights and with the refitted ones, by the
        pruned model's parameter name.
    """
    by_name = {s.name: s for s in plan}
    src_layers, new_layers = source.base_model.layers, pruned.base_model.layers
    src_index = {id(layer.self_attn.q_proj.weight): i for i, layer in enumerate(src_layers)}
    kept: dict[int, int] = {}  # source layer -> pruned layer
    for new in range(len(new_layers)):
        spec = by_name.get(f"model.layers.{new}.self_attn.q_proj.weight")
        if spec is None or id(spec.src) not in src_index:
            raise ShearError("the plan does not gather the pruned model's layers from this source")
        kept[src_index[id(spec.src)]] = new
    errors: dict[str, tuple[float, float]] = {}
    was = source.training, pruned.training
    source.eval(), pruned.eval()
    try:
        chunks = _chunks(input_ids, batch_size, distributed)
        h_src, h_new = _first_layer_inputs(source, chunks), _first_layer_inputs(pruned, chunks)
        for old, layer in enumerate(src_layers):
            if old not in kept:
                with _unsharded(layer):
                    h_src = [(_run_layer(layer, h, kw), kw) for h, kw in h_src]
                continue
            new_layer = new_layers[kept[old]]
            for stage in STAGES:
                keys = [f"model.layers.{kept[old]}.{n}.weight" for n in stage]
                rows = [by_name[k].rows for k in keys]
                last = stage is STAGES[-1]  # its source pass runs the whole layer: the next input
                stats = RefitStats(len(stage))
                with _unsharded(layer):
                    for i, ((hs, kw), (hn, kwn)) in enumerate(zip(h_src, h_new, strict=True)):
                        u_src, y_src, out = _stage_pass(layer, stage, hs, kw, outputs=True, stop=not last)
                        u_new, _, _ = _stage_pass(new_layer, stage, hn, kwn, outputs=False, stop=True)
                        stats.add(u_src, u_new, y_src, rows)
                        if last:
                            h_src[i] = (out, kw)
                if distributed:
                    stats.all_reduce()
                g = torch.as_tensor(stats.g)
                lam = damping * g.diagonal().mean().clamp_min(1e-12)
                # G + lam I, factored once for the stage's linears (symmetric positive definite)
                chol = torch.linalg.cholesky(g + lam * torch.eye(g.shape[0], dtype=g.dtype, device=g.device))
                for j, (n, key) in enumerate(zip(stage, keys, strict=True)):
                    errors[key] = _refit_one(new_layer.get_submodule(n), by_name[key], stats, j, chol, lam)
            h_new = [(_run_layer(new_layer, h, kw), kw) for h, kw in h_new]
    finally:
        source.train(was[0]), pruned.train(was[1])
    return errors


def _refit_one(
    lin: nn.Linear,
    spec: GatherSpec,
    stats: RefitStats,
    i: int,
    chol: torch.Tensor,
    lam: torch.Tensor,
) -> tuple[float, float]:
    """Set ``lin.weight`` to the damped least-squares fit (``chol``: the Cholesky factor of
    ``G + lam I``); the relative errors before and after it."""
    w = _full(spec.src).detach().double()  # the source's weight as stored (FSDP: its shards)
    if spec.rows is not None:
        w = w[spec.rows.to(w.device)]
    wc = w @ torch.as_tensor(stats.c).to(w.device)
    cut = lin.weight.detach().double()
    fit = torch.cholesky_solve((wc + lam * cut).T, chol).T  # G is symmetric
    lin.weight.copy_(fit.to(lin.weight.dtype))
    # W' (G + lam I) = W C + lam W_cut gives W' G without another d^3 product
    return stats.error(i, wc, cut, cut @ stats.g), stats.error(i, wc, fit, wc + lam * (cut - fit))


#: Suffixes of the weights the refit changes.
REFITTED = tuple(f"{n}.weight" for stage in STAGES for n in stage)


def dense_pruned(model: nn.Module, plan: Sequence[GatherSpec], arch: Arch, layers: list[int]) -> nn.Module:
    """The pruned model a plan describes, built in memory (what the export would load as).

    Args:
        model: the source the plan gathers from.
        plan: from :func:`shear.export.export_plan`.
        arch: the plan's architecture.
        layers: source indices of the kept layers.

    Returns:
        A plain Hugging Face causal LM of the target architecture, in eval mode.
    """
    from transformers import AutoModelForCausalLM

    config = export_config(model, arch, layers)
    pruned = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=model.dtype)
    missing, unexpected = pruned.load_state_dict({s.name: gather(s) for s in plan}, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ShearError(
            f"the plan does not fill the pruned model: missing {missing}, unexpected {unexpected}"
        )
    pruned.tie_weights()
    return pruned.to(next(model.parameters()).device).eval()


@torch.no_grad()
def refit_masked(
    model: nn.Module,
    masks: HardConcreteMasks,
    z: dict[str, torch.Tensor],
    input_ids: torch.Tensor,
    batch_size: int = 4,
    damping: float = 0.3,
    distributed: bool = False,
) -> dict[str, tuple[float, float]]:
    """Refit the units a masked model keeps under ``z``, in place (module docstring).

    The masks are taken off for the source's forward passes and put back; afterwards the
    masked model under ``z`` computes the refitted pruned model exactly (the kept weight
    blocks are divided by the mask values the export multiplies in). Only the kept blocks
    change, so the refit belongs to a choice that no longer changes: masks frozen from the
    first step, or a one-shot export.

    Under torchrun (``distributed``) every rank calls it with the same arguments and streams
    its share of ``input_ids``; every rank ends with the same weights. A sharded (FSDP2)
    model stays sharded but for the layer being refitted, gathered for its forward passes;
    every rank holds the dense pruned model, gathered one source tensor at a time, and the
    refitted blocks are written back into the shards.

    Args:
        model: the model with ``masks`` attached, its weights still the source's.
        masks: its masks.
        z: the mask values the pruned model is made of (deterministic or fixed).
        input_ids: ``[n, seq_len]`` calibration sequences (all of them, on every rank).
        batch_size: sequences per forward pass.
        damping: see :func:`refit_pruned`.
        distributed: as :func:`refit_pruned`.

    Returns:
        As :func:`refit_pruned`.
    """
    from shear.patch import attach_masks, remove_masks

    plan, arch = export_plan(model, masks, z)
    whole = [replace(s, src=_full(s.src)) for s in plan]  # FSDP: one source tensor at a time
    pruned = dense_pruned(model, whole, arch, kept_layers(masks, z))
    del whole
    remove_masks(model)
    try:
        errors = refit_pruned(model, pruned, plan, input_ids, batch_size, damping, distributed)
    finally:
        attach_masks(model, masks)
    fitted = dict(pruned.named_parameters())
    for spec in plan:
        if not spec.name.endswith(REFITTED):
            continue
        w = fitted[spec.name].detach().to(torch.float32)
        if spec.row_scale is not None:
            w = w / spec.row_scale.to(w)[:, None]
        if spec.col_scale is not None:
            w = w / spec.col_scale.to(w)[None, :]
        src = _full(spec.src)
        rows = spec.rows if spec.rows is not None else torch.arange(src.shape[0])
        cols = spec.cols if spec.cols is not None else torch.arange(src.shape[1])
        src.index_put_((rows.to(src.device)[:, None], cols.to(src.device)[None, :]), w.to(src))
        if src is not spec.src:  # back into this rank's shard
            spec.src.copy_(distribute_tensor(src, spec.src.device_mesh, spec.src.placements))
    return errors
