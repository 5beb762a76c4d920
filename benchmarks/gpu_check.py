"""The one GPU check: everything this project needs a GPU for, in a single call.

Run it first whenever a GPU is at hand. GPU time here comes in short loans (about 15
minutes in all, start-up included), so the whole check is one command that fits in about 8
minutes on one H100 / H200 and writes its results before the loan ends::

    python benchmarks/gpu_check.py --out benchmarks/out/gpu_check

Steps (each a subprocess with its own time limit inside the overall budget; a step that
fails or runs out of time is recorded and the next one runs):

1. ``install``: only where ``shear.kernels`` is not importable: ``pip install --no-deps
   --no-build-isolation -e .`` (offline; the C++ extension is skipped, it compiles on use).
2. ``kernel_tests``: the kernel tests (tests/kernels) on CUDA, not the interpreter, the
   tests spread over parallel pytest processes. The ahead-of-time compile test is left out
   (it needs no GPU and runs in CI).
3. ``layer_targets``: ``benchmarks/report_kernels.py --shapes llama7b --dtype bf16
   --targets``: a LLaMA-2-7B decoder layer, forward+backward, fused vs eager vs dense, with
   and without half the heads / channels zero, and the mask sampling; PASS / FAIL for
   masked <= 1.10x dense, >= 1.5x faster than eager, <= 0.65x dense at 50 % zeros.
4. ``prune_step``: ``benchmarks/report_prune_step.py``: the pruning step against the plain
   step at SmolLM2-135M shapes in bf16 autocast: tokens/s and model FLOPs utilisation; and
   both with distillation (``--distill-weight 0.5``) against both without.
5. ``linear_kl``: ``benchmarks/report_linear_kl.py``: the fused linear-KL distillation loss
   (Triton) against the eager full-logits loss at 8192 tokens and a 128k vocabulary
   (LLaMA-3's) with hidden 4096, bf16: time and peak memory.

Writes ``DIR/gpu_check.json`` (everything) and ``DIR/gpu_check.md`` (the section to paste
into benchmarks/RESULTS.md), the logs of every step under ``DIR/logs``, and exits non-zero
when a step failed (a target that is missed is a result, not a failure).

``--dry-run`` runs the same plumbing on a CPU at toy sizes in about a minute (a few kernel
tests in the interpreter, a SmolLM2 layer at 32 tokens without the fused provider, a 2-layer
pruning step); the default test suite runs it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


@dataclass
class Step:
    """What one step did: its status, time, and the summary it produced."""

    name: str
    status: str = "not run"  # ok | failed | timeout | skipped | not run
    seconds: float = 0.0
    detail: str = ""
    result: dict = field(default_factory=dict)


@dataclass
class Plan:
    """Sizes of every step: the real check, or the toy sizes of ``--dry-run``."""

    test_paths: list[str]
    test_filter: str | None
    test_shards: int
    layer_args: list[str]
    prune_args: list[str]
    linear_kl_args: list[str]
    timeouts: dict[str, float]


def plan(dry_run: bool, jobs: int) -> Plan:
    if dry_run:
        return Plan(
            test_paths=["tests/kernels/test_kernel_masked_rms_norm.py"],
            test_filter="no_mask or deterministic",
            test_shards=2,
            layer_args=[
                "--shapes",
                "smollm2",
                "--dtype",
                "fp32",
                "--tokens",
                "32",
                "--rounds",
                "1",
                "--warmup",
                "0",
                "--min-sample-ms",
                "0.01",
                "--providers",
                "eager,dense",
                "--no-sampling",
            ],  # fmt: skip
            prune_args=[
                "--layers",
                "2",
                "--batch",
                "1",
                "--seq",
                "16",
                "--rounds",
                "1",
                "--distill-weight",
                "0.5",
            ],
            linear_kl_args=[
                "--tokens",
                "64",
                "--vocab",
                "1000",
                "--hidden",
                "32",
                "--teacher-hidden",
                "48",
                "--rounds",
                "1",
            ],  # fmt: skip
            timeouts={
                "install": 120,
                "kernel_tests": 180,
                "layer_targets": 180,
                "prune_step": 120,
                "linear_kl": 120,
            },
        )
    kernel_tests = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests" / "kernels").glob("test_*.py"))
    return Plan(
        test_paths=[p for p in kernel_tests if not p.endswith("test_kernel_compile.py")],
        test_filter=None,
        test_shards=jobs,
        layer_args=["--shapes", "llama7b", "--dtype", "bf16", "--tokens", "8192", "16384", "--rounds", "10"],
        prune_args=[
            "--layers",
            "30",
            "--batch",
            "8",
            "--seq",
            "2048",
            "--rounds",
            "10",
            "--distill-weight",
            "0.5",
        ],
        linear_kl_args=[
            "--tokens",
            "8192",
            "--vocab",
            "128256",
            "--hidden",
            "4096",
            "--teacher-hidden",
            "4096",
            "--dtype",
            "bf16",
            "--rounds",
            "5",
        ],  # fmt: skip
        timeouts={
            "install": 120,
            "kernel_tests": 270,
            "layer_targets": 210,
            "prune_step": 150,
            "linear_kl": 90,
        },
    )


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)  # tests/conftest.py sets it only where there is no GPU
    env.pop("SHEAR_KERNELS", None)  # auto: the kernels on CUDA
    return env


def _run(cmd: list[str], log: Path, timeout: float, env: dict[str, str] | None = None) -> tuple[str, float]:
    """Run ``cmd`` in ROOT with its output in ``log``; returns (status, seconds)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env or _env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: pytest's and Triton's children too
            proc.wait()
            f.write(f"\n[gpu_check: killed after {timeout:.0f} s]\n")
            return "timeout", time.perf_counter() - t0
    return ("ok" if rc == 0 else "failed"), time.perf_counter() - t0


