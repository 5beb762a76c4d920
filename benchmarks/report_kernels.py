"""Side-by-side benchmark of shear's masked ops: fused Triton kernels vs the eager reference,
torch.compile of the reference and the dense Hugging Face layer (the floor).

Ops: masked SwiGLU MLP, masked attention block, masked RMSNorm and a whole masked decoder
layer, forward and forward+backward, at SmolLM2 or LLaMA-2-7B layer shapes; plus the time to
sample every hard-concrete mask of the whole model. Everything of one (op, pass) group is
timed in ONE run with interleaved rounds (the providers take turns, starting provider rotated
every round), so ratios compare like with like. Reports the median and 20/80 percentiles,
ratios vs dense and vs eager, TFLOP/s (matmul 2MNK, causal attention 2*B*H*S^2*D, backward
2.5x forward; zero-half runs keep the dense FLOP count), and the peak memory of a pass
(torch.cuda.max_memory_allocated minus what was allocated before it; "n/a" on CPU).

Writes a markdown table to stdout and, under --out, the raw numbers as JSON and PNG plots.

Run:
    python benchmarks/report_kernels.py                                   # CPU: SmolLM2, 512 tokens, fp32
    python benchmarks/report_kernels.py --shapes llama7b --dtype bf16 --targets      # H100
    python benchmarks/report_kernels.py --shapes llama7b --zero-half     # half the heads/channels zero
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import traceback
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
import common as C  # noqa: E402

TARGET_SHAPES, TARGET_DTYPE = "llama7b", torch.bfloat16
#: The issue's targets (7B layer shapes, bf16, forward+backward, on an H100).
MAX_FUSED_OVER_DENSE = 1.10
MIN_SPEEDUP_OVER_EAGER = 1.5
MAX_ZERO_HALF_OVER_DENSE = 0.65
MAX_SAMPLING_FRACTION = 0.01
MODEL_LAYERS_TEXT = {
    "llama7b": "32 layers x (32 heads + 11008 channels + layer / head_layer / mlp) + 4096 hidden",
    "smollm2": "30 layers x (3 x 3 heads + 1536 channels + layer / head_layer / mlp) + 576 hidden",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", choices=sorted(C.LAYER_SHAPES), default="smollm2")
    p.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        default=None,
        help="tokens per pass (default: 512 on CPU, 8192 16384 on GPU)",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per sequence (default: min(tokens, 2048 SmolLM2 / 4096 7B))",
    )
    p.add_argument(
        "--dtype", choices=sorted(C.DTYPES), default=None, help="default: fp32 on CPU, bf16 on GPU"
    )
    p.add_argument("--passes", default=",".join(C.PASSES), help="comma list of forward, forward_backward")
    p.add_argument("--ops", default=",".join(C.OPS), help=f"comma list of {', '.join(C.OPS)}")
    p.add_argument(
        "--providers", default=",".join(C.PROVIDERS), help=f"comma list of {', '.join(C.PROVIDERS)}"
    )
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default: 20 GPU, 7 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default: 3 GPU, 2 CPU)")
    p.add_argument(
        "--min-sample-ms",
        type=float,
        default=None,
        help="repeat a call inside one timed sample until it lasts this long (default: 2 GPU, 5 CPU)",
    )
    p.add_argument(
        "--zero-half",
        nargs="?",
        const="blocks",
        choices=("blocks", "random"),
        default=None,
        help="masked providers run with half the query heads and half the intermediate channels exactly "
        "zero; 'blocks' (default) zeroes contiguous halves, 'random' a random half",
    )
    p.add_argument(
        "--targets",
        action="store_true",
        help="evaluate the issue's targets (whole layer, forward+backward, normal and zero-half, and "
        "mask sampling) and print PASS / FAIL / not measured lines",
    )
    p.add_argument("--no-sampling", action="store_true", help="skip the mask-sampling measurement")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default 1 on CPU: steadier on a shared machine; 0: torch's default)",
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _list(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)} (choose from {', '.join(allowed)})")
    return items


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def environment(device: torch.device) -> dict:
    import triton

    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "date": datetime.date.today().isoformat(),
    }


# --- measurement ------------------------------------------------------------------------------


def _summary(samples: list[C.Sample], flops: float | None, nbytes: float | None) -> dict:
    times = [s.seconds for s in samples]
    med = statistics.median(times)
    peaks = [s.peak_bytes for s in samples if s.peak_bytes is not None]
    return {
        "status": "ok",
        "times_s": times,
        "median_ms": med * 1e3,
        "p20_ms": C.percentile(times, 20) * 1e3,
        "p80_ms": C.percentile(times, 80) * 1e3,
        "tflops": flops / med / 1e12 if flops else None,
        "gbps": nbytes / med / 1e9 if nbytes else None,
        "peak_mib": max(peaks) / 2**20 if peaks else None,
    }


def run_group(fns: dict, device: torch.device, rounds: int, warmup: int, min_sample_s: float) -> dict:
    """Time every provider of one group, interleaved. ``fns``: provider -> (setup, step).

    Returns provider -> list of samples, or a string (why it failed, e.g. out of memory).
    """
    result: dict[str, list[C.Sample] | str] = {p: [] for p in fns}
    live = dict(fns)

    def attempt(p: str, inner: int = 1) -> C.Sample | None:
        setup, step = live[p]
        try:
            return C.timed(setup, step, device, inner)
        except Exception as e:  # out of memory, a kernel that fails to compile: report, go on
            result[p] = "out of memory" if isinstance(e, torch.cuda.OutOfMemoryError) else repr(e)[:200]
            traceback.print_exc()
            del live[p]
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return None

    for _ in range(warmup):  # the compile provider compiles here
        for p in list(live):
            attempt(p)
    if not live:
        return result
    first = {p: attempt(p) for p in list(live)}
    fastest = min((s.seconds for s in first.values() if s is not None), default=min_sample_s)
    inner = max(1, math.ceil(min_sample_s / max(fastest, 1e-9)))  # calls per timed sample
    names = list(live)
    for r in range(rounds):
        for i in range(len(names)):
            p = names[(r + i) % len(names)]  # rotate who goes first
            if p in live and (sample := attempt(p, inner)) is not None:
                result[p].append(sample)
    return result


def measure_layer_ops(args, case: C.LayerCase, ops, passes, providers) -> list[dict]:
    """Records for every (op, pass, provider) of one case."""
    records = []
    skipped = {p: C.skip_reason(p, case.shapes, case.device) for p in providers}
    runnable = tuple(p for p in providers if skipped[p] is None)
    base = {
        "shapes": case.shapes,
        "tokens": case.tokens,
        "seq_len": case.seq_len,
        "batch": case.batch,
        "dtype": str(case.dtype).removeprefix("torch."),
        "zero_half": case.zero_half,
    }
    world = C.build_world(case, runnable, seed=args.seed) if runnable else None
    for op in ops:
        checks = {}
        if world is not None:
            try:
                checks = C.check_against_eager(world, op)
            except Exception as e:  # reported, the timings still run
                print(f"  check of {op} failed: {type(e).__name__}: {e}", file=sys.stderr)
        for pas in passes:
            backward = pas == "forward_backward"
            flops = C.op_flops(op, case, backward)
            nbytes = C.op_bytes(op, case, backward)
            fns = {p: C.make_step(world, p, op, backward) for p in runnable}
            res = run_group(fns, case.device, args.rounds, args.warmup, args.min_sample_s) if fns else {}
            for p in providers:
                rec = {**base, "op": op, "pass": pas, "provider": p, "flops": flops, "bytes": nbytes}
                if p in checks:
                    rec["rel_err_out"], rec["rel_err_dx"] = checks[p]
                if skipped[p]:
                    rec.update(status="skipped", reason=skipped[p])
                elif isinstance(res[p], str):
                    rec.update(status="failed", reason=res[p])
                else:
                    rec.update(_summary(res[p], flops, nbytes))
                records.append(rec)
            print(f"  measured {case.shapes} {op} {pas} {case.tokens} tokens", file=sys.stderr, flush=True)
    del world
    torch._dynamo.reset()
    if case.device.type == "cuda":
        torch.cuda.empty_cache()
    return records


def add_ratios(records: list[dict]) -> None:
    """time / dense and time / eager, within each (shapes, tokens, zero_half, op, pass) group."""
    key = ("shapes", "tokens", "zero_half", "op", "pass")
    groups: dict[tuple, dict[str, dict]] = {}
    for r in records:
        groups.setdefault(tuple(r[k] for k in key), {})[r["provider"]] = r
    for g in groups.values():
        for r in g.values():
            for ref in ("dense", "eager"):
                other = g.get(ref)
                ok = r.get("status") == "ok" and other is not None and other.get("status") == "ok"
                r[f"vs_{ref}"] = r["median_ms"] / other["median_ms"] if ok else None


def measure_sampling(args, shapes: str, device: torch.device, providers=("fused", "eager")) -> list[dict]:
    """Every mask of the whole model: one sample (the target), and one refresh (sample + combination)."""
    masks = C.model_masks(shapes, device, seed=args.seed)
    units = C.mask_units(masks)
    records = []
    for what in ("sample", "refresh"):
        for pas in C.PASSES:
            backward = pas == "forward_backward"
            fns, skipped = {}, {}
            for p in providers:
                reason = C.skip_reason(p, "smollm2", device)  # sampling is cheap: only fused needs CUDA
                if reason:
                    skipped[p] = reason
                else:
                    fns[p] = C.sampling_step(masks, p, what, backward)
            res = run_group(fns, device, args.rounds, args.warmup, args.min_sample_s) if fns else {}
            for p in providers:
                rec = {"shapes": shapes, "what": what, "pass": pas, "provider": p, "units": units}
                if p in skipped:
                    rec.update(status="skipped", reason=skipped[p])
                elif isinstance(res[p], str):
                    rec.update(status="failed", reason=res[p])
                else:
                    rec.update(_summary(res[p], None, None))
                records.append(rec)
    return records


# --- printing ---------------------------------------------------------------------------------


def _fmt(v, spec: str = ".2f", none: str = "—") -> str:
    return none if v is None else format(v, spec)


def markdown_table(records: list[dict], gpu: bool) -> str:
    head = (
        "| op | pass | tokens | provider | median ms | p20 ms | p80 ms | TFLOP/s | peak MiB "
        "| vs dense | vs eager |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in records:
        label = r["op"] + (f" (zero-half {r['zero_half']})" if r.get("zero_half") else "")
        if r["status"] != "ok":
            lines.append(
                f"| {label} | {r['pass']} | {r['tokens']} | {r['provider']} | {r['status']}: {r['reason']} "
                "| | | | | | |"
            )
            continue
        rate = (
            _fmt(r["tflops"]) if r["tflops"] is not None else (f"{r['gbps']:.1f} GB/s" if r["gbps"] else "—")
        )
        peak = _fmt(r["peak_mib"], ".0f") if gpu else "n/a"
        lines.append(
            f"| {label} | {r['pass']} | {r['tokens']} | {r['provider']} | {r['median_ms']:.3f} "
            f"| {r['p20_ms']:.3f} | {r['p80_ms']:.3f} | {rate} | {peak} "
            f"| {_fmt(r['vs_dense'], '.3f')} | {_fmt(r['vs_eager'], '.3f')} |"
        )
    return "\n".join(lines)


def check_table(records: list[dict], dtype: torch.dtype) -> str:
    """Relative RMS error of each masked provider's output and dx against eager (one fwd+bwd)."""
    tol = C.REL_TOL[dtype]
    lines = [
        f"\nSanity check against eager (relative RMS error of the output and of dx; flagged above {tol:g}; "
        "mask gradients are not compared, see common.check_against_eager):",
        "| op | tokens | provider | output | dx | |",
        "|---|---|---|---|---|---|",
    ]
    seen = set()
    for r in records:
        key = (r["op"], r["tokens"], r.get("zero_half"), r["provider"])
        if "rel_err_out" not in r or key in seen:
            continue
        seen.add(key)
        bad = max(r["rel_err_out"], r["rel_err_dx"]) > tol
        label = r["op"] + (f" (zero-half {r['zero_half']})" if r.get("zero_half") else "")
        lines.append(
            f"| {label} | {r['tokens']} | {r['provider']} | {r['rel_err_out']:.2e} | {r['rel_err_dx']:.2e} "
            f"| {'MISMATCH' if bad else 'ok'} |"
        )
    return "\n".join(lines) if len(lines) > 3 else ""


