"""SWORD ``zText`` Bible modules (compressed blocks of OSIS markup) to plain text.

A zText module keeps each testament in three files: ``ot.bzs`` / ``nt.bzs``, the block
index, a run of entries of three little-endian uint32 (offset into ``.bzz``, compressed
size, uncompressed size); ``.bzz``, the compressed blocks (zlib for ``CompressType=ZIP``,
the common case; bzip2 and xz are recognised by their magic bytes); and ``.bzv``, the
per-verse index, which is not needed to read the text in order. With ``BlockType=BOOK``
one block is one book of the Bible.
"""

from __future__ import annotations

import bz2
import html
import lzma
import re
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

_ENTRY = struct.Struct("<3I")


def _decompress(block: bytes) -> bytes:
    if block[:3] == b"BZh":
        return bz2.decompress(block)
    if block[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(block)
    return zlib.decompress(block)


def read_ztext_blocks(module_dir: str | Path) -> Iterator[tuple[int, str, str]]:
    """Yield every block of a zText module, Old Testament first.

    Args:
        module_dir: the folder holding ``ot.bzs`` / ``ot.bzz`` and/or ``nt.bzs`` / ``nt.bzz``.

    Yields:
        ``(testament, block index, OSIS text)`` with testament ``"ot"`` or ``"nt"``;
        empty blocks are skipped.

    Raises:
        ValueError: an index whose size is not a multiple of 12 or that points past the data.
    """
    module_dir = Path(module_dir)
    for testament in ("ot", "nt"):
        bzs, bzz = module_dir / f"{testament}.bzs", module_dir / f"{testament}.bzz"
        if not bzs.is_file() or not bzz.is_file():
            continue
        index, data = bzs.read_bytes(), bzz.read_bytes()
        if len(index) % _ENTRY.size:
            raise ValueError(f"{bzs.name}: {len(index)} bytes is not a whole number of 12-byte entries")
        for i, (offset, size, _) in enumerate(_ENTRY.iter_unpack(index)):
            if size == 0:
                continue
            if offset + size > len(data):
                raise ValueError(f"{bzs.name}: entry {i} points past the end of {bzz.name}")
            yield testament, i, _decompress(data[offset : offset + size]).decode("utf-8", errors="replace")


# Footnotes and cross-references are apparatus, not running text.
_NOTE = re.compile(r"<note\b[^>]*/>|<note\b[^>]*>.*?</note>", re.S)
# A chapter start is a paragraph break; titles, paragraphs and poetry lines are lines.
_CHAPTER = re.compile(r"<chapter\b[^>]*\bsID=[^>]*>")
_BREAK = re.compile(r"</?(?:title|div|p|l|lg|lb|item|list|head)\b[^>]*>")
_TAG = re.compile(r"<[^>]*>")
_SPACES = re.compile(r"[ \t\u00a0]+")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:!?’”)\]])")
_BLANK_LINES = re.compile(r"\n{3,}")


def osis_to_text(osis: str) -> str:
    """Strip OSIS markup to plain text: notes dropped, titles and paragraphs on their own lines.

    Args:
        osis: an OSIS fragment (a zText block).

    Returns:
        The text, paragraphs separated by blank lines.
    """
    text = _NOTE.sub(" ", osis)
    text = _CHAPTER.sub("\n\n", text)
    text = _BREAK.sub("\n", text)
    text = html.unescape(_TAG.sub("", text))
    lines = (_SPACE_BEFORE_PUNCT.sub(r"\1", _SPACES.sub(" ", line)).strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()
