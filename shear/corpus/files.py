"""File helpers shared by the extractors: a sorted walk that skips symlinks, and text reading."""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Callable
from pathlib import Path

_BLANK_LINES = re.compile(r"\n{3,}")


def walk_files(root: str | Path, keep: Callable[[str], bool]) -> list[Path]:
    """List the regular files under ``root`` whose relative POSIX path ``keep`` accepts.

    Symlinks (to files or folders) are skipped, not followed: Debian packages link
    duplicate copies of documentation trees, and the corpus should hold each text once.

    Args:
        root: the folder to walk.
        keep: predicate on the path relative to ``root`` (``"a/b/c.txt"``).

    Returns:
        The files, sorted by relative path (the same order on every machine).
    """
    root = Path(root)
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        # os.walk lists symlinked folders in dirnames but does not descend into them.
        dirnames[:] = sorted(d for d in dirnames if not (base / d).is_symlink())
        for name in filenames:
            path = base / name
            rel = path.relative_to(root).as_posix()
            if not path.is_symlink() and path.is_file() and keep(rel):
                found.append((rel, path))
    return [path for _, path in sorted(found)]


def read_text(path: str | Path) -> str:
    """Read a text file (gzip-compressed when its name ends in ``.gz``) as UTF-8.

    Args:
        path: the file.

    Returns:
        The text, invalid bytes replaced, newlines normalised to ``\\n``.
    """
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return normalise_newlines(raw.decode("utf-8", errors="replace"))


def normalise_newlines(text: str) -> str:
    """Turn ``\\r\\n`` and lone ``\\r`` into ``\\n``."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def squeeze_blank_lines(text: str) -> str:
    """Strip trailing spaces on each line and keep at most one blank line in a row."""
    return _BLANK_LINES.sub("\n\n", "\n".join(line.rstrip() for line in text.split("\n"))).strip()
