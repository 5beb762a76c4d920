"""Side-by-side timing: pruning step vs plain training step (same model, same batch).

Run: python benchmarks/report_prune_step.py [--layers 30] [--batch 4] [--seq 128] [--rounds 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from prune_step import batch, build  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=8)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plain, prune = build(args.layers, device)
    ids = batch(args.batch, args.seq, device)
    times: dict[str, list[float]] = {"plain": [], "prune": []}
    for r in range(args.rounds + 1):
        for name, step in (
            (("plain", plain), ("prune", prune)) if r % 2 else (("prune", prune), ("plain", plain))
        ):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            step(ids)
            if device == "cuda":
                torch.cuda.synchronize()
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = args.batch * args.seq
    print(
        f"device {device}, {torch.get_num_threads()} threads; torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    print(f"SmolLM2-135M shape, {args.layers} layers, batch {args.batch} x {args.seq} tokens, fp32 "
          f"(bf16 autocast on GPU), median of {args.rounds} interleaved rounds\n")  # fmt: skip
    print("| step | ms | tokens/s |\n|---|---|---|")
    for k in ("plain", "prune"):
        print(f"| {k} | {med[k] * 1e3:.0f} | {tokens / med[k]:.0f} |")
    print(f"\nprune / plain = {med['prune'] / med['plain']:.3f}")


if __name__ == "__main__":
    main()
