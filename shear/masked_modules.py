"""Turning a Hugging Face module into shear's masked layer in place, and back.

:func:`shear.patch.apply_masks` swaps a module's class for a subclass of both the masked
layer of its op (the ``ShearMasked*`` layers of :mod:`shear.kernels`) and its own class
(``MaskedLinear`` over ``ShearMaskedLinear`` and ``nn.Linear``, ``MaskedLlamaRMSNorm`` over
``ShearMaskedRMSNorm`` and ``LlamaRMSNorm``, ...): the weights, parameter names, hooks and
``isinstance`` checks stay as they were, so the model remains a normal Hugging Face model,
and the forward is the layer's. Each module reads its masks for the current forward pass
through a :class:`MaskSlot`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from shear.masks import HardConcreteMasks


@dataclass(eq=False)
class MaskSlot:
    """Where a module finds its masks: fields of ``masks.current`` at one layer.

    A plain object, not an nn.Module, so it is not registered as a submodule and the
    masks never appear in the model's state dict.

    Attributes:
        masks: the run's masks.
        layer: decoder layer index for per-layer fields; None for the model-wide ``hidden``.
        fields: names of :class:`~shear.masks.LayerMasks` fields, in the order the module
            wants them (``("attn_in", "attn_out")`` for o_proj, ``("hidden",)`` for norms).
    """

    masks: HardConcreteMasks
    layer: int | None
    fields: tuple[str | None, ...]

    def get(self) -> tuple[torch.Tensor | None, ...]:
        """The mask tensors of the forward pass in progress (None where a field is absent)."""
        cur = self.masks.current
        if cur is None:
            raise RuntimeError("masks were not refreshed: run the model through its forward()")
        out = []
        for f in self.fields:
            t = getattr(cur, f) if f is not None else None
            if t is not None and self.layer is not None:
                t = t[self.layer]
            out.append(t)
        return tuple(out)


@functools.cache
def masked_class(base: type[nn.Module], layer: type) -> type[nn.Module]:
    """The subclass of ``layer`` and ``base`` whose forward is the layer's (cached per pair)."""
    return type(f"Masked{base.__name__}", (layer, base), {"_shear_base": base})


def mask_module(module: nn.Module, layer: type, slot: MaskSlot) -> None:
    """Turn ``module`` into the masked ``layer`` in place and attach its slot."""
    base = getattr(type(module), "_shear_base", type(module))
    module.__class__ = masked_class(base, layer)
    module.shear_slot = slot


def unmask_module(module: nn.Module) -> None:
    """Undo :func:`mask_module`: restore the original class and drop the slot."""
    base = getattr(type(module), "_shear_base", None)
    if base is not None:
        module.__class__ = base
        del module.shear_slot
