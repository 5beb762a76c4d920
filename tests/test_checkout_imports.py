"""The checkout's top-level ``kernels/`` never shadows Hugging Face's ``kernels`` package.

Python puts the working directory first on ``sys.path`` for ``python -c`` and ``python -m``, so
from the checkout's root the folder is found first. Each case runs a fresh interpreter there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import make_tiny

REPO = Path(__file__).resolve().parent.parent


def _python(code: str, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python [flags] -c code`` in the checkout's root."""
    env = {**os.environ, **(env or {})}
    env.pop("PYTHONPATH", None)  # the checkout's root reaches sys.path as the working directory only
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_hugging_face_model_loads_from_the_checkout_root(tmp_path):
    make_tiny("llama_gqa_bias_untied").save_pretrained(tmp_path / "model")
    code = f"""
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r})
print(type(model).__name__)
try:
    import kernels
    print("kernels:", kernels.__file__)
except ModuleNotFoundError:
    pass
"""
    r = _python(code)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines()[0] == "LlamaForCausalLM"
    for line in r.stdout.splitlines()[1:]:
        assert not Path(line.removeprefix("kernels: ")).resolve().is_relative_to(REPO), line


def test_kernels_is_the_installed_package_and_never_the_checkouts():
    """``kernels/`` has no ``__init__.py``: a namespace portion, which every regular package on
    the path wins over; where none is installed it is an empty namespace that runs no code."""
    code = "import importlib.util as u; s = u.find_spec('kernels'); print(s and s.origin)"
    installed = _python("import sys; sys.path.remove(''); " + code)  # without the checkout's root
    r = _python(code)
    assert r.returncode == 0, r.stderr[-3000:]
    if installed.stdout.strip() != "None":
        assert r.stdout.strip() == installed.stdout.strip()
        assert not Path(r.stdout.strip()).resolve().is_relative_to(REPO)
    # without site-packages (-S) only the checkout's folder is left: found as a namespace, no origin
    r = _python(code, "-S")
    assert r.returncode == 0 and r.stdout.strip() == "None", (r.stdout, r.stderr[-2000:])
    assert not (REPO / "kernels" / "__init__.py").exists()


def test_shear_kernels_is_importable_from_anywhere(tmp_path):
    code = "import shear.kernels.heuristics as h, shear.kernels as k; print(h.__file__)"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert Path(r.stdout.strip()).name == "heuristics.py"


def test_setuptools_entry_points_load_from_the_checkout_root():
    """pip's metadata step imports every ``egg_info.writers`` entry point (Hugging Face's kernels
    registers one) with the checkout's root on the path: a reinstall failed on it."""
    code = """
from importlib.metadata import entry_points
for ep in entry_points(group="egg_info.writers"):
    ep.load()
print("ok")
"""
    r = _python(code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
