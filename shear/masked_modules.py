"""Masked versions of Hugging Face's Linear and RMSNorm modules.

:func:`shear.patch.apply_masks` turns existing module instances into these by swapping
their class for a subclass of the original (``MaskedLinear`` over ``nn.Linear``,
``MaskedLlamaRMSNorm`` over ``LlamaRMSNorm``, ...): the weights, parameter names, hooks
and ``isinstance`` checks stay as they were, so the model remains a normal Hugging Face
model. Each module reads its mask for the current forward pass through a
:class:`MaskSlot`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from shear import dispatch
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


class MaskedLinearMixin:
    """Linear whose forward is ``((x * m_in) W^T + b) * m_out`` with masks from its slot."""

    shear_slot: MaskSlot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m_in, m_out = self.shear_slot.get()
        return dispatch.masked_linear(x, self.weight, self.bias, m_in, m_out)


class MaskedRMSNormMixin:
    """RMSNorm over the kept hidden dimensions, then scaled by the hidden mask."""

    shear_slot: MaskSlot

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        (z,) = self.shear_slot.get()
        return dispatch.masked_rms_norm(hidden_states, self.weight, z, self.variance_epsilon)


class MaskedAttentionMixin:
    """Attention whose per-query-head mask is visible to shear's attention function.

    The forward stays Hugging Face's; :func:`shear.dispatch.attention` reads
    ``shear_head_mask`` to skip heads whose mask is exactly 0 (o_proj applies the mask).
    """

    shear_slot: MaskSlot

    @property
    def shear_head_mask(self) -> torch.Tensor | None:
        (m,) = self.shear_slot.get()
        return None if m is None else m.view(-1, self.head_dim)[:, 0].contiguous()


class MaskedMLPMixin:
    """SwiGLU MLP (gate_proj, up_proj, down_proj; silu) with the intermediate and output masks.

    One op for the whole block, so the Triton path can fuse it (gate and up in one GEMM
    pass, the activation in its epilogue, zero channels skipped).
    """

    shear_slot: MaskSlot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m_int, m_out = self.shear_slot.get()
        g, u, d = self.gate_proj, self.up_proj, self.down_proj
        return dispatch.masked_swiglu_mlp(
            x, g.weight, u.weight, d.weight, m_int, m_out, gate_bias=g.bias, up_bias=u.bias, down_bias=d.bias
        )


@functools.cache
def masked_class(base: type[nn.Module], mixin: type) -> type[nn.Module]:
    """The subclass of ``base`` whose forward comes from ``mixin`` (cached per pair)."""
    return type(f"Masked{base.__name__}", (mixin, base), {"_shear_base": base})


def mask_module(module: nn.Module, mixin: type, slot: MaskSlot) -> None:
    """Turn ``module`` into its masked subclass in place and attach its slot."""
    base = getattr(type(module), "_shear_base", type(module))
    module.__class__ = masked_class(base, mixin)
    module.shear_slot = slot


def unmask_module(module: nn.Module) -> None:
    """Undo :func:`mask_module`: restore the original class and drop the slot."""
    base = getattr(type(module), "_shear_base", None)
    if base is not None:
        module.__class__ = base
        del module.shear_slot
