"""Perl's POD documentation (``*.pod``), one document per file, kept as POD source."""

from __future__ import annotations

from pathlib import Path

from shear.corpus.files import walk_files

# perltoc.pod is a generated table of contents of all the other pages: repetition, not text.
SKIP = frozenset({"perltoc.pod"})


def pod_files(root: str | Path) -> list[Path]:
    """List the ``.pod`` files under ``root`` (sorted, symlinks and ``perltoc.pod`` skipped).

    Args:
        root: the folder to search.

    Returns:
        The files.
    """
    return walk_files(root, lambda rel: rel.endswith(".pod") and rel.rsplit("/", 1)[-1] not in SKIP)
