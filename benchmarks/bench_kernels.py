"""pytest-benchmark suite of shear's masked ops: op x shape set x provider x pass.

Ops (one decoder layer, :mod:`common`): ``mlp``, ``attention`` (the attention block),
``rmsnorm``, ``layer`` (the whole masked decoder layer); shape sets ``smollm2`` and
``llama7b``; providers ``fused`` (Triton kernels), ``eager`` (shear's reference ops),
``compile`` (torch.compile of the reference) and ``dense`` (unmasked Hugging Face layer);
passes ``forward`` and ``forward_backward``. Plus ``test_mask_sampling``: one sample of every
hard-concrete mask of the whole model (fused ``sample_all`` vs the reference loop).

Skipped, with the reason shown by ``-rs``: ``fused`` without CUDA (the Triton interpreter's
timings are meaningless) and the 7B shapes without CUDA. ``extra_info`` of every benchmark holds
the nominal FLOPs, TFLOP/s at the median and (GPU) the peak memory of one pass. Ratios between
providers are fairer from ``benchmarks/report_kernels.py`` (interleaved rounds in one run).

Environment knobs: ``SHEAR_BENCH_TOKENS`` (tokens per pass; default 512 on CPU, 8192 on GPU),
``SHEAR_BENCH_DTYPE`` (fp32 / bf16 / fp16; default fp32 on CPU, bf16 on GPU),
``SHEAR_BENCH_ZERO_HALF`` (``blocks`` or ``random``: half the heads and intermediate channels of
the masked providers exactly zero), ``SHEAR_BENCH_COMPILE=0`` (skip torch.compile),
``SHEAR_BENCH_THREADS`` (CPU threads, default 1: steadier on a shared machine; 0: torch's default).

Run:
    python -m pytest benchmarks/bench_kernels.py --benchmark-only -rs \
        --benchmark-columns=median,iqr,rounds --benchmark-group-by=group
"""

from __future__ import annotations

import os

import common as C
import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEVICE.type == "cuda"
TOKENS = int(os.environ.get("SHEAR_BENCH_TOKENS", "8192" if GPU else "512"))
DTYPE_NAME = os.environ.get("SHEAR_BENCH_DTYPE", "bf16" if GPU else "fp32")
DTYPE = C.DTYPES[DTYPE_NAME]
ZERO_HALF = os.environ.get("SHEAR_BENCH_ZERO_HALF") or None
ROUNDS, WARMUP = (20, 3) if GPU else (5, 2)  # warm-up rounds include torch.compile's compilation
if not GPU and os.environ.get("SHEAR_BENCH_THREADS", "1") != "0":
    torch.set_num_threads(int(os.environ.get("SHEAR_BENCH_THREADS", "1")))

_worlds: dict[str, C.LayerWorld] = {}


def _world(shapes: str) -> C.LayerWorld:
    """The models of a shape set, built once per session (a 7B layer world holds about 3.5 GB)."""
    if shapes not in _worlds:
        case = C.LayerCase(shapes, TOKENS, DTYPE, DEVICE, zero_half=ZERO_HALF)
        runnable = tuple(p for p in C.PROVIDERS if C.skip_reason(p, shapes, DEVICE) is None)
        _worlds[shapes] = C.build_world(case, runnable)
    return _worlds[shapes]


def _record(benchmark, setup, step, flops, nbytes) -> None:
    """extra_info: nominal FLOPs / bytes, TFLOP/s or GB/s at the median, peak memory of one pass (GPU)."""
    if benchmark.stats is None:  # --benchmark-disable: the function ran once, untimed
        return
    median = benchmark.stats.stats.median
    info = benchmark.extra_info
    info.update(device=str(DEVICE), dtype=DTYPE_NAME, tokens=TOKENS, flops=flops)
    if flops:
        info["tflops"] = flops / median / 1e12
    if nbytes:
        info["gbps"] = nbytes / median / 1e9
    sample = C.timed(setup, step, DEVICE)
    info["peak_mib"] = sample.peak_bytes / 2**20 if sample.peak_bytes is not None else "n/a (CPU)"


@pytest.mark.parametrize("pas", C.PASSES)
@pytest.mark.parametrize("provider", C.PROVIDERS)
@pytest.mark.parametrize("shapes", ["smollm2", "llama7b"])
@pytest.mark.parametrize("op", C.OPS)
def test_masked_op(benchmark, op, shapes, provider, pas):
    reason = C.skip_reason(provider, shapes, DEVICE)
    if reason:
        pytest.skip(reason)
    world = _world(shapes)
    backward = pas == "forward_backward"
    setup, step = C.make_step(world, provider, op, backward)

    def run() -> None:
        step()
        C.sync(DEVICE)

    zero = f" zero-half-{ZERO_HALF}" if ZERO_HALF else ""
    benchmark.group = f"{shapes} {op} {pas} {TOKENS}tok {DTYPE_NAME}{zero}"
    benchmark.pedantic(run, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    _record(
        benchmark, setup, step, C.op_flops(op, world.case, backward), C.op_bytes(op, world.case, backward)
    )


@pytest.mark.parametrize("pas", C.PASSES)
@pytest.mark.parametrize("provider", ["fused", "eager"])
@pytest.mark.parametrize("shapes", ["smollm2", "llama7b"])
def test_mask_sampling(benchmark, shapes, provider, pas):
    """One sample of every hard-concrete mask of the whole model (7B: 32 x (32 + 11008) + ... units)."""
    reason = C.skip_reason(provider, "smollm2", DEVICE)  # sampling is cheap: only fused needs CUDA
    if reason:
        pytest.skip(reason)
    masks = C.model_masks(shapes, DEVICE)
    setup, step = C.sampling_step(masks, provider, "sample", pas == "forward_backward")

    def run() -> None:
        step()
        C.sync(DEVICE)

    benchmark.group = f"{shapes} mask sampling {pas} ({C.mask_units(masks)} units)"
    benchmark.pedantic(run, setup=setup, rounds=ROUNDS * 2, warmup_rounds=WARMUP, iterations=1)