def _tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


# --- steps ------------------------------------------------------------------------------------


def step_install(out: Path, p: Plan, budget: float) -> Step:
    step = Step("install")
    probe = subprocess.run([sys.executable, "-c", "import shear.kernels.masked_linear"], cwd=out, env=_env(),
                           capture_output=True, text=True)  # fmt: skip
    if probe.returncode == 0:
        step.status, step.detail = "skipped", "shear.kernels is importable"
        return step
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-e",
        str(ROOT),
    ]
    env = dict(_env(), SHEAR_NO_EXTENSION="1")
    step.status, step.seconds = _run(
        cmd, out / "logs" / "install.log", min(p.timeouts["install"], budget), env
    )
    step.detail = _tail(out / "logs" / "install.log", 3)
    return step


def _collect_tests(p: Plan, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *p.test_paths]
    if p.test_filter:
        cmd += ["-k", p.test_filter]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "logs" / "kernel_tests_collect.log").write_text(res.stdout + res.stderr)
    return [line.strip() for line in res.stdout.splitlines() if "::" in line]


def _junit(path: Path) -> dict:
    """Counts and failing test ids from one pytest junit XML file."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failing: list[str] = []
    if not path.exists():
        return {**counts, "failing": failing}
    for case in ET.parse(path).getroot().iter("testcase"):
        tid = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            failing.append(tid)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failing": failing}


def step_kernel_tests(out: Path, p: Plan, budget: float) -> Step:
    step = Step("kernel_tests")
    t0 = time.perf_counter()
    ids = _collect_tests(p, out)
    if not ids:
        step.status, step.detail = (
            "failed",
            "no tests collected:\n" + _tail(out / "logs" / "kernel_tests_collect.log"),
        )
        return step
    shards = [ids[i :: p.test_shards] for i in range(min(p.test_shards, len(ids)))]
    timeout = min(p.timeouts["kernel_tests"], budget) - (time.perf_counter() - t0)

    def shard(i: int) -> tuple[str, dict]:
        xml = out / "logs" / f"kernel_tests_{i}.xml"
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={xml}",
            *shards[i],
        ]
        status, _ = _run(cmd, out / "logs" / f"kernel_tests_{i}.log", timeout)
        return status, _junit(xml)

    with concurrent.futures.ThreadPoolExecutor(len(shards)) as pool:
        results = list(pool.map(shard, range(len(shards))))
    step.seconds = time.perf_counter() - t0
    total = {k: sum(r[k] for _, r in results) for k in ("passed", "failed", "skipped")}
    failing = sorted(t for _, r in results for t in r["failing"])
    statuses = [s for s, _ in results]
    step.result = {"collected": len(ids), "shards": len(shards), **total, "failing": failing}
    unrun = len(ids) - sum(total.values())
    if "timeout" in statuses:
        step.status = "timeout"
    elif total["failed"] or unrun or "failed" in statuses:
        step.status = "failed"
    else:
        step.status = "ok"
    step.detail = f"{total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped" + (
        f", {unrun} not run" if unrun else ""
    )
    return step


def step_layer_targets(out: Path, p: Plan, budget: float) -> Step:
    step = Step("layer_targets")
    dest = out / "report_kernels"
    cmd = [sys.executable, str(BENCH / "report_kernels.py"), *p.layer_args, "--targets", "--out", str(dest)]
    log = out / "logs" / "layer_targets.log"
    step.status, step.seconds = _run(cmd, log, min(p.timeouts["layer_targets"], budget))
    found = sorted(dest.glob("kernels_*_targets.json"))
    if found:
        data = json.loads(found[-1].read_text())
        layer = [r for r in data["records"] if r["op"] == "layer"]
        step.result = {"targets": data["targets"], "records": layer, "environment": data["environment"]}
    elif step.status == "ok":
        step.status = "failed"
    step.detail = (
        _tail(log, 3) if step.status != "ok" else f"{len(step.result.get('targets', []))} target lines"
    )
    return step


def _report_step(name: str, script: str, args: list[str], out: Path, p: Plan, budget: float) -> Step:
    """Run a report script that writes ``out/NAME.json``; a missing file fails the step."""
    step = Step(name)
    dest = out / f"{name}.json"
    cmd = [sys.executable, str(BENCH / script), *args, "--json", str(dest)]
    log = out / "logs" / f"{name}.log"
    step.status, step.seconds = _run(cmd, log, min(p.timeouts[name], budget))
    if dest.exists():
        step.result = json.loads(dest.read_text())
    elif step.status == "ok":
        step.status = "failed"
    step.detail = _tail(log, 3) if step.status != "ok" else ""
    return step


def step_prune(out: Path, p: Plan, budget: float) -> Step:
    return _report_step("prune_step", "report_prune_step.py", p.prune_args, out, p, budget)


def step_linear_kl(out: Path, p: Plan, budget: float) -> Step:
    return _report_step("linear_kl", "report_linear_kl.py", p.linear_kl_args, out, p, budget)


# --- report -----------------------------------------------------------------------------------


def _environment(dry_run: bool) -> dict:
    import torch
    import transformers
    import triton

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    return {
        "device": device,
        "dry_run": dry_run,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "date": datetime.date.today().isoformat(),
    }


def markdown(env: dict, steps: list[Step]) -> str:
    """The RESULTS.md section: environment, step table, tests, layer targets, pruning step."""
    title = "GPU check" + (" (dry run on CPU: plumbing only, numbers mean nothing)" if env["dry_run"] else "")
    lines = [
        f"## {title}",
        "",
        f"{env['date']}, {env['device']}, {env['cpus']} CPU cores; torch {env['torch']} "
        f"(CUDA {env['cuda']}), triton {env['triton']}, transformers {env['transformers']}, "
        f"Python {env['python']}. `python benchmarks/gpu_check.py`.",
        "",
        "| step | status | seconds | summary |",
        "|---|---|---|---|",
    ]
    for s in steps:
        summary = s.detail.splitlines()[-1] if s.detail else ""
        lines.append(f"| {s.name} | {s.status} | {s.seconds:.0f} | {summary.replace('|', '/')} |")
    by_name = {s.name: s for s in steps}
    tests = by_name.get("kernel_tests")
    if tests and tests.result.get("failing"):
        lines += ["", "Failing kernel tests:", *[f"- `{t}`" for t in tests.result["failing"]]]
    layer = by_name.get("layer_targets")
    if layer and layer.result:
        lines += ["", "Decoder layer, forward+backward (median ms; ratios measured side by side):", "",
                  "| tokens | zeros | provider | median ms | vs dense | vs eager | TFLOP/s | peak MiB |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in layer.result["records"]:
            if r["pass"] != "forward_backward":
                continue
            if r["status"] != "ok":
                lines.append(f"| {r['tokens']} | {r.get('zero_half') or '-'} | {r['provider']} "
                             f"| {r['status']}: {r.get('reason', '')} | | | | |")  # fmt: skip
                continue
            fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
            lines.append(
                f"| {r['tokens']} | {r.get('zero_half') or '-'} | {r['provider']} | {r['median_ms']:.2f} "
                f"| {fmt(r.get('vs_dense'), '.3f')} | {fmt(r.get('vs_eager'), '.3f')} "
                f"| {fmt(r.get('tflops'), '.0f')} | {fmt(r.get('peak_mib'), '.0f')} |"
            )
        lines += ["", "Targets:", *[f"- {t}" for t in layer.result["targets"]]]
    prune = by_name.get("prune_step")
    if prune and prune.result:
        r = prune.result
        sys.path.insert(0, str(BENCH))
        from report_prune_step import markdown as prune_table

        peak = f"a {r['peak_tflops']} TFLOP/s bf16 peak" if r["peak_tflops"] else "no known peak"
        lines += ["", f"Pruning step vs plain step, SmolLM2-135M shapes ({r['layers']} layers), batch "
                  f"{r['batch']} x {r['seq']} tokens, median of {r['rounds']} interleaved rounds "
                  f"(MFU: {r['flops_per_token'] / 1e9:.2f} GFLOP per token over {peak}):",
                  "", prune_table(r)]  # fmt: skip
    linear_kl = by_name.get("linear_kl")
    if linear_kl and linear_kl.result:
        sys.path.insert(0, str(BENCH))
        from report_linear_kl import markdown as linear_kl_table

        lines += ["", "Fused linear-KL distillation loss vs eager full logits, forward+backward:", "",
                  linear_kl_table(linear_kl.result)]  # fmt: skip
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for the JSON, the markdown and the logs")
    ap.add_argument("--dry-run", action="store_true", help="check the plumbing on CPU at toy sizes")
    ap.add_argument("--budget-s", type=float, default=480.0, help="overall time limit (default 480 s)")
    ap.add_argument("--jobs", type=int, default=min(12, os.cpu_count() or 1), help="parallel test processes")
    ap.add_argument(
        "--steps", default="install,kernel_tests,layer_targets,prune_step,linear_kl", help="comma list"
    )
    args = ap.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("shear: error: no CUDA device here; `--dry-run` checks the plumbing on CPU", file=sys.stderr)
        return 2
    out = args.out.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    p = plan(args.dry_run, args.jobs)
    runners = {
        "install": step_install,
        "kernel_tests": step_kernel_tests,
        "layer_targets": step_layer_targets,
        "prune_step": step_prune,
        "linear_kl": step_linear_kl,
    }
    wanted = [s.strip() for s in args.steps.split(",") if s.strip()]
    bad = [s for s in wanted if s not in runners]
    if bad:
        print(f"shear: error: unknown steps {bad}; choose from {', '.join(runners)}", file=sys.stderr)
        return 2
    env = _environment(args.dry_run)
    t0 = time.perf_counter()
    steps: list[Step] = []
    for name in wanted:
        left = args.budget_s - (time.perf_counter() - t0)
        if left < 5:
            steps.append(Step(name, "not run", 0.0, "out of time"))
            continue
        print(f"[gpu_check] {name} (up to {min(p.timeouts[name], left):.0f} s)", file=sys.stderr, flush=True)
        steps.append(runners[name](out, p, left))
        print(
            f"[gpu_check] {name}: {steps[-1].status} in {steps[-1].seconds:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        payload = {"environment": env, "plan": asdict(p), "steps": [asdict(s) for s in steps]}
        _write(out / "gpu_check.json", json.dumps(payload, indent=1))  # after every step: a kill keeps it
    text = markdown(env, steps)
    _write(out / "gpu_check.md", text)
    print(text)
    print(f"[gpu_check] {time.perf_counter() - t0:.0f} s in all; wrote {out / 'gpu_check.json'} and "
          f"{out / 'gpu_check.md'}", file=sys.stderr)  # fmt: skip
    return 0 if all(s.status in ("ok", "skipped") for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