def sampling_table(records: list[dict], layer_fb: dict[str, float]) -> str:
    lines = [
        "| masks | what | pass | provider | median ms | p20 ms | p80 ms "
        "| % of one layer fwd+bwd (same provider) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if r["status"] != "ok":
            lines.append(
                f"| {r['units']} | {r['what']} | {r['pass']} | {r['provider']} "
                f"| {r['status']}: {r['reason']} | | | |"
            )
            continue
        ref = layer_fb.get(r["provider"])
        frac = f"{100 * r['median_ms'] / ref:.2f} %" if ref else "—"
        lines.append(
            f"| {r['units']} | {r['what']} | {r['pass']} | {r['provider']} | {r['median_ms']:.3f} | "
            f"{r['p20_ms']:.3f} | {r['p80_ms']:.3f} | {frac} |"
        )
    return "\n".join(lines)


def plot(records: list[dict], out: Path, stem: str, gpu: bool) -> list[Path]:
    """One PNG per pass (time, and peak memory on GPU): a panel per op, bars per provider over tokens.

    None where matplotlib is not installed (a bare GPU host): the JSON holds every number.
    """
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plots (the JSON has every number)", file=sys.stderr)
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        return written
    ops = list(dict.fromkeys(r["op"] for r in ok))
    providers = list(dict.fromkeys(r["provider"] for r in ok))
    for pas in dict.fromkeys(r["pass"] for r in ok):
        metrics = [("median_ms", "time (ms), median; bars: p20-p80"), ("vs_dense", "time / dense (median)")]
        if gpu:
            metrics.append(("peak_mib", "peak memory (MiB)"))
        for metric, ylabel in metrics:
            fig, axes = plt.subplots(1, len(ops), figsize=(4.2 * len(ops), 3.6), squeeze=False)
            for ax, op in zip(axes[0], ops, strict=True):
                rows = [r for r in ok if r["op"] == op and r["pass"] == pas]
                xs = sorted({(r["tokens"], r.get("zero_half") or "") for r in rows})
                width = 0.8 / max(len(providers), 1)
                for j, p in enumerate(providers):
                    vals, lo, hi, pos = [], [], [], []
                    for i, x in enumerate(xs):
                        r = next(
                            (
                                r
                                for r in rows
                                if (r["tokens"], r.get("zero_half") or "") == x and r["provider"] == p
                            ),
                            None,
                        )
                        if r is None or r.get(metric) is None:
                            continue
                        pos.append(i + (j - (len(providers) - 1) / 2) * width)
                        vals.append(r[metric])
                        lo.append(r[metric] - r["p20_ms"] if metric == "median_ms" else 0.0)
                        hi.append(r["p80_ms"] - r[metric] if metric == "median_ms" else 0.0)
                    if vals:
                        ax.bar(pos, vals, width, yerr=[lo, hi], capsize=2, label=p)
                ax.set_xticks(range(len(xs)), [f"{t}" + (f"\nzero {z}" if z else "") for t, z in xs])
                if metric == "vs_dense":
                    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
                ax.set_title(op)
                ax.set_xlabel("tokens")
                ax.set_ylabel(ylabel)
            axes[0][0].legend(fontsize=8)
            fig.suptitle(f"{stem}: {pas}")
            fig.tight_layout()
            kind = {"median_ms": "time", "vs_dense": "vs_dense", "peak_mib": "memory"}[metric]
            path = out / f"{stem}_{pas}_{kind}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


# --- targets ----------------------------------------------------------------------------------


def _find(records, **kw) -> dict | None:
    for r in records:
        if all(r.get(k) == v for k, v in kw.items()) and r.get("status") == "ok":
            return r
    return None


def evaluate_targets(args, records, sampling, device, dtype) -> list[str]:
    """PASS / FAIL / not measured lines for the issue's targets, per token count."""
    if device.type != "cuda":
        why = "not measured (no GPU)"
    elif args.shapes != TARGET_SHAPES or dtype != TARGET_DTYPE:
        why = "not measured (targets are defined at --shapes llama7b --dtype bf16)"
    else:
        why = None
    note = ""
    if device.type == "cuda" and "H100" not in device_name(device):
        note = f" [measured on {device_name(device)}; the targets are for an H100]"
    lines = []

    tol = C.REL_TOL[dtype]

    def verdict(ok: bool, *recs: dict | None) -> str:
        # A fast wrong answer does not count: the fused output must match eager (sanity check).
        for r in recs:
            if r is not None and max(r.get("rel_err_out", 0.0), r.get("rel_err_dx", 0.0)) > tol:
                return (
                    f"FAIL{note} (fused does not match eager: relative error "
                    f"{r['rel_err_out']:.1e} output, {r['rel_err_dx']:.1e} dx)"
                )
        return ("PASS" if ok else "FAIL") + note

    for tokens in args.tokens:
        kw = dict(tokens=tokens, op="layer", **{"pass": "forward_backward"})
        fused = _find(records, provider="fused", zero_half=None, **kw)
        eager = _find(records, provider="eager", zero_half=None, **kw)
        dense = _find(records, provider="dense", zero_half=None, **kw)
        zfused = _find(records, provider="fused", zero_half="blocks", **kw)
        zdense = _find(records, provider="dense", zero_half="blocks", **kw)
        zrand = _find(records, provider="fused", zero_half="random", **kw)
        zrdense = _find(records, provider="dense", zero_half="random", **kw)
        t = f"[{tokens} tokens]"
        info = ""
        if eager and dense:
            info = f" (here: eager / dense = {eager['median_ms'] / dense['median_ms']:.3f})"

        name = f"{t} masked layer fwd+bwd, fused <= {MAX_FUSED_OVER_DENSE:.2f}x dense"
        if why or not (fused and dense):
            lines.append(f"{name}: {why or 'not measured (fused or dense missing)'}{info}")
        else:
            r = fused["median_ms"] / dense["median_ms"]
            lines.append(f"{name}: {verdict(r <= MAX_FUSED_OVER_DENSE, fused)} (fused / dense = {r:.3f})")

        name = f"{t} masked layer fwd+bwd, fused >= {MIN_SPEEDUP_OVER_EAGER:.1f}x faster than eager"
        if why or not (fused and eager):
            lines.append(f"{name}: {why or 'not measured (fused or eager missing)'}")
        else:
            s = eager["median_ms"] / fused["median_ms"]
            lines.append(f"{name}: {verdict(s >= MIN_SPEEDUP_OVER_EAGER, fused)} (eager / fused = {s:.3f})")

        name = f"{t} masked layer fwd+bwd, fused peak memory <= eager"
        if why or not (fused and eager) or fused["peak_mib"] is None:
            lines.append(f"{name}: {why or 'not measured (fused or eager missing)'}")
        else:
            ok = fused["peak_mib"] <= eager["peak_mib"]
            lines.append(
                f"{name}: {verdict(ok, fused)} "
                f"(fused {fused['peak_mib']:.0f} MiB, eager {eager['peak_mib']:.0f} MiB)"
            )

        name = (
            f"{t} half heads + half intermediate zero (contiguous), "
            f"fused <= {MAX_ZERO_HALF_OVER_DENSE:.2f}x dense"
        )
        if why or not (zfused and zdense):
            lines.append(f"{name}: {why or 'not measured (zero-half fused or dense missing)'}")
        else:
            r = zfused["median_ms"] / zdense["median_ms"]
            extra = ""
            if zrand and zrdense:
                extra = (
                    f"; random zero pattern, not a target: {zrand['median_ms'] / zrdense['median_ms']:.3f}"
                )
            lines.append(
                f"{name}: {verdict(r <= MAX_ZERO_HALF_OVER_DENSE, zfused)} (fused / dense = {r:.3f}{extra})"
            )

    name = (
        f"sampling every mask of the 7B model (sample_all, fwd+bwd) < {100 * MAX_SAMPLING_FRACTION:.0f}% "
        "of one layer fwd+bwd"
    )
    s = _find(sampling, provider="fused", what="sample", **{"pass": "forward_backward"})
    layers = [
        r
        for r in records
        if r["provider"] == "fused"
        and r["op"] == "layer"
        and r["pass"] == "forward_backward"
        and not r["zero_half"]
    ]
    layers = [r for r in layers if r["status"] == "ok"]
    if why or not (s and layers):
        lines.append(f"{name}: {why or 'not measured (fused sampling or fused layer missing)'}")
    else:
        ref = min(layers, key=lambda r: r["tokens"])  # the shortest layer pass is the strictest reference
        frac = s["median_ms"] / ref["median_ms"]
        lines.append(
            f"{name}: {verdict(frac < MAX_SAMPLING_FRACTION)} "
            f"({s['median_ms']:.3f} ms = {100 * frac:.2f}% of "
            f"{ref['median_ms']:.1f} ms at {ref['tokens']} tokens; {s['units']} units)"
        )
    return lines


# --- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    if not gpu and args.threads != 0:
        torch.set_num_threads(args.threads or 1)
    args.tokens = args.tokens or ([8192, 16384] if gpu else [512])
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    dtype = C.DTYPES[args.dtype]
    args.rounds = args.rounds or (20 if gpu else 7)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 2)
    args.min_sample_s = (args.min_sample_ms or (2.0 if gpu else 5.0)) / 1e3
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    if args.targets:
        ops, passes = ["layer"], ["forward_backward"]
        providers = [p for p in _list(args.providers, C.PROVIDERS, "providers") if p != "compile"]
        zero_variants = [None, "blocks", "random"]
    else:
        ops = _list(args.ops, C.OPS, "ops")
        passes = _list(args.passes, C.PASSES, "passes")
        providers = _list(args.providers, C.PROVIDERS, "providers")
        zero_variants = [args.zero_half]

    env = environment(device)
    print(
        f"device: {env['device']}; torch {env['torch']}, triton {env['triton']}, transformers "
        f"{env['transformers']}, Python {env['python']}; {env['date']}"
    )
    print(f"shapes {args.shapes} {C.LAYER_SHAPES[args.shapes]}, {args.dtype}, tokens {args.tokens}")
    print(
        f"rounds {args.rounds} (+{args.warmup} warm-up), interleaved; peak memory: "
        + ("max_memory_allocated minus memory allocated before the pass" if gpu else "n/a on CPU")
    )
    if C.interpreter_smoke() and not gpu:
        print(
            "WARNING: SHEAR_BENCH_INTERPRET=1: 'fused' runs in the Triton interpreter; "
            "its timings mean nothing"
        )
    print("providers: " + "; ".join(f"{p} = {C.PROVIDER_DOC[p]}" for p in providers) + "\n")

    records: list[dict] = []
    for zero in zero_variants:
        for tokens in args.tokens:
            case = C.LayerCase(args.shapes, tokens, dtype, device, seq_len=args.seq_len, zero_half=zero)
            if zero:
                arch = C.model_arch(args.shapes).replace(layers=1)
                fh, fi = C.zero_fractions(arch, C.zero_half_pattern(arch, zero))
                print(
                    f"zero-half ({zero}): {fh:.0%} of query heads, {fi:.0%} of intermediate channels are 0",
                    file=sys.stderr,
                )
            records += measure_layer_ops(args, case, ops, passes, providers)
    add_ratios(records)
    print(markdown_table(records, gpu))
    checks = check_table(records, dtype)
    if checks:
        print(checks)

    sampling: list[dict] = []
    if not args.no_sampling:
        mask_shapes = TARGET_SHAPES if args.targets else args.shapes
        sampling = measure_sampling(args, mask_shapes, device)
        # Reference: the same provider's layer fwd+bwd at the fewest tokens (the strictest).
        layer_fb = {
            r["provider"]: r["median_ms"]
            for r in sorted(records, key=lambda r: -r["tokens"])
            if r["op"] == "layer"
            and r["pass"] == "forward_backward"
            and r["status"] == "ok"
            and r["shapes"] == mask_shapes
            and (not r["zero_half"] or args.zero_half)
        }
        units = sampling[0]["units"]
        print(
            f"\nMask sampling: every mask of the whole {mask_shapes} model "
            f"({MODEL_LAYERS_TEXT[mask_shapes]}; "
            f"{units} units, float32 log_alpha); 'refresh' adds the per-layer combination the model's "
            "pre-hook runs. Percentages: of the same provider's layer fwd+bwd at the fewest tokens measured."
        )
        print(sampling_table(sampling, layer_fb))

    target_lines: list[str] = []
    if args.targets:
        target_lines = evaluate_targets(args, records, sampling, device, dtype)
        print("\nTargets (H100, LLaMA-2-7B layer shapes, bf16, forward+backward):")
        for line in target_lines:
            print("  " + line)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"kernels_{args.shapes}_{args.dtype}" + ("_targets" if args.targets else "")
    stem += f"_zero-{args.zero_half}" if args.zero_half and not args.targets else ""
    payload = {
        "environment": env,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "conventions": {
            "flops": "matmul 2MNK; causal attention 2*B*H*S^2*D; backward 2.5x forward (fwd+bwd 3.5x)",
            "peak_mib": "GPU: max_memory_allocated during a pass minus memory allocated before it; CPU: null",
            "ops": C.OP_DOC,
            "providers": C.PROVIDER_DOC,
        },
        "records": records,
        "sampling": sampling,
        "targets": target_lines,
    }
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    written = plot(records, args.out, stem, gpu)
    print(f"\nwrote {args.out / (stem + '.json')}" + "".join(f", {p}" for p in written))


if __name__ == "__main__":
    main()
