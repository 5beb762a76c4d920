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
dense pruned model. Memory: one layer's linear inputs for every calibration token, in the
source and in the pruned model, and float64 ``G`` and ``C``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from shear.arch import Arch
from shear.errors import ShearError
from shear.export import GatherSpec, export_config, export_plan, gather, kept_layers
from shear.masks import HardConcreteMasks

#: The linear layers refitted in one step: each group shares its input.
STAGES = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))  # fmt: skip


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass once the input it wants is seen."""


def _first_layer_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int) -> list[tuple]:
    """``(hidden_states, kwargs)`` entering the first decoder layer, per chunk of sequences."""
    out: list[tuple] = []
    layer0 = model.base_model.layers[0]

    def grab(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        out.append((hidden, {k: v for k, v in kwargs.items() if k != "past_key_values"}))
        raise _Stop

    handle = layer0.register_forward_pre_hook(grab, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for chunk in input_ids.split(batch_size):
            try:
                model(chunk.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return out


def _run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _inputs_of(layer: nn.Module, names: Sequence[str], states: list[tuple], stop: bool) -> dict[str, list]:
    """Inputs of the named linears of ``layer`` on every chunk (the pass ends at the last one if ``stop``)."""
    seen: dict[str, list] = {n: [] for n in names}
    handles = []
    for n in names:

        def grab(module, args, n=n):
            seen[n].append(args[0].detach().flatten(0, -2))
            if stop and n == names[-1]:
                raise _Stop

        handles.append(layer.get_submodule(n).register_forward_pre_hook(grab))
    try:
        for hidden, kwargs in states:
            try:
                _run_layer(layer, hidden, kwargs)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return seen


@torch.no_grad()
def refit_pruned(
    source: nn.Module,
    pruned: nn.Module,
    plan: Sequence[GatherSpec],
    input_ids: torch.Tensor,
    batch_size: int = 4,
    damping: float = 0.3,
) -> dict[str, tuple[float, float]]:
    """Refit the kept linear weights of ``pruned`` to reproduce the source (module docstring).

    Args:
        source: the unpruned model (not changed).
        pruned: the dense pruned model that ``plan`` gathered from ``source`` (changed in place).
        plan: the export plan (:func:`shear.export.export_plan` on ``source``): which source
            rows every pruned weight kept.
        input_ids: ``[n, seq_len]`` calibration sequences.
        batch_size: sequences per forward pass.
        damping: strength of the pull toward the cut weights, a fraction of the mean
            diagonal of ``G`` (module docstring).

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
        h_src = _first_layer_inputs(source, input_ids, batch_size)
        h_new = _first_layer_inputs(pruned, input_ids, batch_size)
        for old, layer in enumerate(src_layers):
            if old in kept:
                u_src = _inputs_of(layer, [stage[0] for stage in STAGES], h_src, stop=False)
                new_layer = new_layers[kept[old]]
                for stage in STAGES:
                    u_new = _inputs_of(new_layer, stage[:1], h_new, stop=True)[stage[0]]
                    stats = _gram(u_src[stage[0]], u_new)  # shared by the stage's linears
                    for n in stage:
                        key = f"model.layers.{kept[old]}.{n}.weight"
                        errors[key] = _refit_one(
                            new_layer.get_submodule(n), layer.get_submodule(n), by_name[key].rows,
                            stats, u_src[stage[0]], u_new, damping,
                        )  # fmt: skip
                h_new = [(_run_layer(new_layer, h, kw), kw) for h, kw in h_new]
            h_src = [(_run_layer(layer, h, kw), kw) for h, kw in h_src]
    finally:
        source.train(was[0]), pruned.train(was[1])
    return errors


def _gram(u_src: list, u_new: list) -> tuple[torch.Tensor, torch.Tensor]:
    """``G = sum u_new u_new^T`` and ``C = sum u_src u_new^T`` over the chunks, in float64."""
    g = c = 0
    for a, b in zip(u_src, u_new, strict=True):
        a, b = a.double(), b.double()
        g = g + b.T @ b
        c = c + a.T @ b
    return g, c


def _refit_one(
    lin: nn.Linear,
    src_lin: nn.Linear,
    rows: torch.Tensor | None,
    stats: tuple[torch.Tensor, torch.Tensor],
    u_src: list,
    u_new: list,
    damping: float,
) -> tuple[float, float]:
    """Set ``lin.weight`` to the damped least-squares fit; the relative errors before and after it."""
    w = src_lin.weight.detach().double()
    if rows is not None:
        w = w[rows.to(w.device)]
    g, c = stats
    cut = lin.weight.detach().double()
    lam = damping * g.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    fit = torch.linalg.solve(g + lam * eye, (w @ c + lam * cut).T).T  # G is symmetric
    lin.weight.copy_(fit.to(lin.weight.dtype))
    return _relative_error(w, cut, u_src, u_new), _relative_error(w, fit, u_src, u_new)


def _relative_error(w: torch.Tensor, fit: torch.Tensor, u_src: list, u_new: list) -> float:
    num = den = 0.0
    for a, b in zip(u_src, u_new, strict=True):
        y = a.double() @ w.T
        num += float((y - b.double() @ fit.T).square().sum())
        den += float(y.square().sum())
    return (num / max(den, 1e-30)) ** 0.5


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
) -> dict[str, tuple[float, float]]:
    """Refit the units a masked model keeps under ``z``, in place (module docstring).

    The masks are taken off for the source's forward passes and put back; afterwards the
    masked model under ``z`` computes the refitted pruned model exactly (the kept weight
    blocks are divided by the mask values the export multiplies in). Only the kept blocks
    change, so the refit belongs to a choice that no longer changes: masks frozen from the
    first step, or a one-shot export.

    Args:
        model: the model with ``masks`` attached, its weights still the source's.
        masks: its masks.
        z: the mask values the pruned model is made of (deterministic or fixed).
        input_ids: ``[n, seq_len]`` calibration sequences.
        batch_size: sequences per forward pass.
        damping: see :func:`refit_pruned`.

    Returns:
        As :func:`refit_pruned`.
    """
    from shear.patch import attach_masks, remove_masks

    plan, arch = export_plan(model, masks, z)
    pruned = dense_pruned(model, plan, arch, kept_layers(masks, z))
    remove_masks(model)
    try:
        errors = refit_pruned(model, pruned, plan, input_ids, batch_size, damping)
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
        src = spec.src
        rows = spec.rows if spec.rows is not None else torch.arange(src.shape[0])
        cols = spec.cols if spec.cols is not None else torch.arange(src.shape[1])
        src.index_put_((rows.to(src.device)[:, None], cols.to(src.device)[None, :]), w.to(src))
    return errors
