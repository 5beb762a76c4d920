"""Plain-PyTorch reference ops: the oracle for the Triton kernels and the CPU production path."""

from shear.ops.attention import causal_attention
from shear.ops.hard_concrete import (
    deterministic_mask,
    hard_concrete_sample,
    keep_probability,
    keep_topk,
    soft_mask,
    uniform_noise,
)
from shear.ops.linear_kl import linear_kl, linear_kl_eager
from shear.ops.masked_linear import masked_linear
from shear.ops.masked_mlp import masked_swiglu_mlp
from shear.ops.masked_rms_norm import masked_rms_norm

__all__ = [
    "causal_attention",
    "deterministic_mask",
    "hard_concrete_sample",
    "keep_probability",
    "keep_topk",
    "linear_kl",
    "linear_kl_eager",
    "masked_linear",
    "masked_rms_norm",
    "masked_swiglu_mlp",
    "soft_mask",
    "uniform_noise",
]
