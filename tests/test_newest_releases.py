"""The newest releases of every dependency, in a fresh virtual environment (slow: installs from PyPI).

Runs ``.ci/newest_releases.py``: install without constraints.txt, reinstall non-editable and editable,
and the smoke set from the checkout's root. When a new release breaks shear, fix shear, then refresh
the pins (README, "Tested versions").
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_newest_releases_install_and_pass_the_smoke_set(tmp_path):
    script = REPO / ".ci" / "newest_releases.py"
    argv = [sys.executable, str(script), "--venv", str(tmp_path / "venv")]
    r = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=3600)
    print(r.stdout[-6000:])
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-4000:])
    assert " passed" in r.stdout.splitlines()[-1]
