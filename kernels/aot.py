"""Compile every kernel launch ahead of time for sm_80 (A100) and sm_90 (H100), without a GPU.

The kernels' GPU branches (bf16 dots without upcast, large blocks, num_warps / num_stages)
never run in the interpreter. This module runs the real launchers on ``meta`` tensors (real
shapes and strides, no memory) with Triton's launch intercepted, so it sees exactly the
arguments, constexprs, num_warps and num_stages a GPU launch would get; it then specialises
each launch as Triton's JIT would (pointer alignment, integer divisibility, ones) and
compiles it with ``triton.compile`` for each target. ptxas, cuobjdump and nvdisasm ship in
the triton wheel, so no CUDA installation is needed.

Per build it reports registers, stack, shared memory, spills (ptxas's spill counts and the
STL / LDL instructions in the SASS: cuobjdump's LOCAL column stays 0 with the ptxas bundled
in triton 3.9), tensor-core instructions (HMMA, HGMMA) and the software-pipelining depth
(how many buffers the pipeliner gave each tile the loop loads), and checks:

* it compiles; shared memory fits the device (163 KB sm_80, 227 KB sm_90);
* no spills; tensor-core instructions in every kernel with a ``tl.dot``;
* the GEMM loops in :data:`MIN_PIPELINE_BUFFERS` keep at least that many buffers per tile.

Run ``python -m shear.kernels.aot`` in a fresh process (the interpreter must be off before
``shear.kernels`` is imported: ``TRITON_INTERPRET`` unset or 0). Identical launches (same
kernel, specialisation and options) compile once per target.

Adding an op: write ``def _my_op(shape: ModelShape, dtype) -> None`` that runs the op's
public functional API forward and backward (``.backward()``) on meta tensors the way the
model calls it, and add ``"my_op": _my_op`` to :data:`OPS`. Every Triton launch it makes is
captured; nothing else is needed. If its GEMM loop must stay pipelined, add the kernel's
name to :data:`MIN_PIPELINE_BUFFERS`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import functools
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import triton

#: Shared memory per block a kernel may use (bytes): A100 163 KB, H100 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
#: Kernels whose reduction loop must be software-pipelined: minimum buffers per loaded tile.
MIN_PIPELINE_BUFFERS = {
    "_masked_linear_forward_kernel": 2,
    "_masked_linear_backward_kernel": 2,
    "_masked_mlp_forward_kernel": 2,
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class ModelShape:
    """The shapes one decoder layer's kernels see in a training step.

    Attributes:
        name: short name used in reports.
        hidden: d; heads: H query heads; kv_heads: G; head_dim: D; intermediate: I.
        layers: decoder layers (sizes the mask-sampling launch).
        batch, seq_len: tokens per step = batch * seq_len.
        vocab: vocabulary size (the LM head and the distillation loss).
    """

    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int
    batch: int
    seq_len: int
    vocab: int = 32000

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


SHAPES = {
    "llama7b": ModelShape("llama7b", 4096, 32, 32, 128, 11008, 32, batch=2, seq_len=4096),
    "smollm2": ModelShape("smollm2", 576, 9, 3, 64, 1536, 30, batch=4, seq_len=2048, vocab=49152),
}


# --------------------------------------------------------------------------------------
# the ops: each runs one op forward and backward on meta tensors, as the model calls it
# --------------------------------------------------------------------------------------


def _meta(*shape: int, dtype: torch.dtype, grad: bool = True) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=dtype, requires_grad=grad)


def _mask(*shape: int, grad: bool = True) -> torch.Tensor:
    """A mask as the model hands it over: float32 (its log_alphas are), whatever the model dtype."""
    return _meta(*shape, dtype=torch.float32, grad=grad)


def _backward(out: torch.Tensor) -> None:
    out.backward(torch.empty_like(out))


def _masked_linear(s: ModelShape, dtype: torch.dtype) -> None:
    """o_proj as the masked model runs it: with head masks (per-head input mask) and without."""
    from shear.kernels.masked_linear import shear_masked_linear

    x = _meta(s.tokens, s.heads * s.head_dim, dtype=dtype)
    w = _meta(s.hidden, s.heads * s.head_dim, dtype=dtype)
    m_out = _mask(s.hidden)
    for m_in in (_mask(s.heads), None):
        _backward(shear_masked_linear(x, w, None, m_in, m_out))


def _masked_mlp(s: ModelShape, dtype: torch.dtype) -> None:
    """The SwiGLU MLP with the intermediate and output masks."""
    from shear.kernels.masked_mlp import shear_masked_swiglu_mlp

    x = _meta(s.tokens, s.hidden, dtype=dtype)
    wg, wu = _meta(s.intermediate, s.hidden, dtype=dtype), _meta(s.intermediate, s.hidden, dtype=dtype)
    wd = _meta(s.hidden, s.intermediate, dtype=dtype)
    m_int, m_out = _mask(s.intermediate), _mask(s.hidden)
    _backward(shear_masked_swiglu_mlp(x, wg, wu, wd, m_int, m_out))


def _masked_attention(s: ModelShape, dtype: torch.dtype) -> None:
    """Causal GQA attention on Hugging Face's q / k / v layout, with the head mask and without."""
    from shear.kernels.masked_attention import shear_causal_attention

    B, S, H, G, D = s.batch, s.seq_len, s.heads, s.kv_heads, s.head_dim
    # The projections' outputs [B, S, heads, D], seen as [B, heads, S, D] (transposed views).
    q = _meta(B, S, H, D, dtype=dtype).transpose(1, 2)
    k = _meta(B, S, G, D, dtype=dtype).transpose(1, 2)
    v = _meta(B, S, G, D, dtype=dtype).transpose(1, 2)
    for head_mask in (_mask(H, grad=False), None):
        _backward(shear_causal_attention(q, k, v, D**-0.5, head_mask))


