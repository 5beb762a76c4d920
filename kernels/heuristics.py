"""Block sizes, warps and pipeline stages of every kernel, in one place (heuristics, no autotune).

Autotune with more than one config fails in the interpreter, and a training step launches
each kernel at a handful of shapes, so every launcher asks here instead. Under the
interpreter every program instance costs about 1 ms: small blocks keep the test grids small
(tl.dot needs each dimension >= 16). On a GPU: tensor-core sized tiles.

The GPU choices are checked ahead of time for sm_80 and sm_90 at the LLaMA-2-7B and
SmolLM2 shapes by ``python -m shear.kernels.aot`` (in CI: tests/kernels/test_kernel_compile.py):
no register spills, shared memory within the device, tensor cores, pipelined GEMM loops.
The table of registers / shared memory / stages is in benchmarks/RESULTS.md.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from shear.kernels.utils import interpreter_active

#: Elements per program of the 1-D elementwise kernels (hard-concrete sampling).
ELEMENTWISE_BLOCK = 1024
#: Largest row the row-wise kernels (RMSNorm) hold in registers in one block.
MAX_ROW_BLOCK = 65536


def pow2_block(n: int, cap: int, floor: int = 16) -> int:
    """Power-of-two block for a dimension of size n: at least ``floor``, at most ``cap``."""
    return max(floor, min(cap, triton.next_power_of_2(max(int(n), 1))))


class GemmConfig(NamedTuple):
    """One output tile of a GEMM: ``[block_rows, block_cols]``, reduced ``block_red`` at a time."""

    block_rows: int
    block_cols: int
    block_red: int
    num_warps: int
    num_stages: int


def gemm_config(
    rows: int,
    cols: int,
    red: int,
    dtype: torch.dtype,
    block_sizes: tuple[int, int, int] | None = None,
    accumulators: int = 1,
) -> GemmConfig:
    """Tiles of the masked GEMMs (masked linear forward, dx and dW; the MLP's gate/up pass).

    Args:
        rows, cols: output size; red: reduction length.
        dtype: operand dtype.
        block_sizes: optional explicit (rows, cols, red) blocks (tests).
        accumulators: output tiles a program holds (2 for the fused gate/up GEMM: its column
            block is halved so that both accumulators stay in registers).
    """
    if block_sizes is not None:
        br, bc, bk = block_sizes
        return GemmConfig(br, bc, bk, 4, 2)
    if interpreter_active():
        return GemmConfig(pow2_block(rows, 32), pow2_block(cols, 32), pow2_block(red, 32), 4, 1)
    if dtype == torch.float64:
        return GemmConfig(pow2_block(rows, 64), pow2_block(cols, 64), pow2_block(red, 32), 4, 2)
    br = pow2_block(rows, 128)
    bc = pow2_block(cols, 128 // accumulators)
    bk = pow2_block(red, 32 if dtype == torch.float32 else 64)
    return GemmConfig(br, bc, bk, 8 if br * bc * accumulators >= 128 * 128 else 4, 3)


def elementwise_2d_config(
    rows: int, cols: int, block_sizes: tuple[int, int] | None = None
) -> tuple[int, int, int]:
    """(block_rows, block_cols, num_warps) of a 2-D elementwise kernel (the SwiGLU backward)."""
    if block_sizes is not None:
        return (*block_sizes, 4)
    return pow2_block(rows, 32), pow2_block(cols, 32 if interpreter_active() else 128), 4


def row_config(n_cols: int) -> tuple[int, int]:
    """(block, num_warps) of a kernel holding a whole row in one block (RMSNorm).

    More warps for wider rows (as Liger-Kernel's calculate_settings).
    """
    block = triton.next_power_of_2(max(int(n_cols), 1))
    if block > MAX_ROW_BLOCK:
        raise ValueError(f"row of {n_cols} elements exceeds the fused limit {MAX_ROW_BLOCK}")
    warps = 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, warps


def vocab_config(vocab: int) -> tuple[int, int]:
    """(block, num_warps) of the row kernel that walks a row of logits a block at a time (linear KL).

    The interpreter: 32-wide blocks, so that small test vocabularies span several blocks and
    end in a partial one. GPU: 4096 logits per block over 8 warps (16 per thread for each of
    the student's and teacher's blocks: no spills on sm_80 / sm_90, benchmarks/RESULTS.md).
    """
    if interpreter_active():
        return 32, 4
    return pow2_block(vocab, 4096), 8


def num_programs(n_rows: int, device: torch.device) -> int:
    """Programs of a row-reduction kernel (one partial row each): one per SM."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    elif device.type == "meta":
        sms = 132  # shapes only (shear.kernels.aot): an H100's SM count
    else:
        sms = 4  # the interpreter: each program costs ~1 ms, a few are enough
    return max(1, min(n_rows, sms))


class AttentionBlocks(NamedTuple):
    """Blocks of one attention kernel: ``block_m`` query rows, ``block_n`` key rows."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


class AttentionConfig(NamedTuple):
    """Launch settings of the attention kernels for one (head_dim, dtype, sequence length).

    Within each kernel one block size divides the other, as the causal split needs:
    forward and dq: ``block_n | block_m``; dK/dV: ``block_m | block_n``.
    """

    block_d: int
    fwd: AttentionBlocks
    dkdv: AttentionBlocks
    dq: AttentionBlocks


def attention_config(head_dim: int, dtype: torch.dtype, seq_len: int) -> AttentionConfig:
    """Flash-attention block sizes (tuned for head_dim <= 128; up to 256 supported).

    16-bit inputs run every kernel at 8 warps and 3 stages: forward 128 x 64 (head_dim 64) or
    128 x 32 (head_dim 128), dK/dV 32 x 64, dQ 128 x 32 or 64 x 32. Compiled for sm_80 and
    sm_90 these are the largest tiles without register spills and with the loops
    double-buffered (at 4 warps the head-dim-64 forward, dQ and dK/dV spill on sm_80; dK/dV
    32 x 128 spills up to ~650 B per thread; benchmarks/RESULTS.md has the table).
    fp32 / fp64 and head_dim > 128 use smaller blocks at 2 stages.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    if interpreter_active():
        b = AttentionBlocks(16, 16, 4, 1)
        return AttentionConfig(block_d, b, b, b)
    if dtype in (torch.float32, torch.float64) or block_d > 128:
        fwd, dkdv, dq = (64, 32, 4, 2), (32, 64, 8, 2), (64, 32, 4, 2)
    elif block_d <= 64:
        fwd, dkdv, dq = (128, 64, 8, 3), (32, 64, 8, 3), (128, 32, 8, 3)
    else:
        fwd, dkdv, dq = (128, 32, 8, 3), (32, 64, 8, 3), (64, 32, 8, 3)
    cap = max(16, triton.next_power_of_2(seq_len))

    def blocks(m: int, n: int, warps: int, stages: int) -> AttentionBlocks:
        return AttentionBlocks(min(m, cap), min(n, cap), warps, stages)

    return AttentionConfig(block_d, blocks(*fwd), blocks(*dkdv), blocks(*dq))
