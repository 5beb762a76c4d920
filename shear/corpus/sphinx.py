"""Sphinx documentation sources (``_sources/**/*.rst.txt``, the reStructuredText that
Sphinx copies next to the HTML it builds), one document per page."""

from __future__ import annotations

from pathlib import Path

from shear.corpus.files import walk_files


def rst_sources(root: str | Path) -> list[Path]:
    """List the ``.rst.txt`` pages under any ``_sources`` folder below ``root``.

    Symlinked duplicates (Debian links the same tree from several places) are skipped.

    Args:
        root: the folder to search.

    Returns:
        The files, sorted by path relative to ``root``.
    """
    return walk_files(root, lambda rel: rel.endswith(".rst.txt") and "_sources" in rel.split("/")[:-1])
