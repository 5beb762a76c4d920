"""Data pipeline throughput and dynamic-batch-loading overhead against a CPU training step (issue 6).

Everything runs in one process, side by side, each measurement warmed up first and then
taken as the median of ``--repeats`` repeats (the dynamic update: of ``--updates``):

* pipeline: :class:`~shear.data.DomainBatchLoader` batches of 4 x 256 tokens in steady
  state, ``num_workers`` 0 and 2, on a real multi-domain corpus tokenised with the default
  model's tokenizer;
* consumer: one forward+backward of the default model (SmolLM2-135M, fp32) on such a batch;
  no optimiser step, so the step is at its shortest and both ratios are conservative;
* dynamic batch loading (DBL), excluding the evaluation: ``update_weights`` +
  ``loader.set_weights`` (drops the read-ahead, shuts workers down) + the next batch (workers
  start again), from a settled loader, with the model in memory (workers fork from this
  process, as they do from a trainer's); amortised over the dynamic interval (50: pruning,
  400: continued pre-training) and for the single step that runs it;
* the held-out evaluation each update needs (4 sequences of 256 tokens per domain): not
  pipeline overhead, reported on its own line;
* token cache: tokenising the corpus into empty token and ``datasets`` caches, and
  loading it again from the warm token cache.

Targets (issue 6): pipeline tokens/s >= 20x the training step's, for both worker counts;
DBL overhead < 1% of a step amortised at both intervals. ``--targets`` exits 1 if one is
missed.

Run: python benchmarks/report_data.py [--data DIR] [--cap BYTES] [--repeats 3] [--targets]
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_data as B  # noqa: E402

#: Issue 6's targets.
MIN_RATIO = 20.0
MAX_OVERHEAD_PCT = 1.0


@dataclass
class Results:
    """Medians in seconds (and the facts needed to read them)."""

    data: str = ""
    domains: list[str] = field(default_factory=list)
    text_mb: float = 0.0
    cache_tokens: int = 0
    first_tokenise_s: float = 0.0
    cache_hit_s: float = 0.0
    batch_s: dict[int, float] = field(default_factory=dict)  # num_workers -> one batch
    update_s: dict[int, float] = field(default_factory=dict)  # num_workers -> whole update
    update_parts_s: dict[int, tuple[float, float, float]] = field(default_factory=dict)
    step_s: float = 0.0
    eval_s: float = 0.0
    model_load_s: float = 0.0


def median_of(repeats: int, fn, warmup: int = 1) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(B.timeit(fn) for _ in range(repeats))


def measure(args: argparse.Namespace, tmp: Path) -> Results:
    """Run every measurement; see the module docstring."""
    r = Results()
    t = time.perf_counter()
    model, tokenizer = B.load_model()
    r.model_load_s = time.perf_counter() - t

    if args.data:
        data, r.data = Path(args.data), f"{args.data}"
    else:
        data, r.data = B.build_data(tmp / "data", args.cap)

    # Token cache. Each cold run gets empty token and datasets caches, so nothing is reused;
    # the untimed first run pays the one-off imports (datasets' builders, the tokenizer's
    # first call), which a second tokenisation in the same process would not pay either.
    runs = iter(range(10_000))

    def cold() -> None:
        n = next(runs)
        with B.datasets_cache(tmp / f"hf-{n}"):
            B.make_corpus(data, tokenizer, tmp / f"tokens-{n}")

    r.first_tokenise_s = median_of(args.repeats, cold)
    cache = tmp / "tokens-0"  # the warm-up run's cache: loaded from here on
    r.cache_hit_s = median_of(args.repeats, lambda: B.make_corpus(data, tokenizer, cache))
    corpus = B.make_corpus(data, tokenizer, cache)
    r.domains = corpus.domains
    r.cache_tokens = sum(corpus.train[d].file.tokens for d in corpus.domains)  # the whole streams
    with B.datasets_cache(tmp / "hf-0"):
        r.text_mb = B.text_bytes(data) / 1e6

    losses, reference = B.synthetic_losses(corpus)
    for nw in B.WORKERS:
        loader = B.make_loader(corpus, nw)
        B.settle(loader, batches=16)  # warm-up: workers started, read-ahead full

        def batches(loader=loader) -> None:
            for _ in range(args.batches):
                next(loader)

        r.batch_s[nw] = median_of(args.repeats, batches, warmup=0) / args.batches
        parts = []
        for i in range(args.updates + 1):
            B.reset(loader, corpus)
            p = B.dynamic_update(loader, losses, reference)
            if i:  # the first update warms up (torch's first softmax, first worker restart)
                parts.append(p)
        totals = [sum(p) for p in parts]
        r.update_s[nw] = statistics.median(totals)
        r.update_parts_s[nw] = tuple(statistics.median(p[k] for p in parts) for k in range(3))
        del loader, batches
        gc.collect()  # the iterator goes: its workers shut down before the model is timed

    ids, _ = next(B.make_loader(corpus, 0))
    r.step_s = median_of(args.repeats, lambda: B.train_step(model, ids))
    for p in model.parameters():
        p.grad = None
    r.eval_s = median_of(args.repeats, lambda: B.eval_per_update(model, corpus))
    return r


def pct(seconds: float, step_s: float) -> str:
    """``seconds`` as a percentage of a training step."""
    return f"{100 * seconds / step_s:.3g}%"


def table(r: Results) -> tuple[str, list[tuple[str, bool]]]:
    """The markdown table, and each target with whether it is met."""
    tokens = B.BATCH * B.SEQ_LEN
    step_tps = tokens / r.step_s
    checks: list[tuple[str, bool]] = []
    rows = ["| measurement | value | target |", "|---|---|---|"]
    rows.append(
        f"| training step: default model fwd+bwd, {B.BATCH} x {B.SEQ_LEN} tokens | "
        f"{r.step_s:.2f} s, {step_tps:.0f} tokens/s | (the consumer) |"
    )
    for nw in B.WORKERS:
        tps = tokens / r.batch_s[nw]
        ratio = tps / step_tps
        ok = ratio >= MIN_RATIO
        checks.append((f"pipeline / step, num_workers={nw}: {ratio:,.0f}x (>= {MIN_RATIO:g}x)", ok))
        ms = r.batch_s[nw] * 1e3
        rows.append(f"| pipeline, num_workers={nw}: tokens/s (one batch) | {tps:,.0f} ({ms:.3f} ms) | |")
        rows.append(
            f"| pipeline / training step, num_workers={nw} | {ratio:,.0f}x | "
            f">= {MIN_RATIO:g}x: {'met' if ok else 'MISSED'} |"
        )
    for nw in B.WORKERS:
        u, (uw, sw, nb) = r.update_s[nw], r.update_parts_s[nw]
        rows.append(
            f"| DBL update, num_workers={nw}: update_weights + set_weights + next batch | "
            f"{u * 1e3:.2f} ms ({uw * 1e3:.2f} + {sw * 1e3:.2f} + {nb * 1e3:.2f}) | |"
        )
        for name, interval in B.INTERVALS.items():
            share = u / interval / r.step_s * 100
            ok = share < MAX_OVERHEAD_PCT
            checks.append((f"DBL overhead, num_workers={nw}, interval {interval}: {share:.3g}% (< 1%)", ok))
            rows.append(
                f"| DBL overhead per step, num_workers={nw}, interval {interval} ({name}) | "
                f"{pct(u / interval, r.step_s)} | < {MAX_OVERHEAD_PCT:g}%: {'met' if ok else 'MISSED'} |"
            )
        rows.append(
            f"| DBL overhead of the single update step (worst case), num_workers={nw} | "
            f"{pct(u, r.step_s)} | - |"
        )
    n_eval = len(r.domains) * B.EVAL_SEQUENCES
    amortised = ", ".join(f"{pct(r.eval_s / i, r.step_s)} at interval {i}" for i in B.INTERVALS.values())
    rows.append(
        f"| held-out evaluation per update ({n_eval} x {B.SEQ_LEN} tokens, fwd only; not pipeline) | "
        f"{r.eval_s:.2f} s = {r.eval_s / r.step_s:.2f} steps; amortised {amortised} | - |"
    )
    rows.append(
        f"| token cache, first tokenisation ({r.text_mb:.2f} MB of text, {r.cache_tokens:,} tokens) | "
        f"{r.text_mb / r.first_tokenise_s:.2f} MB/s, {r.cache_tokens / r.first_tokenise_s:,.0f} tokens/s "
        f"({r.first_tokenise_s:.2f} s) | - |"
    )
    rows.append(f"| token cache hit: build_corpus again | {r.cache_hit_s * 1e3:.1f} ms | - |")
    return "\n".join(rows), checks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="a data folder (default: build a small default corpus in a temp folder)")
    p.add_argument("--cap", type=int, default=B.DEFAULT_CAP, help="bytes per domain when building the corpus")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median)")
    p.add_argument("--batches", type=int, default=300, help="batches per pipeline timing")
    p.add_argument("--updates", type=int, default=8, help="timed dynamic updates per worker count")
    p.add_argument("--targets", action="store_true", help="exit 1 if a target of issue 6 is missed")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="shear-bench-data-") as tmp:
        r = measure(args, Path(tmp))

    import datasets
    import transformers

    print(
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, no GPU used; Python "
        f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"datasets {datasets.__version__}"
    )
    print(
        f"data: {r.data}; {len(r.domains)} domains ({', '.join(r.domains)}), seq {B.SEQ_LEN}, "
        f"batch {B.BATCH}; model load {r.model_load_s:.1f} s; medians of {args.repeats} repeats "
        f"({args.batches} batches each), {args.updates} updates, after a warm-up\n"
    )
    text, checks = table(r)
    print(text)
    missed = [c for c, ok in checks if not ok]
    if args.targets:
        print()
        for c, ok in checks:
            print(f"{'PASS' if ok else 'FAIL'}  {c}")
    return 1 if args.targets and missed else 0


if __name__ == "__main__":
    sys.exit(main())
