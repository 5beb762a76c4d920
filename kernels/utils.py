"""Helpers shared by the Triton ops: launch checks, dtype policy, interpreter detection.

Every op file in this package follows one shape (after Liger-Kernel):

* ``@triton.jit`` kernels ``_<op>_forward_kernel`` / ``_<op>_backward_kernel``;
* host launchers ``<op>_forward`` / ``<op>_backward``;
* ``class <Op>Function(torch.autograd.Function)``;
* a thin functional API ``shear_<op>`` with the same signature and semantics as the
  plain-PyTorch reference in :mod:`shear.ops` (the oracle the tests compare against);
* an ``nn.Module`` layer that drops into a model.

Kernels take ``tl.program_id(0).to(tl.int64)`` offsets, accumulate in float32 and store in
the input dtype. On a machine without a GPU they run under ``TRITON_INTERPRET=1`` (set
before the first ``@triton.jit`` is decorated) on CPU tensors.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch
import triton.language as tl

#: dtypes the kernels accept.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreter_active() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_flags(dtype: torch.dtype) -> dict[str, Any]:
    """The constexprs every kernel with a ``tl.dot`` takes for its operand dtype.

    * ``UPCAST``: upcast bf16 operands to fp32 before ``tl.dot``; only in the interpreter,
      which returns garbage for bf16 dots (triton issue 11584). On a GPU the native bf16
      tensor-core path runs.
    * ``INPUT_PRECISION``: for fp32 operands, TF32 exactly when torch allows it for matmuls
      (``torch.backends.cuda.matmul.allow_tf32``, off by default), so that results match
      torch's on the same GPU; None (the default) for 16-bit operands.
    * ``ACC_DTYPE``: float32 accumulators (float64 for float64 inputs, the tests' reference).
    """
    if dtype == torch.float32:
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    else:
        precision = None
    return dict(
        UPCAST=bool(interpreter_active() and dtype == torch.bfloat16),
        INPUT_PRECISION=precision,
        ACC_DTYPE=tl.float64 if dtype == torch.float64 else tl.float32,
    )


def autocast_inputs(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The operands of a matmul-like op as autocast would hand them to it.

    Custom autograd Functions are invisible to ``torch.autocast``: under it, the ops these
    kernels replace (``F.linear``, SDPA) run in the autocast dtype, and their inputs arrive
    in mixed dtypes (fp32 weights, bf16 activations; RoPE even promotes q and k to fp32).
    So the functional APIs cast their floating operands to the autocast dtype first, when
    autocast is on for the operands' device. The casts are differentiable: gradients reach
    the fp32 originals in fp32.
    """
    first = next((t for t in tensors if t is not None), None)
    kind = first.device.type if first is not None else None
    if kind is None or not torch.amp.is_autocast_available(kind) or not torch.is_autocast_enabled(kind):
        return list(tensors)
    dtype = torch.get_autocast_dtype(kind)
    return [t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors]


def check_launchable(*tensors: torch.Tensor | None) -> None:
    """Raise a clear error unless the tensors can run through the Triton kernels.

    CUDA tensors always can; CPU tensors only under the interpreter; ``meta`` tensors (shapes
    only) pass so that :mod:`shear.kernels.aot` can capture the launches without running them.
    """
    for t in tensors:
        if t is None:
            continue
        if t.dtype not in SUPPORTED_DTYPES and t.dtype != torch.float64:
            raise TypeError(f"shear.kernels: unsupported dtype {t.dtype}; use float32, float16 or bfloat16")
        if not (t.is_cuda or t.is_meta) and not interpreter_active():
            raise RuntimeError(
                "shear.kernels run on CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 before "
                "importing shear.kernels (tests), or use the reference ops in shear.ops"
            )


def ensure_contiguous(fn: Callable) -> Callable:
    """Make every tensor argument contiguous before calling ``fn`` (autograd Function helper)."""

    @functools.wraps(fn)
    def wrapper(ctx: Any, *args: Any, **kwargs: Any) -> Any:
        args = [a.contiguous() if isinstance(a, torch.Tensor) else a for a in args]
        kwargs = {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return fn(ctx, *args, **kwargs)

    return wrapper


class MaskedLayer:
    """Where shear's masked layers get their masks (a base of every ``ShearMasked*`` layer).

    Used on its own, a layer takes its masks as forward arguments. In a model patched by
    :func:`shear.patch.apply_masks`, which turns the model's own modules into these layers
    in place, forward is called without them and the masks of the forward pass in progress
    come from the slot the patch attaches (``shear_slot``, a
    :class:`shear.masked_modules.MaskSlot`).
    """

    shear_slot = None

    def _masks(self, *given: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        if self.shear_slot is None:
            return given
        if any(g is not None for g in given):
            raise ValueError(f"{type(self).__name__}: its masks come from the patched model, not arguments")
        return self.shear_slot.get()
