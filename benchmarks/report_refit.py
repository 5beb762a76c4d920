"""The least-squares refit before and after streaming (issue 22): time and peak memory, side by side.

OLD is ``shear/refit.py`` as committed on the git branch ``--old-ref`` (default ``main``: the
refit that held one layer's linear inputs for every token and recomputed the errors over
them), copied into a temporary folder and imported from there; NEW is this checkout's
:mod:`shear.refit`. Both run :func:`refit_masked` on the same model, choice and tokens:

* ``demo``: the default model (SmolLM2-135M) cut to the demo's target by activation
  importance, ``--demo-sequences`` random sequences of 128 tokens, 4 per chunk (the demo:
  128 sequences of its training data);
* ``llama7b``: one LLaMA-2-7B-shaped decoder layer (hidden 4096, 32 heads, MLP 11008, random
  weights, vocabulary 256) cut to Sheared-LLaMA-1.3B's widths (hidden 2048, 16 heads, MLP
  5504), ``--llama-sequences`` random sequences of 512 tokens, 4 per chunk.

Each (setting, implementation) runs in its own process, so the peak memory is that
process's peak resident set (VmHWM, reset through ``/proc/self/clear_refs`` once the models
are built) above its level before the refit; the time is wall-clock. The same process also
times one forward pass of the source and one of the pruned model over the same tokens in
the same chunks (the goal: refit <= 2x their sum). ``--precision SETTING...`` adds, for those settings,
the refitted weights with float32 against float64 chunk products
(:data:`shear.refit.PRODUCT_DTYPE`).

Run: python benchmarks/report_refit.py [--demo-sequences 32] [--llama-sequences 8]
     [--precision demo] [--json refit.json] [--old-ref main]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from shear.checkpoint import write_text_atomic

LLAMA7B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008)
LLAMA_TARGET = "layers=1,hidden=2048,heads=16,kv_heads=16,intermediate=5504"
DAMPING, CHUNK = 0.3, 4


def _old_refit(ref: str, tmp: Path):
    """``shear/refit.py`` at git ``ref``, imported from a copy in ``tmp``."""
    root = Path(__file__).resolve().parents[1]
    text = subprocess.run(["git", "show", f"{ref}:shear/refit.py"], cwd=root, check=True,
                          capture_output=True, text=True).stdout  # fmt: skip
    path = tmp / "refit_old.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("refit_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _setting(name: str, sequences: int):
    """(source, masked model, masks, z, token ids) of a setting (module docstring)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from shear.arch import Arch
    from shear.importance import activation_importance, init_from_importance, keep_indicators
    from shear.patch import apply_masks

    torch.manual_seed(0)
    if name == "demo":
        from shear.cli import DEMO_TARGET
        from shear.default_model import default_model_dir

        path = default_model_dir()
        source, model = (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32) for _ in range(2))
        target, seq = DEMO_TARGET, 128
    else:
        config = LlamaConfig(**LLAMA7B, num_hidden_layers=1, vocab_size=256, max_position_embeddings=512)
        source = LlamaForCausalLM(config)
        model = LlamaForCausalLM(config)
        model.load_state_dict(source.state_dict())
        target, seq = LLAMA_TARGET, 512
    source.eval(), model.eval()
    vocab = source.config.vocab_size
    ids = torch.randint(0, vocab, (sequences, seq), generator=torch.Generator().manual_seed(1))
    scores = activation_importance(source, Arch.from_config(source.config), ids[:CHUNK], CHUNK)
    masks = apply_masks(model, target)
    init_from_importance(masks, scores)
    return source, model, masks, keep_indicators(masks), ids


