"""R's XDR serialization and lazy-load databases (``.rdb`` / ``.rdx``), read in pure Python.

An installed R package keeps its data sets in ``data/Rdata.rdb``: a concatenation of
objects, each a 4-byte big-endian length followed by a zlib stream (or, for the rarer
``compress=2/3`` builds, a type byte and a bzip2 / xz stream) of R's XDR serialization
(format 2 or 3, ``saveRDS``'s binary format). ``data/Rdata.rdx`` is an RDS file (usually
gzip) holding ``list(variables = list(name = c(offset, length), ...), references = ...,
compressed = ...)``: where each object lives in the ``.rdb``.

The reader understands the types data sets are made of (vectors, lists, pairlists,
symbols, attributes, references, environments, the common ALTREP wrappers); byte code
and external pointers are refused with a ValueError. It is enough for character vectors
such as janeaustenr's novels, which is what the corpus needs.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# SEXP type codes (R internals, serialize.c).
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
SPECIALSXP, BUILTINSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP = 7, 8, 9, 10, 13, 14, 15
STRSXP, DOTSXP, VECSXP, EXPRSXP, BCODESXP, EXTPTRSXP, WEAKREFSXP = 16, 17, 19, 20, 21, 22, 23
RAWSXP, S4SXP = 24, 25
ALTREP_SXP, ATTRLISTSXP, ATTRLANGSXP, BASEENV_SXP, EMPTYENV_SXP = 238, 239, 240, 241, 242
PERSISTSXP, PACKAGESXP, NAMESPACESXP, BASENAMESPACE_SXP = 247, 248, 249, 250
MISSINGARG_SXP, UNBOUNDVALUE_SXP, GLOBALENV_SXP, NILVALUE_SXP, REFSXP = 251, 252, 253, 254, 255

_PAIRLISTS = (LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP, ATTRLISTSXP, ATTRLANGSXP)
_SINGLETONS = (EMPTYENV_SXP, BASEENV_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP, MISSINGARG_SXP, BASENAMESPACE_SXP)
_NA_INTEGER = -(2**31)
_LATIN1_MASK = 1 << 2  # CHARSXP "levels" bit: the string is latin-1, not UTF-8


@dataclass
class RValue:
    """One deserialized R object.

    Attributes:
        sexptype: R's type code (``STRSXP`` = 16, ``VECSXP`` = 19, ...).
        data: the payload: a list for vectors (``None`` for NA), a str for symbols,
            ``[(tag, value), ...]`` for pairlists, None for singletons.
        attributes: the object's attributes by name (``names``, ``class``, ...).
    """

    sexptype: int
    data: Any = None
    attributes: dict[str, Any] = field(default_factory=dict)

    def names(self) -> list[str | None] | None:
        """Return the ``names`` attribute as a list of strings, or None."""
        names = self.attributes.get("names")
        return names.data if isinstance(names, RValue) else None


class _Reader:
    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0
        self.refs: list[RValue] = []

    def _take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise ValueError("truncated R serialization")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints
            hi, lo = struct.unpack(">II", self._take(8))
            n = (hi << 32) + lo
        return n

    def header(self) -> None:
        if self._take(2) != b"X\n":
            raise ValueError("not an R XDR serialization (expected 'X\\n')")
        version = self.int()
        self._take(8)  # writer version, minimal reader version
        if version == 3:
            self._take(self.int())  # native encoding name
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version}")

    def string_vec(self) -> list[Any]:
        if self.int() != 0:
            raise ValueError("bad persistent string vector")
        return [self.item() for _ in range(self.length())]

    def attributes(self) -> dict[str, Any]:
        plist = self.item()
        if plist is None:
            return {}
        return {tag.data if isinstance(tag, RValue) else str(tag): value for tag, value in plist.data}

    def item(self) -> Any:
        flags = struct.unpack(">I", self._take(4))[0]
        t = flags & 0xFF
        levels = flags >> 12
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))
        if t == NILVALUE_SXP:
            return None
        if t in _SINGLETONS:
            return RValue(t)
        if t == REFSXP:
            index = (flags >> 8) or self.int()
            return self.refs[index - 1]
        if t in (PERSISTSXP, PACKAGESXP, NAMESPACESXP):
            value = RValue(t, self.string_vec())
            self.refs.append(value)
            return value
        if t == SYMSXP:
            value = RValue(SYMSXP, self.item())  # the CHARSXP's text
            self.refs.append(value)
            return value
        if t == ENVSXP:
            self.int()  # locked
            env = RValue(ENVSXP, {})
            self.refs.append(env)  # before the contents: they may refer back to it
            enclos, frame, hashtab = self.item(), self.item(), self.item()
            env.data = {"enclos": enclos, "frame": frame, "hashtab": hashtab}
            env.attributes = self.attributes()
            return env
        if t in _PAIRLISTS:
            return self._pairlist(t, has_attr, has_tag)
        if t == CHARSXP:
            n = self.int()
            if n == -1:
                return None  # NA_character_
            raw = self._take(n)
            return raw.decode("latin-1") if levels & _LATIN1_MASK else raw.decode("utf-8", errors="replace")
        if t in (SPECIALSXP, BUILTINSXP):
            return RValue(t, self._take(self.int()).decode("ascii", errors="replace"))
        if t == ALTREP_SXP:
            return self._altrep()
        if t in (BCODESXP, EXTPTRSXP, WEAKREFSXP):
            raise ValueError(f"unsupported R object type {t} in serialization")
        value = self._vector(t)
        if has_attr:
            value.attributes = self.attributes()
        return value

    def _vector(self, t: int) -> RValue:
        if t in (LGLSXP, INTSXP):
            n = self.length()
            ints = struct.unpack(f">{n}i", self._take(4 * n))
            return RValue(t, [None if v == _NA_INTEGER else v for v in ints])
        if t == REALSXP:
            n = self.length()
            return RValue(t, list(struct.unpack(f">{n}d", self._take(8 * n))))
        if t == CPLXSXP:
            n = self.length()
            parts = struct.unpack(f">{2 * n}d", self._take(16 * n))
            return RValue(t, [complex(parts[i], parts[i + 1]) for i in range(0, 2 * n, 2)])
        if t in (STRSXP, VECSXP, EXPRSXP):
            return RValue(t, [self.item() for _ in range(self.length())])
        if t == RAWSXP:
            return RValue(t, self._take(self.length()))
        if t == S4SXP:
            return RValue(t)
        raise ValueError(f"unsupported R object type {t} in serialization")

    def _pairlist(self, t: int, has_attr: bool, has_tag: bool) -> RValue:
        # Iterate along the CDR chain instead of recursing: a pairlist may be long.
        head = RValue(LANGSXP if t == ATTRLANGSXP else LISTSXP if t == ATTRLISTSXP else t, [])
        while True:
            attrs = self.attributes() if has_attr or t in (ATTRLISTSXP, ATTRLANGSXP) else {}
            if attrs and not head.attributes:
                head.attributes = attrs
            tag = self.item() if has_tag else None
            head.data.append((tag, self.item()))
            flags = (
                struct.unpack(">I", self.buf[self.pos : self.pos + 4])[0]
                if self.pos + 4 <= len(self.buf)
                else 0
            )
            if flags & 0xFF not in _PAIRLISTS:
                cdr = self.item()
                if cdr is not None:
                    head.data.append((None, cdr))  # a dotted pair's last CDR
                return head
            self.pos += 4
            t = flags & 0xFF
            has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))

    def _altrep(self) -> Any:
        info, state, attrs = self.item(), self.item(), self.item()
        cls = info.data[0][1].data if isinstance(info, RValue) and info.data else "?"
        if cls.startswith("wrap_") and isinstance(state, RValue) and state.data:
            value = state.data[0]  # wrapper around an ordinary vector: state = (x, meta)
            if isinstance(value, tuple):  # the state is a pairlist
                value = value[1]
        elif cls in ("compact_intseq", "compact_realseq") and isinstance(state, RValue):
            n, start, step = (int(v) for v in state.data[:3])
            kind = INTSXP if cls == "compact_intseq" else REALSXP
            value = RValue(kind, [start + i * step for i in range(n)])
        else:
            raise ValueError(f"unsupported ALTREP class {cls!r} in R serialization")
        if attrs is not None:
            value.attributes = {tag.data: v for tag, v in attrs.data}
        return value


def unserialize(buf: bytes) -> Any:
    """Deserialize one R object from its XDR serialization (format 2 or 3).

    Args:
        buf: the bytes, starting with ``X\\n``.

    Returns:
        The object as :class:`RValue` (None for ``NULL``).

    Raises:
        ValueError: not XDR, truncated, or a type the reader does not support.
    """
    reader = _Reader(buf)
    reader.header()
    return reader.item()


def _decompress_any(raw: bytes) -> bytes:
    """Undo whichever compression an RDS file uses (gzip, bzip2, xz, or none)."""
    if raw[:2] == b"\x1f\x8b":
        return gzip.decompress(raw)
    if raw[:3] == b"BZh":
        return bz2.decompress(raw)
    if raw[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(raw)
    return raw


def read_rds(path: str | Path) -> Any:
    """Read an ``.rds`` file (or a lazy-load ``.rdx`` index, which is one).

    Args:
        path: the file.

    Returns:
        The deserialized object.
    """
    raw = _decompress_any(Path(path).read_bytes())
    if raw[:2] != b"X\n" and len(raw) > 4:
        # Some writers use the lazy-load framing here too: 4-byte length + zlib.
        try:
            raw = zlib.decompress(raw[4:])
        except zlib.error:
            pass
    return unserialize(raw)


def _blob(data: bytes, compressed: int) -> bytes:
    """Decode one lazy-load DB entry (framing as in R's ``lazyLoadDBfetch``)."""
    if len(data) < 4 and compressed != 0:
        raise ValueError("truncated lazy-load DB entry")
    if compressed == 0:  # compress=FALSE: the serialization as is
        return data
    out_len = struct.unpack(">I", data[:4])[0]
    if compressed in (2, 3):
        kind, payload = data[4:5], data[5:]
        if kind == b"0":
            out = payload
        elif kind == b"2":
            out = bz2.decompress(payload)
        elif kind == b"Z":
            out = lzma.decompress(payload)
        else:
            out = zlib.decompress(payload)
    else:
        out = zlib.decompress(data[4:])
    if len(out) != out_len:
        raise ValueError(f"lazy-load DB entry: {len(out)} bytes, header says {out_len}")
    return out


def read_lazyload_db(rdb: str | Path, rdx: str | Path | None = None) -> dict[str, Any]:
    """Read every variable of an R lazy-load database.

    Args:
        rdb: the ``.rdb`` file.
        rdx: its index (default: the same name with ``.rdx``).

    Returns:
        ``{name: object}`` in the index's order.

    Raises:
        ValueError: a malformed index or entry.
    """
    rdb = Path(rdb)
    index = read_rds(rdx if rdx is not None else rdb.with_suffix(".rdx"))
    if not isinstance(index, RValue) or index.sexptype != VECSXP:
        raise ValueError(f"{rdb.with_suffix('.rdx').name}: not a lazy-load index")
    fields = dict(zip(index.names() or [], index.data, strict=False))
    variables, compressed = fields.get("variables"), fields.get("compressed")
    if not isinstance(variables, RValue):
        raise ValueError("lazy-load index without 'variables'")
    level = 1
    if isinstance(compressed, RValue) and compressed.data:
        level = int(compressed.data[0] or 0)
    data = rdb.read_bytes()
    out: dict[str, Any] = {}
    for name, where in zip(variables.names() or [], variables.data, strict=True):
        offset, length = (int(v) for v in where.data[:2])
        out[str(name)] = unserialize(_blob(data[offset : offset + length], level))
    return out
