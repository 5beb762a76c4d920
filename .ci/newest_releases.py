"""Check shear against the newest releases of its dependencies, and refresh constraints.txt.

Creates a fresh virtual environment, installs shear from the checkout's root as the README does
but without constraints.txt (so pip takes the newest release of every dependency; torch stays at
the README's pinned CPU build, since an unpinned torch is the multi-GB CUDA build), reinstalls it
non-editable and editable again, then runs a smoke set of tests from the checkout's root: import,
load a Hugging Face model and the default model, a few pruning steps on a tiny model, export,
evaluate the export, and a wheel install.

    python .ci/newest_releases.py                      # smoke set; prints the versions it saw
    python .ci/newest_releases.py --full --write-constraints   # whole suite, then refresh the pins

Exit status 0 when every step passed. ``--write-constraints`` rewrites constraints.txt with the
environment's exact versions, only after the tests passed in it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONSTRAINTS = REPO / "constraints.txt"
#: The README's pinned torch (its first install step).
TORCH = "torch==2.13.0"
SMOKE_TESTS = [
    "tests/test_checkout_imports.py",
    "tests/test_cli.py::test_console_script_and_default_model",
    "tests/test_cli.py::test_prune_and_eval_commands",
    "tests/test_install.py::test_wheel_installs_and_runs",
]
#: Not pinned: the installers themselves, and shear.
UNPINNED = {"pip", "shear"}
HEADER = """\
# The exact versions the test suite last passed with (pip constraints: `pip install -c constraints.txt ...`).
# Both README commands and .ci/run install with this file, so a fresh machine gets what was tested;
# setup.py keeps lower bounds only. Refreshed by `python .ci/newest_releases.py --full --write-constraints`
# (a fresh virtual environment with the newest releases, the whole suite, then these pins).
"""


def _run(cmd: list[str], **env: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, **env})


def _freeze(python: Path) -> list[str]:
    out = subprocess.run([str(python), "-m", "pip", "freeze", "--all", "--exclude-editable"], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    pins = []
    for line in out.splitlines():
        name, sep, version = line.partition("==")
        if sep and name.lower() not in UNPINNED:
            pins.append(f"{name}=={version.split('+')[0]}")  # torch's +cpu: the same release on a GPU machine
    return sorted(pins, key=str.lower)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, help="the environment's folder (default: temporary)")
    parser.add_argument("--full", action="store_true", help="run the whole default suite, not the smoke set")
    parser.add_argument("--write-constraints", action="store_true",
                        help="after the tests pass, pin the versions seen in constraints.txt")  # fmt: skip
    args = parser.parse_args(argv)
    venv = args.venv or Path(tempfile.mkdtemp(prefix="shear-newest-")) / "venv"
    if venv.exists():
        shutil.rmtree(venv)
    _run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q"]
    _run(pip + [TORCH, "setuptools"])
    _run(pip + ["--no-build-isolation", "-e", ".[dev]"])
    # A reinstall runs setuptools' metadata step again, with every entry point of the environment
    # (Hugging Face's kernels registers one) imported from the checkout's root.
    _run(pip + ["--no-build-isolation", "--force-reinstall", "--no-deps", "."], SHEAR_NO_EXTENSION="1")
    _run(pip + ["--no-build-isolation", "--force-reinstall", "--no-deps", "-e", "."], SHEAR_NO_EXTENSION="1")
    pins = _freeze(python)
    print(json.dumps({"versions": pins}, indent=1), flush=True)
    tests = [] if args.full else SMOKE_TESTS
    _run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
         HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")  # fmt: skip
    if args.write_constraints:
        tmp = CONSTRAINTS.with_name(CONSTRAINTS.name + ".tmp")
        tmp.write_text(HEADER + "\n".join(pins) + "\n")
        os.replace(tmp, CONSTRAINTS)
        print(f"wrote {CONSTRAINTS} ({len(pins)} pins)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as e:
        print(f"newest_releases: failed: {' '.join(map(str, e.cmd))} (exit {e.returncode})", file=sys.stderr)
        sys.exit(1)
