"""Apply hard-concrete masks to a Hugging Face LLaMA-family model in place, and undo it.

Nothing of Hugging Face's modelling code is copied: the modules where masks act (o_proj,
the MLP, every RMSNorm, and the attention modules, which expose their head mask) become
shear's masked layers (:mod:`shear.kernels`) in place, each a subclass of both the layer and
the module's own class, and a forward pre-hook on the base model computes the masks once
per forward pass (a fresh sample per micro-batch in training mode, the deterministic masks
in eval mode). The model's attention function becomes :func:`shear.dispatch.attention`,
which decides per call between shear's kernel and SDPA, so a model patched on the CPU and
moved to a GPU runs the kernel there.
Loss, ``generate`` and ``save_pretrained`` keep working; the state dict keeps its keys
(the masks live in a separate :class:`~shear.masks.HardConcreteMasks` module).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from shear import dispatch
from shear.arch import Arch
from shear.errors import ShearError
from shear.kernels.masked_attention import ShearMaskedAttention
from shear.kernels.masked_linear import ShearMaskedLinear
from shear.kernels.masked_mlp import ShearMaskedSwiGLUMLP
from shear.kernels.masked_rms_norm import ShearMaskedRMSNorm
from shear.masked_modules import MaskSlot, mask_module, unmask_module
from shear.masks import HardConcreteMasks
from shear.target import resolve_target

_STATE = "_shear_state"


def apply_masks(
    model: nn.Module,
    target: str | os.PathLike | dict | Arch,
    types: list[str] | None = None,
    generator: torch.Generator | None = None,
) -> HardConcreteMasks:
    """Create the masks for pruning ``model`` to ``target`` and wire them into the model.

    Args:
        model: a ``LlamaForCausalLM``, ``MistralForCausalLM`` or ``Qwen2ForCausalLM``.
        target: the target architecture (see :func:`shear.target.resolve_target`).
        types: mask types to learn; None learns every dimension the target shrinks.
        generator: optional RNG for the initial log_alpha and the training noise.

    Returns:
        The masks (on the model's device). They are not a submodule of the model: give
        their parameters to the optimiser (:func:`shear.lagrangian.build_optimizer`) and
        move them with the model.

    Example:
        >>> masks = apply_masks(model, "layers=24,hidden=384,heads=6,kv_heads=2,intermediate=1024")
        >>> loss = model(input_ids, labels=input_ids).loss  # masks sampled (train mode)
    """
    source = Arch.from_config(model.config)
    masks = HardConcreteMasks(source, resolve_target(source, target), types, generator)
    masks.to(next(model.parameters()).device)
    attach_masks(model, masks)
    return masks


def _decoder(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", model)
    if not hasattr(base, "layers") or not hasattr(base, "norm"):
        raise ShearError(f"{type(model).__name__} has no decoder with .layers and .norm to mask")
    return base


def attach_masks(model: nn.Module, masks: HardConcreteMasks) -> None:
    """Wire existing masks into ``model`` (see :func:`apply_masks`).

    Args:
        model: a supported causal LM with ``masks.source``'s architecture.
        masks: the masks to use.
    """
    if getattr(model, _STATE, None) is not None:
        raise ShearError("this model already has masks applied; call remove_masks(model) first")
    if Arch.from_config(model.config) != masks.source:
        raise ShearError("the masks were made for a different architecture than this model's")
    decoder = _decoder(model)
    types = set(masks.types)
    hidden = "hidden" in types
    patched: list[nn.Module] = []

    def patch(module: nn.Module, masked_layer: type, layer: int | None, *fields: str | None) -> None:
        if all(f is None for f in fields):
            return  # no learned mask touches this module: leave it as it was
        mask_module(module, masked_layer, MaskSlot(masks, layer, fields))
        patched.append(module)

    def field(name: str, present: bool) -> str | None:
        return name if present else None

    head_masks = bool(types & {"head", "kv"})
    for i, layer in enumerate(decoder.layers):
        attn, mlp = layer.self_attn, layer.mlp
        patch(attn, ShearMaskedAttention, i, field("attn_in", head_masks))
        patch(
            attn.o_proj,
            ShearMaskedLinear,
            i,
            field("attn_in", head_masks),
            field("attn_out", bool(types & {"layer", "head_layer"}) or hidden),
        )
        _check_swiglu(mlp)
        patch(
            mlp,
            ShearMaskedSwiGLUMLP,
            i,
            field("int_out", "intermediate" in types),
            field("mlp_out", bool(types & {"layer", "mlp"}) or hidden),
        )
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            patch(norm, ShearMaskedRMSNorm, None, field("hidden", hidden))
    patch(decoder.norm, ShearMaskedRMSNorm, None, field("hidden", hidden))

    def refresh(module: nn.Module, args: Any) -> None:
        masks.refresh(module.training)

    hook = decoder.register_forward_pre_hook(refresh)
    # Attention decides per call (shear's kernel with head skipping on the Triton path, SDPA
    # elsewhere), whatever device the model is on now.
    original_attn = model.config._attn_implementation
    model.set_attn_implementation(dispatch.register_attention())
    object.__setattr__(model, _STATE, (masks, hook, patched, original_attn))


def _check_swiglu(mlp: nn.Module) -> None:
    act = getattr(getattr(mlp, "config", None), "hidden_act", "silu")
    parts = ("gate_proj", "up_proj", "down_proj")
    if act not in ("silu", "swish") or not all(hasattr(mlp, n) for n in parts):
        raise ShearError(f"shear masks SwiGLU MLPs (gate/up/down with silu); this model's MLP uses {act!r}")


def remove_masks(model: nn.Module) -> None:
    """Restore the model's original modules and forward; the weights are untouched."""
    state = getattr(model, _STATE, None)
    if state is None:
        return
    masks, hook, patched, original_attn = state
    hook.remove()
    if model.config._attn_implementation != original_attn:
        model.set_attn_implementation(original_attn)
    for module in patched:
        unmask_module(module)
    masks.current = None
    object.__setattr__(model, _STATE, None)


def masks_of(model: nn.Module) -> HardConcreteMasks | None:
    """The masks applied to ``model``, or None."""
    state = getattr(model, _STATE, None)
    return state[0] if state else None
