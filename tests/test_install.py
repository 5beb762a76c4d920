"""A normal install: build the wheel, install it (not editable) into a fresh virtual environment
that sees the dependencies but not the source tree, and run ``shear`` from there.

The default suite builds the wheel without the C++ extension (``SHEAR_NO_EXTENSION=1``: the
build is 2 s instead of about 40 s on 2 cores) and with no compiler reachable, so the export
falls back to the plain-PyTorch backend and says so; the ``slow`` test builds the extension.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: What a source distribution of shear holds (setup.py reads README.md).
SOURCES = ("setup.py", "pyproject.toml", "README.md", "shear", "kernels", "csrc")
TARGET = "layers=2,hidden=48,heads=2,kv_heads=1,intermediate=64"


def _build_wheel(dest: Path, extension: bool) -> Path:
    """Build shear's wheel from a copy of the working tree (the tree itself is left as it is)."""
    src = dest / "src"
    src.mkdir(parents=True)
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build")
    for name in SOURCES:
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, src / name, **(
            {"ignore": skip} if (REPO / name).is_dir() else {}))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "SHEAR_NO_EXTENSION"}
    if not extension:
        env["SHEAR_NO_EXTENSION"] = "1"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
           "-w", str(dest / "dist"), str(src)]  # fmt: skip
    r = subprocess.run(cmd, env=env, cwd=dest, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (dest / "dist").glob("shear-*.whl")
    return wheel


def _venv_with(wheel: Path, dest: Path) -> Path:
    """A fresh virtual environment holding ``wheel``; the dependencies come from this interpreter's
    site-packages through a .pth file (only plain paths: no editable-install hooks run there)."""
    venv = dest / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    deps = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    (site / "zz_shear_test_deps.pth").write_text("\n".join(deps) + "\n")
    python = venv / "bin" / "python"
    cmd = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
           str(wheel)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return venv


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "SHEAR_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1", **extra}


def _run(venv: Path, args: list[str], tmp: Path, **extra: str) -> subprocess.CompletedProcess:
    cwd = tmp / "elsewhere"  # outside the repository: its shear/ must not be importable
    cwd.mkdir(exist_ok=True)
    return subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]], cwd=cwd, env=_env(tmp, **extra), capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip


def test_wheel_installs_and_runs(tiny_source, data_dir, tmp_path):
    wheel = _build_wheel(tmp_path, extension=False)
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"shear", wheel.name.split("-py3")[0] + ".dist-info"}
    for module in ("shear/data/__init__.py", "shear/corpus/__init__.py", "shear/ops/__init__.py",
                   "shear/kernels/__init__.py", "shear/csrc/gather.cpp", "shear/py.typed"):  # fmt: skip
        assert module in names
    venv = _venv_with(wheel, tmp_path)
    site = str(venv)

    probe = "import shear, shear.data, shear.corpus, shear.ops, shear.kernels; print(shear.__file__)"
    r = _run(venv, ["python", "-c", probe], tmp_path)
    assert r.returncode == 0 and r.stdout.strip().startswith(site), r.stderr[-2000:]

    r = _run(venv, ["shear", "--help"], tmp_path)
    assert r.returncode == 0 and "export" in r.stdout and "prune" in r.stdout, r.stderr[-2000:]

    no_compiler = {"CXX": str(tmp_path / "no-compiler")}
    r = _run(venv, ["shear", "doctor", "--json"], tmp_path, **no_compiler)
    assert r.returncode == 0, r.stderr[-2000:]
    ext = json.loads(r.stdout)["extension"]
    assert ext["source"].startswith(site) and ext["source"].endswith("shear/csrc/gather.cpp")
    assert not ext["available"] and not ext["can_build"]

    out = tmp_path / "run"
    prune = ["shear", "prune", "--model", tiny_source, "--target", TARGET, "--data", data_dir,
             "--out", str(out), "--steps", "2", "--batch-size", "2", "--seq-len", "32",
             "--eval-interval", "2"]  # fmt: skip
    r = _run(venv, prune, tmp_path, **no_compiler)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "export backend: torch (extension unavailable" in r.stderr
    assert (out / "export" / "model.safetensors").is_file() and (out / "report.md").is_file()
    assert json.loads((out / "export" / "shear_export.json").read_text())["backend"] == "torch"


@pytest.mark.slow
def test_wheel_with_the_extension(tmp_path):
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    wheel = _build_wheel(tmp_path, extension=True)
    assert any(n.startswith("shear/_gather") and n.endswith(".so") for n in zipfile.ZipFile(wheel).namelist())
    venv = _venv_with(wheel, tmp_path)
    r = _run(venv, ["shear", "doctor", "--json"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)
    assert report["extension"]["origin"] == "setup.py build" and report["export_backend"]["uses"] == "cpp"
