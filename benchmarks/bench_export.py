"""Export speed: the C++ gather (backend "cpp") against the plain-PyTorch path (backend
"torch": index_select per tensor, then safetensors' save_file, which is what
save_pretrained calls) and the floor (the same number of bytes written from a
preallocated buffer in one sequential write). Every path ends with fsync, as the export
does, so all three pay for the disk.

The cpp path starts the writeback of each finished 64 MiB window early
(sync_file_range), so the disk works while later tensors are gathered; one sequential
write leaves all of it to the final fsync. So a second floor is measured too, the same
bytes written in 64 MiB pieces with the same early writeback: the floor for any writer.

Two sources, each timed in one run with interleaved rounds (so every path sees the same
machine state; a first round warms up and is not counted): a LLaMA-2-7B-shaped bf16
source with random weights pruned to the Sheared-LLaMA-1.3B shapes (``--layers`` of the
32 source layers, the target keeping 3/4 of them; 32 is the full model, about 13.5 GB of
source), and the embedded default model (SmolLM2-135M, fp32) pruned to the README's
target.

Peak memory is measured apart, one fresh process per path (a process reuses memory it
freed, which would hide a later round's allocations): the peak resident set during the
export above the resident set before it (source loaded and paged in). The issue's target
"peak memory at most source plus output" means extra <= output bytes.

Run: python benchmarks/bench_export.py [--layers 8] [--rounds 5] [--paths cpp,torch,floor]
     [--skip-default] [--skip-llama] [--json FILE]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from shear.export import export_pruned
from shear.extension import extension_status, load_extension
from shear.patch import apply_masks

LLAMA2_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    tie_word_embeddings=False,
)
SHEARED_13B = dict(hidden=2048, heads=16, kv_heads=16, intermediate=5504)  # of 24 layers
DEFAULT_TARGET = "layers=24,hidden=384,heads=6,kv_heads=2,intermediate=1024"
PATHS = ("cpp", "torch", "floor", "floor_overlap")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_WINDOW = 64 << 20
_SYNC_FILE_RANGE_WRITE = 2


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRSS:
    """Context manager: peak resident set above the level at entry, sampled every 2 ms."""

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def llama2_shaped(layers: int, seed: int = 0):
    """A LLaMA-2-7B-shaped bf16 model with ``layers`` layers and random weights, masked to
    the 1.3B shapes (3/4 of the layers kept) with random mask scores."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**LLAMA2_7B, num_hidden_layers=layers, architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16).eval()  # no init: filled below
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=g)
    keep = max(1, round(layers * 24 / 32))
    target = ",".join([f"layers={keep}"] + [f"{k}={v}" for k, v in SHEARED_13B.items()])
    return model, _masked(model, target, seed)


def default_model():
    """The embedded default model, masked to the README's target."""
    from shear.loading import load_source

    model, _ = load_source("default")
    with torch.no_grad():  # page the (memory-mapped) weights in, so that RSS holds the source
        for p in model.parameters():
            p.add_(0)
    return model, _masked(model, DEFAULT_TARGET, 0)


def _masked(model, target: str, seed: int):
    masks = apply_masks(model, target)  # the mask types the target needs
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for la in masks.log_alpha.values():  # random kept sets and kept values, as after training
            la.copy_(torch.randn(la.shape, generator=g) * 2.0)
    return masks


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def floor_write(folder: Path, nbytes: int, buf: torch.Tensor, overlap: bool = False) -> None:
    """Write ``nbytes`` from a preallocated buffer, then fsync: in one sequential write,
    or (``overlap``) in 64 MiB pieces, starting each piece's writeback at once."""
    view = memoryview(buf.numpy())[:nbytes]
    fd = os.open(folder / "floor.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if not overlap:
            while view:
                view = view[os.write(fd, view) :]
        else:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            for start in range(0, nbytes, _WINDOW):
                piece = view[start : start + _WINDOW]
                done = 0
                while done < len(piece):
                    done += os.pwrite(fd, piece[done:], start + done)
                libc.sync_file_range(fd, start, len(piece), _SYNC_FILE_RANGE_WRITE)
        os.fsync(fd)
    finally:
        os.close(fd)


def _run(path: str, model, masks, dest: Path, out_bytes: int, buf: torch.Tensor | None) -> None:
    if path.startswith("floor"):
        dest.mkdir()
        floor_write(dest, out_bytes, buf, overlap=path == "floor_overlap")
    else:
        export_pruned(model, masks, dest, backend=path)


def measure(name: str, model, masks, rounds: int, workdir: Path, paths: list[str]) -> dict[str, Any]:
    """Interleaved rounds of every path; medians of the times."""
    times: dict[str, list[float]] = {p: [] for p in paths}
    exports = [p for p in paths if not p.startswith("floor")]
    dest = workdir / "probe"
    export_pruned(model, masks, dest, backend=exports[0] if exports else "auto")  # output size, warm-up
    out_bytes = _size(dest)
    shutil.rmtree(dest)
    os.sync()
    buf = torch.ones(out_bytes, dtype=torch.uint8)  # preallocated and touched
    for r in range(rounds + 1):  # round 0 warms every path up and is not counted
        order = paths[r % len(paths) :] + paths[: r % len(paths)]
        for path in order:
            dest = workdir / f"{path}-{r}"
            t = time.perf_counter()
            _run(path, model, masks, dest, out_bytes, buf)
            dt = time.perf_counter() - t
            if r:
                times[path].append(dt)
            shutil.rmtree(dest)
            os.sync()  # the mount may discard freed blocks: let that finish before the next path
            time.sleep(0.5)
            print(f"  {name} round {r} {path}: {dt:.2f} s", file=sys.stderr)
    src_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "name": name,
        "source_bytes": src_bytes,
        "output_bytes": out_bytes,
        "seconds": {k: statistics.median(v) for k, v in times.items()},
        "all_seconds": times,
    }


