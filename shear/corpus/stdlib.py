"""The running Python's standard library sources (``.py``), tests and site-packages excluded."""

from __future__ import annotations

import sysconfig
from pathlib import Path

from shear.corpus.files import walk_files

_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
_SKIP_TOP = frozenset({"site-packages", "dist-packages"})


def stdlib_dir() -> Path:
    """Return the folder of the running Python's standard library.

    Returns:
        ``sysconfig.get_paths()["stdlib"]``.
    """
    return Path(sysconfig.get_paths()["stdlib"])


def _is_library_code(rel: str) -> bool:
    parts = rel.split("/")
    if not parts[-1].endswith(".py") or parts[0] in _SKIP_TOP:
        return False
    if any(part in _TEST_DIRS for part in parts[:-1]):
        return False
    return not parts[-1].startswith("test_")


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """List the standard library's non-test ``.py`` files, sorted by relative path.

    Args:
        root: the library folder (default: :func:`stdlib_dir`).

    Returns:
        The files (symlinks skipped).
    """
    return walk_files(stdlib_dir() if root is None else root, _is_library_code)