def _masked_rms_norm(s: ModelShape, dtype: torch.dtype) -> None:
    """RMSNorm with the hidden mask."""
    from shear.kernels.masked_rms_norm import shear_masked_rms_norm

    x = _meta(s.tokens, s.hidden, dtype=dtype)
    w, z = _meta(s.hidden, dtype=dtype), _mask(s.hidden)
    _backward(shear_masked_rms_norm(x, w, z, 1e-6))


def _hard_concrete(s: ModelShape, dtype: torch.dtype) -> None:
    """Every mask of the whole model sampled in one launch (float32 log_alphas whatever the
    model dtype), and the file's other kernels: sampling with given noise, the noise itself,
    the keep probabilities and the soft values of the deterministic masks."""
    from shear.kernels import hard_concrete as hc

    L = s.layers
    sizes = [(L,), (L,), (L,), (L, s.heads // s.kv_heads), (L, s.kv_heads), (L, s.intermediate), (s.hidden,)]
    log_alphas = [_mask(*n) for n in sizes]
    zs = hc.sample_all(log_alphas, seed=0)
    torch.autograd.backward(zs, [torch.empty_like(z) for z in zs])
    la = log_alphas[-2]
    u = hc.noise_for(0, 0, la.numel(), device="meta").view(la.shape)
    _backward(hc.shear_hard_concrete_sample(la, u))
    _backward(hc.shear_keep_probability(la))
    _backward(hc.shear_soft_mask(la))


def _linear_kl(s: ModelShape, dtype: torch.dtype) -> None:
    """The distillation loss from the final hidden states (teacher of the same size): KL with
    a cross-entropy term, KL alone, and cross-entropy alone without a teacher."""
    from shear.kernels.linear_kl import shear_linear_kl

    h_s, w_s = _meta(s.tokens, s.hidden, dtype=dtype), _meta(s.vocab, s.hidden, dtype=dtype)
    h_t, w_t = (
        _meta(s.tokens, s.hidden, dtype=dtype, grad=False),
        _meta(s.vocab, s.hidden, dtype=dtype, grad=False),
    )
    labels = torch.empty(s.tokens, device="meta", dtype=torch.long)
    for kl_weight in (0.5, 1.0):
        _backward(shear_linear_kl(h_s, w_s, h_t, w_t, labels, 2.0, kl_weight))
    _backward(shear_linear_kl(h_s, w_s, None, None, labels, 1.0, 0.0))


#: Op name -> a function running it forward and backward on meta tensors (module docstring).
OPS: dict[str, Callable[[ModelShape, torch.dtype], None]] = {
    "masked_linear": _masked_linear,
    "masked_mlp": _masked_mlp,
    "masked_attention": _masked_attention,
    "masked_rms_norm": _masked_rms_norm,
    "hard_concrete": _hard_concrete,
    "linear_kl": _linear_kl,
}


# --------------------------------------------------------------------------------------
# capturing launches
# --------------------------------------------------------------------------------------


@dataclass
class Launch:
    """One kernel launch as a launcher made it (not executed)."""

    kernel: Any  # triton.runtime.jit.JITFunction
    args: tuple
    kwargs: dict
    grid: Any

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


@contextlib.contextmanager
def capture() -> Iterator[list[Launch]]:
    """Record every Triton launch made inside the block instead of running it."""
    from triton.runtime.jit import JITFunction

    if triton.knobs.runtime.interpret:
        raise RuntimeError(
            "shear.kernels.aot needs the Triton interpreter off: run it in a fresh process "
            "without TRITON_INTERPRET=1 (python -m shear.kernels.aot)"
        )
    launches: list[Launch] = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, dict(kwargs), grid))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


