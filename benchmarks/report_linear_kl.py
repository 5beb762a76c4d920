"""The fused linear-KL distillation loss against the eager full-logits loss: time and peak memory.

Both compute ``(1 - a) * CE + a * T^2 * KL(teacher || student)`` from the final hidden states
and the LM heads, forward and backward (gradients to the student's hidden states and LM head):

* ``fused``: :func:`shear.dispatch.linear_kl`: the Triton kernels on CUDA, the chunked
  PyTorch path (:func:`shear.ops.linear_kl`) on CPU; one chunk of logits per model at a time;
* ``eager``: :func:`shear.ops.linear_kl_eager`: full ``[tokens, vocab]`` logits of both
  models through autograd, as a training loop without a fused loss computes them.

Peak memory is what the loss adds above its inputs: on CUDA ``max_memory_allocated``; on CPU
the growth of the process's peak resident set (``ru_maxrss``) over its level once the inputs
exist (``VmHWM``), each provider measured in a fresh subprocess. Times are medians of interleaved rounds.

Run: python benchmarks/report_linear_kl.py [--tokens 512] [--vocab 49152] [--hidden 576]
     [--teacher-hidden 576] [--dtype fp32] [--rounds 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
import triton

from shear import dispatch
from shear.checkpoint import write_text_atomic
from shear.ops import linear_kl_eager

PROVIDERS = ("fused", "eager")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def inputs(args: argparse.Namespace, device: str) -> list[torch.Tensor]:
    """Student hidden / LM head (requiring grad), teacher hidden / LM head, labels (1 in 16 ignored)."""
    g = torch.Generator().manual_seed(0)
    dtype = DTYPES[args.dtype]
    n, v, d_s, d_t = args.tokens, args.vocab, args.hidden, args.teacher_hidden
    h_s = torch.randn(n, d_s, generator=g)
    w_s = torch.randn(v, d_s, generator=g) / d_s**0.5
    h_t = torch.randn(n, d_t, generator=g)
    w_t = torch.randn(v, d_t, generator=g) / d_t**0.5
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::16] = -100
    out = [t.to(device=device, dtype=dtype) for t in (h_s, w_s, h_t, w_t)]
    out[0].requires_grad_(True)
    out[1].requires_grad_(True)
    return [*out, labels.to(device)]


def run_once(provider: str, tensors: list[torch.Tensor], args: argparse.Namespace) -> float:
    """One forward and backward; returns the loss."""
    h_s, w_s, h_t, w_t, labels = tensors
    h_s.grad = w_s.grad = None
    fn = dispatch.linear_kl if provider == "fused" else linear_kl_eager
    loss = fn(h_s, w_s, h_t, w_t, labels, args.temperature, args.kl_weight)
    loss.backward()
    return float(loss.detach())


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_mib(provider: str, args: argparse.Namespace, device: str) -> float:
    """Memory one forward+backward adds above its inputs (module docstring), in MiB."""
    if device == "cuda":
        tensors = inputs(args, device)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_once(provider, tensors, args)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    cmd = [sys.executable, __file__, *args.argv, "--memory-of", provider]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ)
    return float(out.stdout.strip().splitlines()[-1])


def _peak_rss_kib() -> int:
    """This process's peak resident set in KiB: VmHWM, which exec resets (ru_maxrss does not:
    a child would start from its parent's peak), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _rss_growth(provider: str, args: argparse.Namespace) -> float:
    """In a fresh process: peak RSS growth over one forward+backward, in MiB (CPU)."""
    tensors = inputs(args, "cpu")
    base = _peak_rss_kib()
    run_once(provider, tensors, args)
    return (_peak_rss_kib() - base) / 1024


def measure(args: argparse.Namespace) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tensors = inputs(args, device)
    times: dict[str, list[float]] = {p: [] for p in PROVIDERS}
    losses = {}
    for r in range(args.rounds + 1):
        for p in PROVIDERS if r % 2 else PROVIDERS[::-1]:
            _sync(device)
            t = time.perf_counter()
            losses[p] = run_once(p, tensors, args)
            _sync(device)
            if r:  # the first round warms up
                times[p].append(time.perf_counter() - t)
    med = {p: statistics.median(v) * 1e3 for p, v in times.items()}
    peaks = {p: peak_mib(p, args, device) for p in PROVIDERS}
    elem = torch.finfo(DTYPES[args.dtype]).bits // 8
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.machine()})"
    return {
        "device": name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "date": datetime.date.today().isoformat(),
        "fused_path": "triton" if dispatch.use_triton(tensors[0]) else "reference (chunked PyTorch)",
        "config": {
            k: getattr(args, k)
            for k in (
                "tokens",
                "vocab",
                "hidden",
                "teacher_hidden",
                "dtype",
                "kl_weight",
                "temperature",
                "rounds",
            )
        },  # fmt: skip
        "logits_mib_per_model": args.tokens * args.vocab * elem / 2**20,
        "providers": {p: {"median_ms": med[p], "peak_mib": peaks[p], "loss": losses[p]} for p in PROVIDERS},
        "fused_over_eager_time": med["fused"] / med["eager"],
        "fused_over_eager_memory": peaks["fused"] / peaks["eager"] if peaks["eager"] > 0 else None,
        "loss_rel_diff": abs(losses["fused"] - losses["eager"]) / abs(losses["eager"]),
    }


def markdown(r: dict) -> str:
    """The results table."""
    c = r["config"]
    lines = [
        f"{r['date']}, {r['device']}, {r['threads']} threads; torch {r['torch']}, triton {r['triton']}, "
        f"transformers {r['transformers']}. {c['tokens']} tokens, vocabulary {c['vocab']}, student "
        f"hidden {c['hidden']}, teacher hidden {c['teacher_hidden']}, {c['dtype']}, a = {c['kl_weight']}, "
        f"T = {c['temperature']}; forward+backward, median of {c['rounds']} interleaved rounds. "
        f"Fused path: {r['fused_path']}. One model's full logits: {r['logits_mib_per_model']:.0f} MiB.",
        "",
        "| provider | median ms | peak MiB above inputs | loss |",
        "|---|---|---|---|",
    ]
    for p, s in r["providers"].items():
        lines.append(f"| {p} | {s['median_ms']:.1f} | {s['peak_mib']:.0f} | {s['loss']:.5f} |")
    mem = r["fused_over_eager_memory"]
    lines.append(
        f"\nfused / eager: time {r['fused_over_eager_time']:.2f}x, peak memory "
        f"{'-' if mem is None else f'{mem:.3f}x'}; loss relative difference {r['loss_rel_diff']:.1e}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--teacher-hidden", type=int, default=576)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--kl-weight", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--memory-of", choices=PROVIDERS, help=argparse.SUPPRESS)  # the CPU memory subprocess
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.memory_of:
        print(_rss_growth(args.memory_of, args))
        return None
    result = measure(args)
    print(markdown(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.json, json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
