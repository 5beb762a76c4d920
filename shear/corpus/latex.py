"""LaTeX sources: a book split into chapters, and Sweave (``.Rnw``) vignettes, one per file.

Both are kept as LaTeX source (the point of the domain); only generator noise goes: the
``\\typeout{Original Yodl file: ...}`` lines of Yodl-generated books, trailing spaces and
runs of blank lines.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from shear.corpus.files import read_text, squeeze_blank_lines, walk_files

# A chapter starts on a line whose first command is \chapter, possibly after page breaks
# (Yodl writes "\cleardoublepage\chapter{...}").
_CHAPTER = re.compile(r"^\s*(?:\\(?:cleardoublepage|clearpage|newpage)\s*)*\\chapter\b")
_TYPEOUT = re.compile(r"\\typeout\{Original Yodl file:[^}]*\}")


def split_chapters(text: str) -> list[str]:
    """Split LaTeX source before each ``\\chapter``; the preamble stays with the first chapter.

    Args:
        text: the whole document.

    Returns:
        One string per chapter (the whole text if there is no ``\\chapter``).
    """
    chunks: list[list[str]] = [[]]
    seen_chapter = False
    for line in text.split("\n"):
        if _CHAPTER.match(line):
            if seen_chapter:
                chunks.append([])
            seen_chapter = True
        chunks[-1].append(line)
    return ["\n".join(chunk) for chunk in chunks]


def latex_chapters(path: str | Path) -> Iterator[str]:
    """Yield a LaTeX book (``.tex``/``.latex``, optionally ``.gz``) chapter by chapter.

    Args:
        path: the file.

    Yields:
        Each chapter's source, cleaned (empty ones skipped).
    """
    text = read_text(path)
    text = _TYPEOUT.sub("", text)
    for chapter in split_chapters(text):
        chapter = squeeze_blank_lines(chapter)
        if chapter:
            yield chapter


def rnw_files(root: str | Path) -> list[Path]:
    """List the Sweave vignettes (``*.Rnw``) under ``root``, sorted, symlinks skipped.

    Args:
        root: a folder (e.g. extracted R packages).

    Returns:
        The files.
    """
    return walk_files(root, lambda rel: rel.endswith(".Rnw"))


def rnw_text(path: str | Path) -> str:
    """Read one ``.Rnw`` file as a document (LaTeX with R chunks, kept as is but tidied).

    Args:
        path: the file.

    Returns:
        The text.
    """
    return squeeze_blank_lines(read_text(path))