def _peak_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak() -> int:
    """Reset the peak resident set to the current one; returns it (KiB)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _peak_rss_kib()


@torch.no_grad()
def _forward_s(model: torch.nn.Module, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    for chunk in ids.split(CHUNK):
        model(chunk, use_cache=False)
    return time.perf_counter() - start


def one(setting: str, impl: str, sequences: int, old_ref: str) -> dict:
    """One (setting, implementation) in this process: refit time, peak RSS growth, forwards."""
    from shear.export import export_plan, kept_layers
    from shear.refit import dense_pruned

    with tempfile.TemporaryDirectory() as tmp:
        module = _old_refit(old_ref, Path(tmp)) if impl == "old" else importlib.import_module("shear.refit")
        source, model, masks, z, ids = _setting(setting, sequences)
        base = _reset_peak()
        start = time.perf_counter()
        errors = module.refit_masked(model, masks, z, ids, CHUNK, DAMPING)
        seconds = time.perf_counter() - start
        peak = (_peak_rss_kib() - base) / 1024
    plan, arch = export_plan(model, masks, z)
    pruned = dense_pruned(model, plan, arch, kept_layers(masks, z))
    return {
        "refit_s": seconds,
        "peak_rss_growth_mib": peak,
        "source_forward_s": _forward_s(source, ids),
        "pruned_forward_s": _forward_s(pruned, ids),
        "mean_error": [sum(e[i] for e in errors.values()) / len(errors) for i in (0, 1)],
        "tokens": ids.numel(),
    }


def precision(setting: str, sequences: int) -> dict:
    """Refitted weights and errors with float32 chunk products against float64 ones."""
    import shear.refit as refit

    fits, errors = {}, {}
    for dtype in (torch.float32, torch.float64):
        source, model, masks, z, ids = _setting(setting, sequences)
        refit.PRODUCT_DTYPE = dtype
        errors[dtype] = refit.refit_masked(model, masks, z, ids, CHUNK, DAMPING)
        params = model.named_parameters()
        fits[dtype] = {n: p.detach().double() for n, p in params if n.endswith(refit.REFITTED)}
    refit.PRODUCT_DTYPE = torch.float32
    rel = {n: float((fits[torch.float32][n] - w).norm() / w.norm()) for n, w in fits[torch.float64].items()}
    err = [
        abs(a - b)
        for k in errors[torch.float64]
        for a, b in zip(errors[torch.float32][k], errors[torch.float64][k], strict=True)
    ]
    return {"max_relative_weight_difference": max(rel.values()), "max_error_difference": max(err)}


def _child(args: argparse.Namespace, *extra: str) -> dict:
    cmd = [sys.executable, __file__, "--demo-sequences", str(args.demo_sequences), "--llama-sequences",
           str(args.llama_sequences), "--old-ref", args.old_ref, *extra]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if out.returncode:
        raise RuntimeError(f"{' '.join(extra)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-sequences", type=int, default=32)
    p.add_argument("--llama-sequences", type=int, default=8)
    p.add_argument("--old-ref", default="main")
    p.add_argument("--settings", nargs="+", default=["demo", "llama7b"], choices=["demo", "llama7b"])
    p.add_argument("--json", type=Path, default=Path("refit.json"))
    p.add_argument("--precision", nargs="*", default=[], choices=["demo", "llama7b"], metavar="SETTING")
    p.add_argument("--one", nargs=2, metavar=("SETTING", "IMPL"), help=argparse.SUPPRESS)  # the child
    p.add_argument("--precision-of", help=argparse.SUPPRESS)  # the child
    args = p.parse_args(argv)
    sequences = {"demo": args.demo_sequences, "llama7b": args.llama_sequences}
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1], sequences[args.one[0]], args.old_ref)))
        return None
    if args.precision_of:
        print(json.dumps(precision(args.precision_of, sequences[args.precision_of])))
        return None
    result: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, threads {torch.get_num_threads()}",
        "torch": torch.__version__,
        "old_ref": args.old_ref,
        "chunk_sequences": CHUNK,
        "damping": DAMPING,
        "settings": {},
    }
    for setting in args.settings:
        r = {impl: _child(args, "--one", setting, impl) for impl in ("old", "new")}
        forwards = r["new"]["source_forward_s"] + r["new"]["pruned_forward_s"]
        r["sequences"] = sequences[setting]
        r["new_over_forwards"] = r["new"]["refit_s"] / forwards
        r["old_over_forwards"] = r["old"]["refit_s"] / forwards
        if setting in args.precision:
            r["precision"] = _child(args, "--precision-of", setting)
        result["settings"][setting] = r
        print(json.dumps({setting: r}, indent=1), flush=True)
    write_text_atomic(args.json, json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
