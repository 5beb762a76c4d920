"""Activation importance: the one-shot choice of what to keep, and masks initialised from it.

Scores are measured on calibration sequences drawn from the training data, with the
unpruned model and no gradient (Minitron's activation-based importance, peers.md), in
the layout of the masks (:mod:`shear.masks`):

==============  ==============================================================================
mask            score of a unit
==============  ==============================================================================
hidden          mean |x| of the channel over every RMSNorm output (both norms of every
                layer and the final norm): what every read of the residual stream sees
head            per query head, the mean L2 norm of its attention context (its head_dim
                slice of o_proj's input), laid out as the head mask is
kv              the sum of its query heads' scores: a KV group is as useful as what reads it
intermediate    mean |down_proj input| of the channel
layer           block influence: mean over tokens of 1 - cos(layer input, layer output)
head_layer, mlp 1 (a uniform target keeps attention and an MLP in every kept layer)
==============  ==============================================================================

:func:`init_from_importance` turns scores into log_alpha: the target count of best units of
every row at the clamp's top (kept with probability 0.998), the others at its bottom
(0.047). The deterministic masks at step 0 are then exactly the one-shot choice, and the
expected kept units start within a few percent of the targets.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from shear.arch import Arch
from shear.data.corpus import Corpus
from shear.errors import ShearError
from shear.masks import HardConcreteMasks
from shear.ops import hard_concrete as hc

#: ``--init`` choices: from activation importance (default), or the paper's uniform N(5, 0.01).
INITS = ("importance", "uniform")


def calibration_rows(corpus: Corpus, count: int, seed: int) -> dict[str, list[int]]:
    """Which training sequences calibrate the importance: ``count`` spread over the domains.

    Args:
        corpus: the training data.
        count: sequences in all (domains take turns; a domain never gives more than it has).
        seed: seed of the draw within each domain.

    Returns:
        ``{domain: [row indices]}``, recorded in the run so that the choice can be checked.
    """
    if count <= 0:
        raise ShearError(f"calibration_sequences must be positive, got {count}")
    gen = torch.Generator().manual_seed(seed)
    order = {d: torch.randperm(len(corpus.train[d]), generator=gen).tolist() for d in corpus.domains}
    rows: dict[str, list[int]] = {d: [] for d in corpus.domains}
    while sum(map(len, rows.values())) < count and any(order.values()):
        for d in corpus.domains:
            if order[d] and sum(map(len, rows.values())) < count:
                rows[d].append(order[d].pop(0))
    return rows


def calibration_batch(corpus: Corpus, rows: dict[str, list[int]]) -> torch.Tensor:
    """The calibration sequences as one ``[n, seq_len]`` tensor."""
    return torch.stack([corpus.train[d][i] for d, idx in rows.items() for i in idx])


@contextmanager
def _hooks(modules: list[tuple[nn.Module, Any, bool]]) -> Iterator[None]:
    handles = [
        m.register_forward_pre_hook(fn, with_kwargs=True)
        if pre
        else m.register_forward_hook(fn, with_kwargs=True)
        for m, fn, pre in modules
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _hidden_states_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def activation_importance(
    model: nn.Module, source: Arch, input_ids: torch.Tensor, batch_size: int = 4
) -> dict[str, torch.Tensor]:
    """Score every unit of every mask type (see the module docstring) on ``input_ids``.

    Args:
        model: the unpruned Hugging Face causal LM (LLaMA family), no masks attached.
        source: its architecture.
        input_ids: ``[n, seq_len]`` calibration sequences.
        batch_size: sequences per forward pass.

    Returns:
        Float64 scores by mask type, shaped as :func:`shear.masks.mask_shapes` with the head
        mask per KV group: ``{"hidden": [d], "head": [L, G, n], "kv": [L, G],
        "intermediate": [L, I], "layer": [L], "head_layer": [L], "mlp": [L]}``.
    """
    L, G, n, dh = source.layers, source.kv_heads, source.heads_per_group, source.head_dim
    f64 = dict(dtype=torch.float64, device="cpu")
    hidden, heads = torch.zeros(source.hidden, **f64), torch.zeros(L, G * n, **f64)
    inter, influence = torch.zeros(L, source.intermediate, **f64), torch.zeros(L, **f64)
    tokens = 0
    decoder = model.model
    hooks: list[tuple[nn.Module, Any, bool]] = []

    def on_norm(module, args, kwargs, out):
        hidden.add_(out.detach().abs().double().sum((0, 1)).cpu())

    for norm in [
        m for layer in decoder.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)
    ] + [decoder.norm]:
        hooks.append((norm, on_norm, False))
    for idx, layer in enumerate(decoder.layers):

        def on_context(module, args, kwargs, idx=idx):
            x = _hidden_states_arg(args, kwargs).detach().double()
            heads[idx] += x.unflatten(-1, (G * n, dh)).norm(dim=-1).sum((0, 1)).cpu()

        def on_down(module, args, kwargs, idx=idx):
            inter[idx] += _hidden_states_arg(args, kwargs).detach().abs().double().sum((0, 1)).cpu()

        def on_layer(module, args, kwargs, out, idx=idx):
            x = _hidden_states_arg(args, kwargs).detach().double()
            y = (out[0] if isinstance(out, tuple) else out).detach().double()
            influence[idx] += (1 - nn.functional.cosine_similarity(x, y, dim=-1)).sum().cpu()

        hooks += [
            (layer.self_attn.o_proj, on_context, True),
            (layer.mlp.down_proj, on_down, True),
            (layer, on_layer, False),
        ]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with _hooks(hooks):
            for chunk in input_ids.split(batch_size):
                model(chunk.to(device), use_cache=False)
                tokens += chunk.numel()
    finally:
        model.train(was_training)
    heads = heads.view(L, G, n) / tokens
    return {
        "hidden": hidden / tokens,
        "head": heads,
        "kv": heads.sum(-1),
        "intermediate": inter / tokens,
        "layer": influence / tokens,
        "head_layer": torch.ones(L, **f64),
        "mlp": torch.ones(L, **f64),
    }


def scores_for(masks: HardConcreteMasks, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The scores of every learned mask type, shaped as its log_alpha.

    A head mask shared across KV groups (``[L, n]``) sums its scores over the groups.
    """
    out = {}
    for name, spec in masks.specs.items():
        s = scores[name]
        if name == "head" and s.dim() == len(spec.shape) + 1:
            s = s.sum(1)
        if tuple(s.shape) != spec.shape:
            raise ShearError(f"importance of {name!r} has shape {tuple(s.shape)}, the mask {spec.shape}")
        out[name] = s
    return out