def launches_of(op: str, shape: ModelShape, dtype: torch.dtype) -> list[Launch]:
    """Every launch op ``op`` makes in one forward and backward pass at ``shape``."""
    with capture() as launches:
        OPS[op](shape, dtype)
    return launches


def jit_kernels() -> list[str]:
    """Names of every ``@triton.jit`` kernel (``*_kernel``) defined in the shear.kernels modules."""
    import importlib
    import pkgutil

    import shear.kernels as package

    names = []
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, obj in vars(module).items():
            fn = getattr(obj, "fn", None)
            if (
                name.endswith("_kernel")
                and callable(fn)
                and getattr(fn, "__module__", None) == module.__name__
            ):
                names.append(name)
    return sorted(names)


# --------------------------------------------------------------------------------------
# compiling and reading the result
# --------------------------------------------------------------------------------------


@dataclass
class Build:
    """One launch compiled for one target, with what the compiled code shows."""

    op: str
    kernel: str
    arch: int
    dtype: str
    shapes: list[str]
    num_warps: int = 0
    num_stages: int = 0
    blocks: str = ""
    flags: str = ""
    registers: int | None = None
    stack: int | None = None
    shared: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stl_ldl: int | None = None
    tensor_core: int | None = None
    has_dot: bool = False
    buffers: list[int] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None

    def problems(self) -> list[str]:
        """What this build violates (empty when it passes every check)."""
        if self.error:
            return [f"does not compile: {self.error}"]
        out = []
        if self.shared > SHARED_LIMIT[self.arch]:
            out.append(f"shared memory {self.shared} B > {SHARED_LIMIT[self.arch]} B")
        if self.spill_stores or self.spill_loads or self.stl_ldl:
            out.append(
                f"spills: {self.spill_stores} B stores / {self.spill_loads} B loads, "
                f"{self.stl_ldl} STL/LDL instructions"
            )
        if self.has_dot and not self.tensor_core:
            out.append("tl.dot without tensor-core instructions (HMMA / HGMMA)")
        need = MIN_PIPELINE_BUFFERS.get(self.kernel)
        if need is not None and (not self.buffers or min(self.buffers) < need):
            out.append(f"pipelining: tile buffers {self.buffers or 'none'}, need >= {need} each")
        return out


def _tool(name: str) -> str:
    return getattr(triton.knobs.nvidia, name).path


def ptxas_available() -> str | None:
    """None when ptxas and cuobjdump run here, else why not."""
    try:
        for name in ("ptxas", "cuobjdump"):
            subprocess.run([_tool(name), "--version"], check=True, capture_output=True)
    except Exception as e:  # missing binary, no exec permission, unsupported platform
        return f"{type(e).__name__}: {e}"
    return None


