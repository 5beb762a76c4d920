"""Regenerate the compile table of benchmarks/RESULTS.md: every kernel launch compiled for sm_80
and sm_90 (registers, stack, shared memory, spills, stages / buffers, tensor-core instructions).

Runs ``python -m shear.kernels.aot`` (no GPU needed) with the interpreter off and replaces the
text between the ``compile-table`` markers of RESULTS.md with its table, dated and versioned.

Run: python benchmarks/report_compile.py [--cases llama7b:bf16 smollm2:bf16 smollm2:fp16]
     [--jobs N] [--results PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
START, END = "<!-- compile-table:start -->", "<!-- compile-table:end -->"
CASES = ["llama7b:bf16", "smollm2:bf16", "smollm2:fp16"]  # as tests/kernels/test_kernel_compile.py


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=CASES, metavar="SHAPE:DTYPE")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    text = args.results.read_text()
    if START not in text or END not in text:
        print(f"shear: error: {args.results} has no {START} ... {END} markers", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "aot.json"
        cmd = [
            sys.executable,
            "-m",
            "shear.kernels.aot",
            "--quiet",
            "--jobs",
            str(args.jobs),
            "--cases",
            *args.cases,
        ]
        proc = subprocess.run(
            [*cmd, "--json", str(out)],
            env=dict(os.environ, TRITON_INTERPRET="0"),
            capture_output=True,
            text=True,
        )
        if not out.exists():
            print(f"shear: error: shear.kernels.aot failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        report = json.loads(out.read_text())
    table = proc.stdout.split("\n\n")[0].strip()
    failed = sum(bool(b["problems"]) for b in report["builds"])
    head = (
        f"{datetime.date.today().isoformat()}, `python benchmarks/report_compile.py` "
        f"(`python -m shear.kernels.aot --cases {' '.join(args.cases)}`): triton {report['triton']}, "
        f"torch {report['torch']}, {platform.machine()}, no GPU; {len(report['builds'])} distinct builds "
        f"in {report['seconds']:.0f} s with {args.jobs} processes; {failed} with problems."
    )
    if report["not_compiled"]:
        head += f" Not launched by any op, so not compiled: {', '.join(report['not_compiled'])}."
    block = f"{START}\n{head}\n\n{table}\n{END}"
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    tmp_path = args.results.with_suffix(".tmp")
    tmp_path.write_text(before + block + after)
    os.replace(tmp_path, args.results)
    print(f"wrote {len(report['builds'])} rows into {args.results}; {failed} with problems")
    return 1 if failed or report["not_compiled"] else 0


if __name__ == "__main__":
    sys.exit(main())
