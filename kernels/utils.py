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
import triton

#: dtypes the kernels accept.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreter_active() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def upcast_dots() -> bool:
    """Whether kernels must upcast bf16 operands to fp32 before ``tl.dot``.

    The interpreter returns garbage for bf16 ``tl.dot`` (triton issue 11584); on a GPU the
    native bf16 tensor-core path is used. Pass the result as a ``tl.constexpr``.
    """
    return interpreter_active()


def check_launchable(*tensors: torch.Tensor | None) -> None:
    """Raise a clear error unless the tensors can run through the Triton kernels.

    CUDA tensors always can; CPU tensors only under the interpreter.
    """
    for t in tensors:
        if t is None:
            continue
        if t.dtype not in SUPPORTED_DTYPES and t.dtype != torch.float64:
            raise TypeError(f"shear.kernels: unsupported dtype {t.dtype}; use float32, float16 or bfloat16")
        if not t.is_cuda and not interpreter_active():
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


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (Triton block sizes must be powers of two)."""
    return triton.next_power_of_2(max(int(n), 1))
