"""Side-by-side timing of the masked reference path against the dense model; prints a
markdown table of medians and ratios (one run, interleaved rounds, so ratios are fair).

Run: python benchmarks/report.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from common import build, step, tokens  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()
    ids = tokens()
    models = {name: build(name) for name in ("dense", "masked")}
    print(
        f"device: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print(f"batch {tuple(ids.shape)}, 2 layers at SmolLM2-135M shapes, fp32\n")
    print("| pass | dense ms | masked ms | masked / dense |\n|---|---|---|---|")
    for backward in (False, True):
        times: dict[str, list[float]] = {n: [] for n in models}
        for r in range(args.rounds + 2):
            for name, model in models.items():  # interleaved: both see the same machine state
                t = time.perf_counter()
                step(model, ids, backward)
                if r >= 2:
                    times[name].append(time.perf_counter() - t)
        med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
        label = "forward+backward" if backward else "forward"
        print(f"| {label} | {med['dense']:.1f} | {med['masked']:.1f} | {med['masked'] / med['dense']:.3f} |")


if __name__ == "__main__":
    main()
