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


def test_import_kernels_gives_the_installed_package_or_fails_as_usual():
    probe = "import importlib.util, sys; sys.path.remove(''); print(importlib.util.find_spec('kernels'))"
    installed = _python(probe).stdout.strip() != "None"
    r = _python("import kernels; print(kernels.__file__)")
    if installed:
        assert r.returncode == 0, r.stderr[-3000:]
        assert not Path(r.stdout.strip()).resolve().is_relative_to(REPO)
    else:
        assert "ModuleNotFoundError: No module named 'kernels'" in r.stderr
    # Without site-packages (-S) nothing but the checkout holds a ``kernels``: the usual error.
    r = _python("import kernels", "-S")
    assert r.returncode == 1 and r.stderr.strip().endswith("ModuleNotFoundError: No module named 'kernels'")


def test_two_checkouts_on_the_path_do_not_hand_the_import_back_and_forth(tmp_path):
    other = tmp_path / "other_checkout" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text((REPO / "kernels" / "__init__.py").read_text())
    r = _python("import kernels", "-S", env={"PYTHONPATH": str(other.parent)})
    assert r.returncode == 1 and r.stderr.strip().endswith("ModuleNotFoundError: No module named 'kernels'")


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
