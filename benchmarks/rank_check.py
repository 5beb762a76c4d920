"""Does the budget ranking's cheap score order candidates as training does? (issue 24, part 3)

For a budget on the default model: the ranked candidates' scores (one-shot importance cut +
refit, shear.budget), then each candidate pruned one-shot with the refit and trained for
``--train-steps`` (shear train, fixed domain weights), and the Spearman rank correlation of
the score with the held-out loss after training. Results go to ``OUT/rank_check.json`` after
every candidate, so an interrupted run keeps what it measured.

    python benchmarks/rank_check.py --data DATA --out OUT [--budget params=60M] [--train-steps 40]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from shear.budget import rank_budget
from shear.checkpoint import write_text_atomic
from shear.prune import PruneConfig, run_prune
from shear.train import run_train
from shear.trainer import TrainConfig


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho of two lists without ties."""
    def ranks(x: list[float]) -> list[int]:
        order = sorted(range(len(x)), key=x.__getitem__)
        r = [0] * len(x)
        for rank, i in enumerate(order):
            r[i] = rank
        return r

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb, strict=True)) / (n * (n * n - 1))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--budget", default="params=60M,candidates=6")
    p.add_argument("--train-steps", type=int, default=40)
    p.add_argument("--seq-len", type=int, default=128)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = dict(data=args.data, batch_size=4, seq_len=args.seq_len, eval_sequences=4, device="cpu")
    t0 = time.time()
    ranking = rank_budget("default", args.data, args.budget, seq_len=args.seq_len, batch_size=4,
                          calibration_sequences=32, log=lambda m: print(m, file=sys.stderr))  # fmt: skip
    result = {"budget": args.budget, "train_steps": args.train_steps, "seq_len": args.seq_len,
              "ranking_s": time.time() - t0, "candidates": []}  # fmt: skip
    for i, row in enumerate(ranking["candidates"]):
        t = time.time()
        run = out / f"c{i}"
        run_prune(PruneConfig(model="default", target=row["target"], out=str(run / "prune"), steps=0,
                              refit=0.3, calibration_sequences=32, **common))  # fmt: skip
        r = run_train(TrainConfig(model=str(run / "prune" / "export"), out=str(run / "train"), dynamic=False,
                                  steps=args.train_steps, lr_weights=3e-4, eval_interval=args.train_steps,
                                  checkpoint_interval=args.train_steps, **common))  # fmt: skip
        final = r["final_eval"]
        result["candidates"].append({**row, "loss_after_training": sum(final.values()) / len(final),
                                     "per_domain": final, "seconds": time.time() - t})  # fmt: skip
        done = result["candidates"]
        if len(done) >= 3:
            losses = [c["loss_after_training"] for c in done]
            result["spearman"] = spearman([c["score"] for c in done], losses)
        write_text_atomic(out / "rank_check.json", json.dumps(result, indent=2) + "\n")
        print(json.dumps(done[-1]), file=sys.stderr)


if __name__ == "__main__":
    main()
