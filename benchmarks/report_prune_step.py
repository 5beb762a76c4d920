"""Side-by-side timing: pruning step vs plain training step (same model, same batch).

Tokens/s of each step and, on a GPU, model FLOPs utilisation: the model's nominal training
FLOPs per token, 6 N (N: the parameters in matmuls, the LM head included once) plus causal
attention 7 L H D S (forward 2 S H D per token and layer, backward 2.5x), over the device's
dense bf16 peak. Both steps count the plain model's FLOPs: the masks' extra work is tiny,
and the pruning step's MFU then says how much of the device it keeps busy on the same model.

``--distill-weight A`` also times both steps with distillation (shear's fused loss from a
frozen copy of the model as the teacher, :mod:`shear.distill`) and their ratios to the
steps without it.

Run: python benchmarks/report_prune_step.py [--layers 30] [--batch 4] [--seq 128] [--rounds 8]
     [--distill-weight 0.5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from prune_step import SMOLLM2, batch, build  # noqa: E402

from shear.checkpoint import write_text_atomic

#: Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by device name, for MFU.
PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.4,
    "A100": 312.0,
}


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a device, matched on its name (None when unknown)."""
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return peak
    return None


def flops_per_token(layers: int, seq: int) -> float:
    """Nominal training FLOPs per token of the SmolLM2-shaped model (module docstring)."""
    d, inter, H, G = (SMOLLM2[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                           "num_key_value_heads"))  # fmt: skip
    D = d // H
    per_layer = d * H * D * 2 + d * G * D * 2 + 3 * d * inter  # q, o, k, v, gate/up/down
    matmul_params = layers * per_layer + SMOLLM2["vocab_size"] * d  # + LM head
    return 6 * matmul_params + 7 * layers * H * D * seq


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--distill-weight", type=float, default=0.0, help="also time the steps with distillation")
    p.add_argument(
        "--only",
        choices=("plain", "prune"),
        help="time only this step (and, with a distillation weight, its twin)",
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    steps = dict(zip(("plain", "prune"), build(args.layers, device), strict=True))
    if args.distill_weight > 0:
        distilled = build(args.layers, device, distill_weight=args.distill_weight)
        steps.update(zip(("plain+distill", "prune+distill"), distilled, strict=True))
    if args.only:
        steps = {k: v for k, v in steps.items() if k.split("+")[0] == args.only}
    ids = batch(args.batch, args.seq, device)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(args.rounds + 1):
        for step_name, step in list(steps.items())[:: 1 if r % 2 else -1]:
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            step(ids)
            if device == "cuda":
                torch.cuda.synchronize()
            if r:  # the first round warms up
                times[step_name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = args.batch * args.seq
    peak = peak_tflops(name) if device == "cuda" else None
    fpt = flops_per_token(args.layers, args.seq)
    result = {
        "device": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kernels": os.environ.get("SHEAR_KERNELS", "auto"),
        "layers": args.layers,
        "batch": args.batch,
        "seq": args.seq,
        "rounds": args.rounds,
        "flops_per_token": fpt,
        "peak_tflops": peak,
        "steps": {
            k: {
                "median_ms": med[k] * 1e3,
                "tokens_per_s": tokens / med[k],
                "mfu": tokens / med[k] * fpt / (peak * 1e12) if peak else None,
            }
            for k in steps
        },
        "prune_over_plain": med["prune"] / med["plain"] if not args.only else None,
    }
    if args.distill_weight > 0:
        result["distill_weight"] = args.distill_weight
        kinds = (args.only,) if args.only else ("plain", "prune")
        result["distill_over_plain"] = {k: med[f"{k}+distill"] / med[k] for k in kinds}
    print(f"device {name}, {torch.get_num_threads()} threads; torch {torch.__version__}, "
          f"transformers {transformers.__version__}")  # fmt: skip
    print(f"SmolLM2-135M shape, {args.layers} layers, batch {args.batch} x {args.seq} tokens, fp32 "
          f"(bf16 autocast on GPU), median of {args.rounds} interleaved rounds\n")  # fmt: skip
    print(markdown(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.json, json.dumps(result, indent=1))
    return result


def markdown(result: dict) -> str:
    """The step table (MFU: ``-`` where the device's peak is unknown, as on a CPU)."""
    lines = ["| step | ms | tokens/s | MFU |", "|---|---|---|---|"]
    for k, s in result["steps"].items():
        mfu = f"{100 * s['mfu']:.1f} %" if s["mfu"] is not None else "-"
        lines.append(f"| {k} | {s['median_ms']:.1f} | {s['tokens_per_s']:.0f} | {mfu} |")
    if result["prune_over_plain"] is not None:
        lines.append(f"\nprune / plain = {result['prune_over_plain']:.3f}")
    for k, v in result.get("distill_over_plain", {}).items():
        lines.append(f"{k} step with distillation (A = {result['distill_weight']}) / without = {v:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
