"""Every kernel launch compiled ahead of time for sm_80 (A100) and sm_90 (H100), without a GPU.

The rest of the suite runs the kernels in the interpreter, where the GPU branches of the
launchers (bf16 dots, large blocks, warps, stages) never run. Here ``shear.kernels.aot``
runs the real launchers on meta tensors with the interpreter off (in a subprocess: this
process has it on), at the LLaMA-2-7B and SmolLM2-135M shapes in bf16 and, for SmolLM2,
fp16, and compiles every distinct launch with the ptxas shipped in the triton wheel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from shear.kernels import aot

CASES = ["llama7b:bf16", "smollm2:bf16", "smollm2:fp16"]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    why = aot.ptxas_available()
    if why:
        pytest.skip(f"ptxas / cuobjdump from the triton wheel cannot run here: {why}")
    out = tmp_path_factory.mktemp("aot") / "builds.json"
    env = dict(os.environ, TRITON_INTERPRET="0")
    cmd = [sys.executable, "-m", "shear.kernels.aot", "--quiet", "--jobs", "2", "--cases", *CASES]
    proc = subprocess.run([*cmd, "--json", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert out.exists(), f"shear.kernels.aot wrote no report (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def _label(b: dict) -> str:
    return f"{b['op']}: {b['kernel']} [{b['flags']}] sm_{b['arch']} {b['dtype']} {','.join(b['shapes'])}"


def test_every_kernel_is_compiled_for_both_targets(report):
    builds = report["builds"]
    assert not report["not_compiled"], f"kernels no op in aot.OPS launches: {report['not_compiled']}"
    for arch in (80, 90):
        compiled = {b["kernel"] for b in builds if b["arch"] == arch}
        assert compiled == set(aot.jit_kernels()), f"sm_{arch}"
    assert {b["dtype"] for b in builds} == {"bf16", "fp16"}
    errors = [f"{_label(b)}: {b['error']}" for b in builds if b["error"]]
    assert not errors, "\n".join(errors)


def test_shared_memory_fits_the_device(report):
    over = [
        f"{_label(b)}: {b['shared']} B" for b in report["builds"] if b["shared"] > aot.SHARED_LIMIT[b["arch"]]
    ]
    assert not over, "\n".join(over)


def test_no_register_spills(report):
    """ptxas's spill counts and the STL / LDL instructions in the SASS (cuobjdump's LOCAL
    column stays 0 even when a kernel spills, with the ptxas bundled in triton 3.9)."""
    spills = [
        f"{_label(b)}: {b['registers']} regs, {b['spill_stores']}/{b['spill_loads']} B spilled, "
        f"{b['stl_ldl']} STL/LDL, stack {b['stack']} B"
        for b in report["builds"]
        if b["spill_stores"] or b["spill_loads"] or b["stl_ldl"]
    ]
    assert not spills, "\n".join(spills)


def test_every_dot_runs_on_tensor_cores(report):
    dots = [b for b in report["builds"] if b["has_dot"]]
    assert len({b["kernel"] for b in dots}) >= 6  # the GEMMs and the three attention kernels
    missing = [_label(b) for b in dots if not b["tensor_core"]]
    assert not missing, "tl.dot without HMMA / HGMMA:\n" + "\n".join(missing)


def test_masked_gemms_stay_pipelined(report):
    """Every tile the GEMM loops load keeps >= 2 shared-memory buffers (load of step i + 1
    overlapping the dot of step i), with a reduction mask too: that is the live-block list
    read one step ahead (masked_linear's docstring)."""
    gemms = [b for b in report["builds"] if b["kernel"] in aot.MIN_PIPELINE_BUFFERS]
    with_reduction_mask = [
        b for b in gemms if b["kernel"] == "_masked_linear_forward_kernel" and "HAS_MIN" in b["flags"]
    ]
    assert with_reduction_mask, "no masked GEMM with a reduction mask was compiled"
    shallow = [
        f"{_label(b)}: buffers {b['buffers']}"
        for b in gemms
        if not b["buffers"] or min(b["buffers"]) < aot.MIN_PIPELINE_BUFFERS[b["kernel"]]
    ]
    assert not shallow, "\n".join(shallow)
    # and the checks the module applies agree with the ones above
    assert all(not b["problems"] for b in report["builds"])
