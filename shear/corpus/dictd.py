"""dictd dictionaries (``NAME.dict.dz`` + ``NAME.index``, e.g. FOLDOC) to one text per entry.

The ``.dict.dz`` file is dictzip, a gzip file with random-access tables in its header, so
``gzip`` reads it whole. The ``.index`` file has one line per headword: ``headword TAB
offset TAB length``, the numbers in dictd's base-64 (``A-Za-z0-9+/``, most significant
digit first) and counting bytes of the uncompressed text. Several headwords may share an
entry; entries are read once each, in file order. The ``00-database-*`` entries are the
dictionary's own metadata and are skipped.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterator
from pathlib import Path

_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}
_CROSS_REF = re.compile(r"\{([^{}\n]*)\}")  # FOLDOC writes cross-references {like this}


def b64_number(text: str) -> int:
    """Decode one of dictd's base-64 numbers.

    Args:
        text: the digits (``"Gb9L"``).

    Returns:
        The number.

    Raises:
        ValueError: a character outside the alphabet.
    """
    value = 0
    for c in text:
        if c not in _B64:
            raise ValueError(f"bad dictd base-64 digit {c!r} in {text!r}")
        value = value * 64 + _B64[c]
    return value


def _dedent_entry(entry: str) -> str:
    # The headword sits in column 0 and the body is indented (FOLDOC: 3 spaces); drop the
    # body's common indentation and the cross-reference braces, keep the line breaks.
    lines = entry.split("\n")
    body = [line for line in lines[1:] if line.strip()]
    indent = min((len(line) - len(line.lstrip(" ")) for line in body), default=0)
    out = [lines[0]] + [line[indent:] if line[:indent].isspace() else line.lstrip(" ") for line in lines[1:]]
    return _CROSS_REF.sub(r"\1", "\n".join(line.rstrip() for line in out)).strip()


def iter_entries(dict_path: str | Path, index_path: str | Path | None = None) -> Iterator[str]:
    """Yield every entry of a dictd dictionary as plain text, in the order of the data file.

    Args:
        dict_path: the ``.dict.dz`` (or plain ``.dict``) file.
        index_path: its ``.index`` (default: next to it, same stem).

    Yields:
        One entry's text: headword line, then the body without its indentation.

    Raises:
        ValueError: a malformed index line.
    """
    dict_path = Path(dict_path)
    if index_path is None:
        stem = dict_path.name.removesuffix(".dz").removesuffix(".dict")
        index_path = dict_path.with_name(stem + ".index")
    raw = dict_path.read_bytes()
    data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    spans: set[tuple[int, int]] = set()
    for n, line in enumerate(Path(index_path).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 3:
            raise ValueError(f"{Path(index_path).name}:{n}: expected 'headword TAB offset TAB length'")
        if parts[0].startswith(("00-database", "00database")):
            continue
        spans.add((b64_number(parts[1]), b64_number(parts[2])))
    for offset, length in sorted(spans):
        text = _dedent_entry(data[offset : offset + length].decode("utf-8", errors="replace"))
        if text:
            yield text
