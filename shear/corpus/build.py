"""Build the default multi-domain corpus: fetch, extract, cap, write, record provenance.

See the package docstring (:mod:`shear.corpus`) for the layout and the guarantees.
"""

from __future__ import annotations

import datetime
import json
import lzma
import os
import shutil
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from shear.checkpoint import process_alive, replace_dir
from shear.corpus import fetch
from shear.corpus import stdlib as stdlib_mod
from shear.corpus.files import normalise_newlines
from shear.corpus.sources import SOURCES, Doc, Source
from shear.errors import ShearError

#: Bump whenever a change to the code changes the corpus text, so cached corpora rebuild.
RECIPE_VERSION = 1
MANIFEST_JSON = "MANIFEST.json"
MANIFEST_MD = "MANIFEST.md"
_MB = 1_000_000

# Errors that mean "this source's files are not what we expected": the source is recorded
# as unavailable and the build goes on. Anything else is a bug and propagates.
# (xml.etree's ParseError is a SyntaxError; gzip's and bz2's errors are OSErrors.)
_SOURCE_ERRORS = (
    fetch.SourceUnavailable, OSError, ValueError, EOFError, LookupError, SyntaxError,
    zlib.error, lzma.LZMAError, struct.error,
)  # fmt: skip


def select_sources(sources: Sequence[str] | None) -> list[Source]:
    """Resolve source or domain names to sources, in the canonical (registry) order.

    Args:
        sources: source names (``"enwiki"``) or domain names (``"wiki"``: all its
            sources); None for all.

    Returns:
        The selected sources.

    Raises:
        ShearError: an unknown name.
    """
    if sources is None:
        return list(SOURCES)
    wanted = set()
    for name in sources:
        matches = [s.name for s in SOURCES if name in (s.name, s.domain)]
        if not matches:
            valid = sorted({s.name for s in SOURCES} | {s.domain for s in SOURCES})
            raise ShearError(f"unknown corpus source or domain {name!r}; choose from {', '.join(valid)}")
        wanted.update(matches)
    return [s for s in SOURCES if s.name in wanted]


def _recipe(selected: list[Source], max_bytes: int | None, min_bytes: int) -> dict[str, Any]:
    return {
        "recipe_version": RECIPE_VERSION,
        "sources": [s.name for s in selected],
        "max_bytes_per_domain": max_bytes,
        "min_bytes_per_domain": min_bytes,
    }


def _load_cached(out: Path, recipe: dict[str, Any]) -> dict[str, Any] | None:
    path = out / MANIFEST_JSON
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("recipe") != recipe:
        return None
    for name, info in manifest.get("sources", {}).items():
        if info.get("documents") and not (out / info["domain"] / f"{name}.jsonl").is_file():
            return None
    return manifest


def _clean_stale(out: Path) -> None:
    """Remove ``OUT.tmp-<pid>`` / ``OUT.old-<pid>`` folders left by builds that were killed."""
    if not out.parent.is_dir():
        return
    for entry in out.parent.iterdir():
        for tag in (".tmp-", ".old-"):
            prefix = out.name + tag
            if entry.name.startswith(prefix) and entry.name[len(prefix) :].isdigit():
                pid = int(entry.name[len(prefix) :])
                if pid != os.getpid() and not process_alive(pid):
                    shutil.rmtree(entry, ignore_errors=True)


def _fetch(
    source: Source, cache_dir: Path, work: Path, log: Callable[[str], None]
) -> tuple[Path, list[dict[str, Any]], list[dict[str, str]]]:
    """Get a source's files.

    Returns:
        The root to extract from, one record per artifact, and the packages that could
        not be had (a source of several packages goes on with the others).
    """
    if source.kind == "stdlib":
        root = stdlib_mod.stdlib_dir()
        if not root.is_dir():
            raise fetch.SourceUnavailable(f"the standard library folder {root} does not exist")
        version = sys.version.replace("\n", " ")
        artifact = {"package": "python-stdlib", "version": version, "sha256": None, "file": str(root),
                    "licence": "PSF-2.0"}  # fmt: skip
        return root, [artifact], []
    root = work / "root"
    root.mkdir()
    artifacts = []
    if source.kind == "wheel":
        wheel = fetch.download_wheel(source.packages[0], cache_dir)
        fetch.extract_wheel_members(wheel, source.members, root)
        meta = fetch.wheel_metadata(wheel)
        digest = fetch.sha256_file(wheel)
        artifacts.append({"package": meta["name"], "version": meta["version"], "sha256": digest,
                          "file": wheel.name, "licence": meta["licence"]})  # fmt: skip
        return root, artifacts, []
    if source.kind != "deb":
        raise ValueError(f"unknown source kind {source.kind!r}")
    missing: list[dict[str, str]] = []
    for package in source.packages:
        try:
            deb = fetch.download_deb(package, cache_dir)
            fetch.extract_deb(deb, root)
        except fetch.SourceUnavailable as e:
            if len(source.packages) == 1:
                raise
            log(f"  {source.domain}/{source.name}: package {package} unavailable: {e}")
            missing.append({"package": package, "reason": str(e)})
            continue
        version, digest = fetch.deb_version(deb), fetch.sha256_file(deb)
        artifacts.append({"package": package, "version": version, "sha256": digest, "file": deb.name})
    if not artifacts:
        raise fetch.SourceUnavailable("; ".join(f"{m['package']}: {m['reason']}" for m in missing))
    for artifact in artifacts:  # after unpacking all: packages may share folders
        artifact["licence"] = fetch.debian_licence(root, artifact["package"])
    return root, artifacts, missing


def clean_text(text: str) -> str:
    """Text hygiene applied to every document: newlines normalised, BOM and outer blank lines dropped.

    Args:
        text: a document as extracted.

    Returns:
        The cleaned document ("" when nothing but whitespace is left).
    """
    text = normalise_newlines(text).lstrip("\ufeff")
    if not text.strip():
        return ""
    lines = text.split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    return "\n".join(lines).rstrip()


def _source_record(source: Source, artifacts: list[dict[str, Any]]) -> dict[str, Any]:
    single = len(artifacts) == 1
    licences = [a["licence"] for a in artifacts]
    if single:
        licence = licences[0]
    else:
        licence = "; ".join(f"{a['package']}: {a['licence']}" for a in artifacts)
    if source.licence_note:
        licence = f"{licence}; {source.licence_note}"
    return {
        "domain": source.domain,
        "kind": source.kind,
        "description": source.description,
        "package": ", ".join(a["package"] for a in artifacts),
        "version": artifacts[0]["version"]
        if single
        else ", ".join(f"{a['package']} {a['version']}" for a in artifacts),
        "sha256": artifacts[0]["sha256"] if single else None,
        "licence": licence,
        "artifacts": artifacts,
    }


def _write_source(docs: Iterator[Doc], path: Path, budget: int | None) -> tuple[int, int, list[str], bool]:
    """Write documents to ``path`` until the next one would pass ``budget`` bytes.

    Returns:
        ``(bytes, documents, origin files used, budget reached)``.
    """
    size = count = 0
    files: list[str] = []
    full = False
    f = None
    try:
        for text, origin in docs:
            text = clean_text(text)
            if not text:
                continue
            n = len(text.encode("utf-8"))
            if budget is not None and size + n > budget:
                full = True  # document boundaries: the domain stops before this one
                break
            if f is None:
                path.parent.mkdir(parents=True, exist_ok=True)
                f = open(path, "w", encoding="utf-8", newline="\n")
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            size += n
            count += 1
            if origin not in files:
                files.append(origin)
    finally:
        if f is not None:
            f.close()
    return size, count, files, full


def _check_replaceable(out: Path) -> None:
    # Never delete a folder that is not a corpus we built: a typo in --out must not cost data.
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_JSON).is_file():
        raise ShearError(
            f"{out} exists and is not a shear corpus (no {MANIFEST_JSON}); choose another --out or remove it"
        )
    if out.exists() and not out.is_dir():
        raise ShearError(f"{out} exists and is not a folder")


def build_default_corpus(
    out: str | Path,
    *,
    cache_dir: str | Path | None = None,
    max_bytes_per_domain: int | None = 4_000_000,
    min_bytes_per_domain: int = 2_000_000,
    sources: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Build (or reuse) the default multi-domain corpus at ``out``.

    Each domain shares ``max_bytes_per_domain`` (UTF-8 bytes) among its sources: a source
    gets an equal share of what its domain has left and takes its documents in order until
    the next one would pass that share (a short source leaves the rest to the next). A
    source that cannot be had is logged and listed under ``unavailable``; a domain below
    ``min_bytes_per_domain`` gets a warning.

    Args:
        out: the corpus folder (``out/<domain>/<source>.jsonl`` + ``MANIFEST.json`` / ``.md``).
        cache_dir: download cache (default ``$SHEAR_CACHE/corpus/downloads`` or
            ``~/.cache/shear/corpus/downloads``).
        max_bytes_per_domain: cap per domain; None for no cap.
        min_bytes_per_domain: domains below this get a warning (not an error).
        sources: source or domain names to use (default: all; see :data:`SOURCES`).
        log: where progress lines go.

    Returns:
        The manifest (as written to ``MANIFEST.json``), plus ``"path"``: the folder.

    Raises:
        ShearError: bad arguments, fewer than two domains with text, or ``out`` is an
            existing folder that is not a shear corpus.
    """
    if max_bytes_per_domain is not None and max_bytes_per_domain <= 0:
        raise ShearError(f"max_bytes_per_domain must be positive or None, got {max_bytes_per_domain}")
    if min_bytes_per_domain < 0:
        raise ShearError(f"min_bytes_per_domain must be >= 0, got {min_bytes_per_domain}")
    out = Path(out).expanduser()
    selected = select_sources(sources)
    recipe = _recipe(selected, max_bytes_per_domain, min_bytes_per_domain)
    cached = _load_cached(out, recipe)
    if cached is not None:
        log(f"default corpus: cached at {out} (same recipe); not rebuilding")
        return {**cached, "path": str(out)}
    _check_replaceable(out)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else fetch.default_download_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    cap = "no cap" if max_bytes_per_domain is None else f"cap {max_bytes_per_domain / _MB:.2f} MB per domain"
    log(f"default corpus: building {out} from {len(selected)} sources ({cap}); downloads cached in {cache}")
    start = time.monotonic()
    try:
        manifest = _build_into(tmp, selected, cache, recipe, max_bytes_per_domain, min_bytes_per_domain, log)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"default corpus: done in {time.monotonic() - start:.0f} s")
    return {**manifest, "path": str(out)}


def _build_into(
    tmp: Path,
    selected: list[Source],
    cache: Path,
    recipe: dict[str, Any],
    max_bytes: int | None,
    min_bytes: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    domains: dict[str, dict[str, Any]] = {}
    records: dict[str, dict[str, Any]] = {}
    unavailable: list[dict[str, str]] = []
    for i, source in enumerate(selected):
        dom = domains.setdefault(source.domain, {"bytes": 0, "documents": 0, "sources": []})
        # each source gets an equal share of what is left of its domain's cap, so a domain
        # mixes its sources (and a short source leaves its unused share to the next ones)
        sharing = sum(1 for s in selected[i:] if s.domain == source.domain)
        path = tmp / source.domain / f"{source.name}.jsonl"
        budget = None if max_bytes is None else (max_bytes - dom["bytes"]) // sharing
        try:
            with tempfile.TemporaryDirectory(prefix="shear-corpus-") as work:
                root, artifacts, missing = _fetch(source, cache, Path(work), log)
                size, count, files, reached = _write_source(source.extract(root), path, budget)
        except _SOURCE_ERRORS as e:
            path.unlink(missing_ok=True)
            reason = str(e) if isinstance(e, fetch.SourceUnavailable) else f"{type(e).__name__}: {e}"
            log(f"  {source.domain}/{source.name}: UNAVAILABLE: {reason}")
            unavailable.append({"source": source.name, "domain": source.domain, "reason": reason})
            continue
        if count == 0 and not reached:
            reason = "no text found in the package"
            log(f"  {source.domain}/{source.name}: UNAVAILABLE: {reason}")
            unavailable.append({"source": source.name, "domain": source.domain, "reason": reason})
            continue
        record = _source_record(source, artifacts)
        record.update(bytes=size, documents=count, files=files, missing_packages=missing)
        records[source.name] = record
        dom["bytes"] += size
        dom["documents"] += count
        if count:
            dom["sources"].append(source.name)
        what = f"{artifacts[0]['package']} {artifacts[0]['version'].split(' ')[0]}"
        if len(artifacts) > 1:
            what = f"{len(artifacts)} packages"
        log(f"  {source.domain}/{source.name}: {count} documents, {size / _MB:.2f} MB ({what})")
    domains = {name: d for name, d in domains.items() if d["documents"]}
    if len(domains) < 2:
        reasons = "; ".join(f"{u['source']}: {u['reason']}" for u in unavailable) or "no text"
        raise ShearError(
            f"the default corpus needs at least 2 domains with text, got {len(domains)} "
            f"({', '.join(domains) or 'none'}); unavailable sources: {reasons}"
        )
    warnings = []
    for name, d in domains.items():
        d["below_minimum"] = d["bytes"] < min_bytes
        if d["below_minimum"]:
            msg = f"domain {name!r} has {_mb(d['bytes'])} MB, below the minimum of {_mb(min_bytes)} MB"
            warnings.append(msg)
            log(f"  WARNING: {msg}")
    manifest = {
        "recipe": recipe,
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "layout": '<domain>/<source>.jsonl, one {"text": document} per line',
        "total_bytes": sum(d["bytes"] for d in domains.values()),
        "domains": domains,
        "sources": records,
        "unavailable": unavailable,
        "warnings": warnings,
    }
    (tmp / MANIFEST_JSON).write_text(
        json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (tmp / MANIFEST_MD).write_text(manifest_markdown(manifest), encoding="utf-8")
    return manifest


def _mb(n: int) -> str:
    return f"{n / _MB:.2f}"


def format_manifest(manifest: dict) -> str:
    """Summarise a corpus manifest for a terminal: domains, sources, gaps, warnings.

    Args:
        manifest: as returned by :func:`build_default_corpus` (or read from ``MANIFEST.json``).

    Returns:
        A few lines of text.
    """
    recipe = manifest.get("recipe", {})
    cap = recipe.get("max_bytes_per_domain")
    cap_text = "no cap" if cap is None else f"{_mb(cap)} MB cap"
    where = f" at {manifest['path']}" if manifest.get("path") else ""
    lines = [
        f"default corpus{where}: {len(manifest.get('domains', {}))} domains, "
        f"{_mb(manifest.get('total_bytes', 0))} MB "
        f"(recipe v{recipe.get('recipe_version')}, {cap_text} per domain)"
    ]
    sources = manifest.get("sources", {})
    for name, d in manifest.get("domains", {}).items():
        parts = [f"{s} {_mb(sources[s]['bytes'])} MB" for s in d.get("sources", []) if s in sources]
        flag = "  (below minimum)" if d.get("below_minimum") else ""
        lines.append(
            f"  {name:<6} {_mb(d['bytes']):>6} MB {d['documents']:>6} docs  {', '.join(parts)}{flag}"
        )
    for u in manifest.get("unavailable", []):
        lines.append(f"  unavailable: {u['domain']}/{u['source']}: {u['reason']}")
    for w in manifest.get("warnings", []):
        lines.append(f"  warning: {w}")
    return "\n".join(lines)


def manifest_markdown(manifest: dict) -> str:
    """Render the manifest as ``MANIFEST.md``: what is in the corpus, from where, under which licence.

    The build date is left out, so the file is identical for identical inputs.

    Args:
        manifest: the manifest dict.

    Returns:
        Markdown text.
    """
    recipe = manifest["recipe"]
    cap = recipe["max_bytes_per_domain"]
    out = [
        "# shear default corpus",
        "",
        f"Built by `shear data default` (recipe version {recipe['recipe_version']}): "
        f"{'no cap' if cap is None else _mb(cap) + ' MB cap'} per domain, "
        f"minimum {_mb(recipe['min_bytes_per_domain'])} MB; sources, in order: "
        f"{', '.join(recipe['sources'])}.",
        'Layout: `<domain>/<source>.jsonl`, one `{"text": document}` per line. Text sizes are UTF-8 bytes '
        "(1 MB = 10^6 bytes).",
        "",
        "## Domains",
        "",
        "| domain | MB | documents | sources |",
        "|---|---:|---:|---|",
    ]
    for name, d in manifest["domains"].items():
        flag = " (below minimum)" if d["below_minimum"] else ""
        out.append(f"| {name} | {_mb(d['bytes'])}{flag} | {d['documents']} | {', '.join(d['sources'])} |")
    out += ["", "## Sources", "", "| source | domain | kind | package | version | MB | documents | licence |",
            "|---|---|---|---|---|---:|---:|---|"]  # fmt: skip
    for name, s in manifest["sources"].items():
        out.append(
            f"| {name} | {s['domain']} | {s['kind']} | {s['package']} | {s['version']} | {_mb(s['bytes'])} "
            f"| {s['documents']} | {s['licence']} |"
        )
    out += ["", "## Provenance", ""]
    for name, s in manifest["sources"].items():
        out.append(f"- **{name}**: {s['description']}.")
        for a in s["artifacts"]:
            digest = f", sha256 `{a['sha256']}`" if a["sha256"] else ""
            out.append(f"  - `{a['file']}` ({a['package']} {a['version']}{digest}); licence: {a['licence']}")
        for m in s.get("missing_packages", []):
            out.append(f"  - not available: {m['package']} ({m['reason']})")
        out.append(f"  - files used: {len(s['files'])}")
    if manifest["unavailable"]:
        out += ["", "## Unavailable sources", ""]
        out += [f"- {u['domain']}/{u['source']}: {u['reason']}" for u in manifest["unavailable"]]
    if manifest["warnings"]:
        out += ["", "## Warnings", ""]
        out += [f"- {w}" for w in manifest["warnings"]]
    return "\n".join(out) + "\n"
