"""Plain-PyTorch reference ops: the oracle for the Triton kernels and the CPU production path."""

from shear.ops.hard_concrete import (
    deterministic_mask,
    hard_concrete_sample,
    keep_probability,
    keep_topk,
    soft_mask,
    uniform_noise,
)
from shear.ops.masked_linear import masked_linear
from shear.ops.masked_rms_norm import masked_rms_norm

__all__ = [
    "deterministic_mask",
    "hard_concrete_sample",
    "keep_probability",
    "keep_topk",
    "masked_linear",
    "masked_rms_norm",
    "soft_mask",
    "uniform_noise",
]
