"""Choose, per call, between the fused Triton kernels and the plain-PyTorch reference ops.

``SHEAR_KERNELS`` (read at every call, so tests and users can switch at run time):

* ``auto`` (default): the Triton kernels for CUDA tensors, the reference ops otherwise;
* ``triton``: always the kernels (on CPU tensors this needs ``TRITON_INTERPRET=1``, set
  before ``shear.kernels`` is first imported: that is how the CPU test suite runs them);
* ``reference``: always the reference ops.

Both paths compute the same math (the kernels are tested against the references), so the
masked model behaves the same on either; only speed and memory differ.
"""

from __future__ import annotations

import os

import torch

from shear import ops
from shear.ops.linear_kl import IGNORE_INDEX

ENV = "SHEAR_KERNELS"
_CHOICES = ("auto", "triton", "reference")


def backend() -> str:
    """The configured backend: ``auto``, ``triton`` or ``reference``."""
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in _CHOICES:
        raise ValueError(f"{ENV} must be one of {', '.join(_CHOICES)}, got {mode!r}")
    return mode


def use_triton(x: torch.Tensor) -> bool:
    """Whether an op on ``x`` runs the Triton kernel."""
    mode = backend()
    return mode == "triton" or (mode == "auto" and x.is_cuda)


def masked_linear(x, weight, bias=None, m_in=None, m_out=None) -> torch.Tensor:
    """:func:`shear.ops.masked_linear` on the chosen backend."""
    if use_triton(x):
        from shear.kernels.masked_linear import shear_masked_linear

        return shear_masked_linear(x, weight, bias, m_in, m_out)
    return ops.masked_linear(x, weight, bias, m_in, m_out)


def masked_rms_norm(x, weight, z, eps: float) -> torch.Tensor:
    """:func:`shear.ops.masked_rms_norm` on the chosen backend."""
    if use_triton(x):
        from shear.kernels.masked_rms_norm import shear_masked_rms_norm

        return shear_masked_rms_norm(x, weight, z, eps)
    return ops.masked_rms_norm(x, weight, z, eps)


def masked_swiglu_mlp(
    x, gate_weight, up_weight, down_weight, m_int=None, m_out=None, **biases
) -> torch.Tensor:
    """:func:`shear.ops.masked_swiglu_mlp` on the chosen backend."""
    if use_triton(x):
        from shear.kernels.masked_mlp import shear_masked_swiglu_mlp

        return shear_masked_swiglu_mlp(x, gate_weight, up_weight, down_weight, m_int, m_out, **biases)
    return ops.masked_swiglu_mlp(x, gate_weight, up_weight, down_weight, m_int, m_out, **biases)


def linear_kl(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    labels,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """:func:`shear.ops.linear_kl` on the chosen backend."""
    if use_triton(student_hidden):
        from shear.kernels.linear_kl import shear_linear_kl

        return shear_linear_kl(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels, temperature,
            kl_weight, ignore_index, chunk_size,
        )  # fmt: skip
    return ops.linear_kl(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, temperature,
        kl_weight, ignore_index, chunk_size,
    )  # fmt: skip


def hard_concrete_sample_all(
    log_alphas: list[torch.Tensor], generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """One training sample of every mask: one kernel launch on the Triton path.

    The two paths draw their noise differently (torch.rand vs Triton's Philox ``tl.rand``),
    so samples differ between backends; each is reproducible from ``generator``.
    """
    if log_alphas and use_triton(log_alphas[0]):
        from shear.kernels.hard_concrete import sample_all

        device = generator.device if generator is not None else "cpu"
        # one small host read per micro-batch: the kernel takes the seed as an argument
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=device))
        return sample_all(log_alphas, seed)
    out = []
    for la in log_alphas:
        gen = generator if generator is not None and generator.device == la.device else None
        u = ops.uniform_noise(la.shape, device=la.device, dtype=la.dtype, generator=gen)
        out.append(ops.hard_concrete_sample(la, u))
    return out


#: Name under which shear's attention is registered with transformers.
ATTENTION_NAME = "shear_masked"


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The masked model's attention function (transformers ``AttentionInterface``), per call.

    Shear's Triton kernel (skipping the query heads whose ``module.shear_head_mask`` is
    exactly 0) when the tensors take the Triton path (:func:`use_triton`) and the kernel
    computes this call (:func:`shear.kernels.masked_attention.unsupported_reason`: the one
    statement of its limits, such as padding masks, KV-cache decoding or dropout in
    training); PyTorch's SDPA otherwise, as transformers would run it. Skipping is exact
    without the kernel too: o_proj multiplies the skipped heads by 0.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if use_triton(query):
        from shear.kernels.masked_attention import shear_attention_interface, unsupported_reason

        if unsupported_reason(module, query, key, attention_mask, dropout, **kwargs) is None:
            return shear_attention_interface(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


def register_attention() -> str:
    """Register :func:`attention` (and SDPA's mask builder) with transformers; returns its name."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME
