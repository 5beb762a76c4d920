"""Test data: a small multi-domain corpus from text already on the machine, no download.

Three domains every Debian + CPython machine has:

* ``code``: the running Python's standard library ``.py`` files (tests excluded);
* ``licenses``: ``/usr/share/common-licenses`` and CPython's LICENSE;
* ``changelogs``: Debian package changelogs under ``/usr/share/doc`` (gzip).

Files are taken in sorted order up to a byte budget per domain, so the corpus is
reproducible on one machine. A domain whose source is missing is skipped with a note; at
least two domains are required.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from shear.errors import ShearError


def _stdlib_code() -> Iterator[Path]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    for p in sorted(lib.rglob("*.py")):
        rel = p.relative_to(lib).parts
        if rel[0] in ("site-packages", "dist-packages") or any("test" in part for part in rel):
            continue
        yield p


def _licenses() -> Iterator[Path]:
    yield from sorted(p for p in Path("/usr/share/common-licenses").glob("*") if p.is_file())
    lib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("LICENSE.txt", "LICENSE"):
        if (lib / name).is_file():
            yield lib / name


def _changelogs() -> Iterator[Path]:
    yield from sorted(Path("/usr/share/doc").glob("*/changelog*.gz"))


SOURCES = {"code": _stdlib_code, "licenses": _licenses, "changelogs": _changelogs}


def _read(p: Path) -> str:
    data = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
    return data.decode("utf-8", errors="replace")


def build_machine_corpus(out: str | os.PathLike, max_bytes_per_domain: int = 400_000) -> Path:
    """Write the corpus as one ``<domain>.jsonl`` file per domain (one document a line).

    Args:
        out: destination folder (reused if it already holds the same corpus).
        max_bytes_per_domain: text budget per domain.

    Returns:
        The folder.
    """
    out = Path(out)
    manifest = out / "MANIFEST.json"
    if manifest.is_file():
        info = json.loads(manifest.read_text())
        if info.get("max_bytes_per_domain") == max_bytes_per_domain and all(
            (out / f"{d}.jsonl").is_file() for d in info.get("domains", {})
        ):
            return out
    out.mkdir(parents=True, exist_ok=True)
    domains = {}
    for name, files in SOURCES.items():
        docs, size = [], 0
        for p in files():
            try:
                text = _read(p)
            except (OSError, EOFError, gzip.BadGzipFile):
                continue
            if not text.strip():
                continue
            text = text[: max_bytes_per_domain - size]
            docs.append(text)
            size += len(text)
            if size >= max_bytes_per_domain:
                break
        if size < 10_000:
            print(f"shear: skipping domain {name!r}: its source is not on this machine", file=sys.stderr)
            continue
        tmp = out / f".{name}.jsonl.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
        os.replace(tmp, out / f"{name}.jsonl")
        domains[name] = {"documents": len(docs), "characters": size}
    if len(domains) < 2:
        raise ShearError("fewer than two text domains found on this machine; pass --data with your own")
    manifest.write_text(
        json.dumps({"max_bytes_per_domain": max_bytes_per_domain, "domains": domains}, indent=2) + "\n"
    )
    return out