def _specialize(launch: Launch, target) -> tuple[Any, dict, dict, dict, str]:
    """(backend, options, signature, constexprs, attrs) exactly as Triton's JIT derives them."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs)
    kwargs.setdefault("debug", False)
    kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = triton.knobs.compilation.fpsan_homomorphic_casts
    bound, specialization, options = binder(*launch.args, **kwargs)
    key = f"{fn.module}.{fn.fn.__qualname__}|{target.arch}|{specialization}|{options}"
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return options, signature, constexprs, attrs, key


_OPCODE = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)", re.M)
_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
# Buffers the software pipeliner allocates: a leading buffer dimension over a 2-D tile.
_TILE_BUFFERS = re.compile(r"local_alloc : \(\) -> !ttg\.memdesc<(\d+)x\d+x\d+x\w+")


def _read_cubin(build: Build, cubin: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        Path(path).write_bytes(cubin)
        usage = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", path], check=True, capture_output=True, text=True
        ).stdout
        sass = subprocess.run(
            [_tool("cuobjdump"), "-sass", path], check=True, capture_output=True, text=True
        ).stdout
    m = _RESOURCES.search(usage)
    build.registers, build.stack = int(m.group(1)), int(m.group(2))
    ops = _OPCODE.findall(sass)
    build.stl_ldl = sum(op in ("STL", "LDL") for op in ops)
    build.tensor_core = sum(op in ("HMMA", "HGMMA") for op in ops)


def _target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


def compile_launch(launch: Launch, arch: int) -> Build:
    """Compile ``launch`` for ``sm_<arch>`` and read what the compiled code shows.

    The returned build's ``op``, ``dtype`` and ``shapes`` are left for the caller to fill.
    """
    from triton.compiler import ASTSource

    target = _target(arch)
    options, signature, constexprs, attrs, _ = _specialize(launch, target)
    consts = {k[0]: v for k, v in constexprs.items() if len(k) == 1}
    names = [p.name for p in launch.kernel.params]
    blocks = ", ".join(f"{names[i]}={v}" for i, v in consts.items() if names[i].startswith("BLOCK"))
    flags = " ".join(
        names[i] if v is True else f"{names[i]}={v}"
        for i, v in consts.items()
        if v is True or (names[i].endswith("_GROUP") and v != 1)
    )
    build = Build("", launch.name, arch, "", [], options.num_warps, options.num_stages, blocks, flags)
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with triton.knobs.nvidia.scope(), triton.knobs.compilation.scope(), contextlib.redirect_stdout(log):
            triton.knobs.nvidia.dump_ptxas_log = True
            triton.knobs.compilation.always_compile = True  # ptxas must run to report its spills
            src = ASTSource(launch.kernel, signature, constexprs, attrs)
            kernel = triton.compile(src, target=target, options=options.__dict__)
    except Exception as e:  # report the failure as a build that does not compile
        first = str(e).strip().splitlines()
        build.error = f"{type(e).__name__}: {first[0] if first else ''}"
        return build
    build.seconds = time.perf_counter() - t0
    build.shared = kernel.metadata.shared
    spills = _SPILLS.findall(log.getvalue())
    build.spill_stores = sum(int(a) for a, _ in spills)
    build.spill_loads = sum(int(b) for _, b in spills)
    build.has_dot = "tt.dot " in kernel.asm["ttir"]
    build.buffers = sorted(int(n) for n in _TILE_BUFFERS.findall(kernel.asm["ttgir"]))
    _read_cubin(build, kernel.asm["cubin"])
    return build


@dataclass(frozen=True)
class _Job:
    """The ``index``-th launch of ``op`` at ``shape`` in ``dtype``, to compile for ``arch``."""

    op: str
    shape: str
    dtype: str
    index: int
    arch: int


@functools.cache
def _launches(op: str, shape: str, dtype: str) -> list[Launch]:
    return launches_of(op, SHAPES[shape], DTYPES[dtype])


def _compile_job(job: _Job) -> Build:
    build = compile_launch(_launches(job.op, job.shape, job.dtype)[job.index], job.arch)
    build.op, build.dtype = job.op, job.dtype
    return build


#: (shape, dtype) pairs compiled by default: both model shapes in bf16.
DEFAULT_CASES = (("llama7b", "bf16"), ("smollm2", "bf16"))


def run(
    ops: Sequence[str] = tuple(OPS),
    cases: Sequence[tuple[str, str]] = DEFAULT_CASES,
    archs: Sequence[int] = (80, 90),
    jobs: int = 1,
    progress: Callable[[str], None] | None = None,
) -> list[Build]:
    """Capture every launch of ``ops`` at each (shape, dtype) case and compile each distinct one.

    Launches are captured first (cheap) and deduplicated by Triton's own specialisation key,
    so a kernel launched alike by several ops or shapes compiles once per target.

    Args:
        ops: keys of :data:`OPS`.
        cases: (key of :data:`SHAPES`, key of :data:`DTYPES`) pairs.
        archs: compute capabilities (80, 90).
        jobs: compiler processes (forked; each recaptures the launches it compiles).
        progress: called with a line per finished build.

    Returns:
        One :class:`Build` per distinct (kernel specialisation, target), in launch order;
        ``shapes`` lists every model shape whose launches it serves.
    """
    planned: dict[str, _Job] = {}
    served: dict[str, list[str]] = {}
    for op in ops:
        for sh, dt in cases:
            for i, launch in enumerate(_launches(op, sh, dt)):
                for arch in archs:
                    key = _specialize(launch, _target(arch))[-1]
                    planned.setdefault(key, _Job(op, sh, dt, i, arch))
                    if sh not in served.setdefault(key, []):
                        served[key].append(sh)
    todo = list(planned.values())
    if jobs > 1:
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            results = pool.map(_compile_job, todo)
            builds = _collect(results, served, progress)
    else:
        builds = _collect(map(_compile_job, todo), served, progress)
    return builds


def _collect(results: Iterator[Build], served: dict[str, list[str]], progress) -> list[Build]:
    builds = []
    for build, shapes in zip(results, served.values(), strict=True):
        build.shapes = shapes
        builds.append(build)
        if progress:
            progress(f"{build.op} {build.kernel} sm_{build.arch} {build.dtype} ({build.seconds:.1f} s)")
    return builds


COLUMNS = (
    "op", "kernel", "variant", "shapes", "dtype", "sm", "warps", "stages", "blocks", "regs", "stack B",
    "shared KB", "spill st/ld B", "STL/LDL", "tensor-core instr", "tile buffers", "checks",
)  # fmt: skip


def _row(b: Build) -> tuple:
    head = (b.op, f"`{b.kernel.strip('_').removesuffix('_kernel')}`", b.flags, ", ".join(b.shapes), b.dtype)
    head += (b.arch, b.num_warps, b.num_stages, b.blocks)
    if b.error:
        return head + ("",) * 7 + (f"FAIL: {b.error}",)
    probs = b.problems()
    return head + (
        b.registers,
        b.stack,
        f"{b.shared / 1024:.1f}",
        f"{b.spill_stores}/{b.spill_loads}",
        b.stl_ldl,
        b.tensor_core if b.has_dot else "-",
        "x".join(map(str, b.buffers)) or "-",
        "ok" if not probs else "FAIL: " + "; ".join(probs),
    )


def markdown(builds: Sequence[Build]) -> str:
    """The table of every build: registers, shared memory, spills, stages / buffers, tensor cores."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(c) for c in _row(b)) + " |" for b in builds]
    return "\n".join(lines)