@torch.no_grad()
def init_from_importance(masks: HardConcreteMasks, scores: dict[str, torch.Tensor]) -> None:
    """Set log_alpha so that the deterministic masks keep the best-scoring units of every row.

    Args:
        masks: the run's masks (changed in place).
        scores: from :func:`activation_importance`.
    """
    for name, s in scores_for(masks, scores).items():
        keep = hc.keep_topk(s, masks.specs[name].target)
        la = masks.log_alpha[name]
        la.copy_(torch.where(keep.bool(), hc.LOG_ALPHA_MAX, hc.LOG_ALPHA_MIN).to(la))


def decided_sparsity(masks: HardConcreteMasks) -> dict[str, float]:
    """Expected sparsity of a row that keeps exactly its target units, by type.

    With the target units at the clamp's top and the others at its bottom (where
    :func:`init_from_importance` puts them), a row's keep probabilities sum to a little more
    than the target count: the clamp keeps every unit's probability above 0.047. Held to
    the paper's ``1 - target / size``, the Lagrangian would have to push the kept units
    down into noisy sampling instead; held to this value, masks that are already decided
    stay so, and any unit can still swap in for another.
    """
    hi = float(hc.keep_probability(torch.tensor(hc.LOG_ALPHA_MAX, dtype=torch.float64)))
    lo = float(hc.keep_probability(torch.tensor(hc.LOG_ALPHA_MIN, dtype=torch.float64)))
    return {n: 1.0 - (s.target * hi + (s.size - s.target) * lo) / s.size for n, s in masks.specs.items()}


def keep_indicators(masks: HardConcreteMasks) -> dict[str, torch.Tensor]:
    """0/1 masks of the units the deterministic masks keep (values of exactly 1): the one-shot model."""
    return {n: (z != 0).to(z.dtype) for n, z in masks.deterministic().items()}