def memory_child(source: str, layers: int, path: str, workdir: str) -> None:
    """In a fresh process: build the source, then one export; print the peak extra RSS."""
    model, masks = llama2_shaped(layers) if source == "llama" else default_model()
    if path == "cpp":
        load_extension()
    with PeakRSS() as mem:
        export_pruned(model, masks, Path(workdir) / "out", backend=path)
    print(json.dumps({"extra": mem.extra, "base": mem.base}))


def measure_memory(source: str, layers: int, path: str, workdir: Path) -> int:
    sub = Path(tempfile.mkdtemp(prefix="mem-", dir=workdir))
    cmd = [sys.executable, __file__, "--memory-child", source, str(layers), path, str(sub)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    shutil.rmtree(sub)
    return json.loads(out.strip().splitlines()[-1])["extra"]


def _row(r: dict[str, Any]) -> str:
    """A markdown row: times as median (min), ratios of the medians (of the minima)."""
    med, all_s, x = r["seconds"], r["all_seconds"], r.get("extra_peak_bytes", {})
    low = {k: min(v) for k, v in all_s.items()}

    def sec(k: str) -> str:
        return f"{med[k]:.2f} ({low[k]:.2f})" if k in med else "-"

    def ratio(a: str, b: str) -> str:
        return f"**{med[a] / med[b]:.2f}x** ({low[a] / low[b]:.2f}x)" if a in med and b in med else "-"

    def mib(k: str) -> str:
        return f"{x[k] / 2**20:.0f}" if k in x else "-"

    return (
        f"| {r['name']} | {r['source_bytes'] / 1e9:.2f} | {r['output_bytes'] / 1e9:.3f} | {sec('cpp')} | "
        f"{sec('torch')} | {sec('floor')} | {sec('floor_overlap')} | {ratio('torch', 'cpp')} | "
        f"{ratio('cpp', 'floor')} | {ratio('cpp', 'floor_overlap')} | "
        f"{mib('cpp')} / {mib('torch')} / {r['output_bytes'] / 2**20:.0f} |"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        memory_child(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8, help="source layers of the 7B-shaped model (32 = full)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--paths", default=",".join(PATHS), help=f"subset of {','.join(PATHS)}")
    p.add_argument("--skip-default", action="store_true", help="skip the default model")
    p.add_argument("--skip-llama", action="store_true", help="skip the LLaMA-2-7B-shaped source")
    p.add_argument("--skip-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--dir", help="folder to write into (default: a temporary folder in the cwd)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args()
    paths = [x for x in args.paths.split(",") if x]
    if set(paths) - set(PATHS):
        p.error(f"unknown paths {set(paths) - set(PATHS)}")

    load_extension()
    status = extension_status()
    workdir = Path(tempfile.mkdtemp(prefix=".bench-export-", dir=args.dir or "."))
    sources = ([] if args.skip_llama else ["llama"]) + ([] if args.skip_default else ["default"])
    results = []
    try:
        for source in sources:
            t = time.perf_counter()
            model, masks = llama2_shaped(args.layers) if source == "llama" else default_model()
            print(f"built the {source} source in {time.perf_counter() - t:.0f} s", file=sys.stderr)
            name = (
                f"LLaMA-2-7B shapes, {args.layers}/32 layers, bf16 -> 1.3B shapes"
                if source == "llama"
                else "SmolLM2-135M (default), fp32 -> README target"
            )
            r = measure(name, model, masks, args.rounds, workdir, paths)
            del model, masks
            if not args.skip_memory:
                exports = [x for x in paths if not x.startswith("floor")]
                r["extra_peak_bytes"] = {x: measure_memory(source, args.layers, x, workdir) for x in exports}
            results.append(r)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(
        f"\n{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads; torch "
        f"{torch.__version__}; extension: {status.origin}; median of {args.rounds} interleaved rounds, "
        "each ending with fsync; times: median (min) in s; ratios: of the medians (of the minima)\n"
    )
    print(
        "| export | source GB | output GB | cpp | torch | floor | floor (overlapped) | "
        "torch / cpp | cpp / floor | cpp / floor (overlapped) | peak extra MiB: cpp / torch / output |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(_row(r))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