def _case(text: str) -> tuple[str, str]:
    shape, _, dtype = text.partition(":")
    if shape not in SHAPES or dtype not in DTYPES:
        raise argparse.ArgumentTypeError(
            f"{text!r}: want SHAPE:DTYPE with SHAPE in {sorted(SHAPES)}, DTYPE in {sorted(DTYPES)}"
        )
    return shape, dtype


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m shear.kernels.aot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ops", nargs="+", choices=sorted(OPS), default=list(OPS))
    p.add_argument(
        "--cases",
        nargs="+",
        type=_case,
        default=list(DEFAULT_CASES),
        metavar="SHAPE:DTYPE",
        help=f"model shapes ({', '.join(SHAPES)}) and dtypes ({', '.join(DTYPES)}); default: "
        + " ".join(f"{a}:{b}" for a, b in DEFAULT_CASES),
    )
    p.add_argument("--arch", nargs="+", type=int, choices=sorted(SHARED_LIMIT), default=[80, 90])
    p.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes (default: all cores)"
    )
    p.add_argument("--json", type=Path, help="write every build as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    why = ptxas_available()
    if why:
        print(
            f"shear: error: ptxas / cuobjdump from the triton wheel do not run here ({why})", file=sys.stderr
        )
        return 2
    t0 = time.perf_counter()
    say = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    builds = run(args.ops, args.cases, args.arch, jobs=args.jobs, progress=say)
    elapsed = time.perf_counter() - t0
    print(markdown(builds))
    failed = [b for b in builds if b.problems()]
    missing = sorted(set(jit_kernels()) - {b.kernel for b in builds}) if set(args.ops) == set(OPS) else []
    if missing:
        print(
            f"\nnever launched by any op in OPS, so not compiled: {', '.join(missing)} (add an entry to OPS)"
        )
    print(
        f"\n{len(builds)} builds in {elapsed:.0f} s, triton {triton.__version__}: {len(failed)} with problems"
    )
    if args.json:
        payload = {
            "triton": triton.__version__,
            "torch": torch.__version__,
            "seconds": elapsed,
            "builds": [dict(dataclasses.asdict(b), problems=b.problems()) for b in builds],
            "not_compiled": missing,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        os.replace(tmp, args.json)
    return 1 if failed or missing else 0


if __name__ == "__main__":
    sys.exit(main())
