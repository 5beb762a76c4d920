"""Getting the corpus's raw material: Debian packages and PyPI wheels, cached, plus licences.

Debian packages come with ``apt-get download NAME`` (no installation, no root) and are
unpacked with ``dpkg-deb -x``; wheels come with ``pip download --no-deps``. Both land in
the download cache (default ``$SHEAR_CACHE/corpus/downloads``, i.e.
``~/.cache/shear/corpus/downloads``) and are reused from there on later builds, so a
rebuild needs no network. Each download goes to a private temporary folder first and is
moved into the cache whole, so a killed download never leaves a truncated file behind.

Anything that fails raises :class:`SourceUnavailable` with a one-line reason; the builder
records it and goes on with the other sources.
"""

from __future__ import annotations

import email.parser
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import zipfile
from pathlib import Path

from shear.default_model import cache_root

#: Seconds any one subprocess (apt-get, dpkg-deb, pip) may run.
SUBPROCESS_TIMEOUT_S = 300

# One fixed wheel for every machine (gensim's test data is the same in all of its wheels,
# but a fixed file keeps the recorded sha256 the same everywhere too).
WHEEL_PLATFORM_ARGS = (
    "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp",
)  # fmt: skip


class SourceUnavailable(Exception):
    """A corpus source cannot be had (download failed, tool missing, file not in the package)."""


def default_download_dir() -> Path:
    """Return the default download cache: ``<shear cache root>/corpus/downloads``.

    Returns:
        The folder (it may not exist yet).
    """
    return cache_root() / "corpus" / "downloads"


def _run(cmd: list[str], cwd: Path | None = None, label: str | None = None) -> str:
    """Run a command; return its stdout, or raise SourceUnavailable with the reason (``label`` names it)."""
    label = label or " ".join(cmd[:2])
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        raise SourceUnavailable(f"{cmd[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise SourceUnavailable(f"{label} took more than {SUBPROCESS_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        # apt and pip put the useful line last, after warnings.
        errors = [ln for ln in lines if ln.startswith(("E:", "ERROR:"))] or lines
        detail = errors[-1] if errors else f"exit status {proc.returncode}"
        raise SourceUnavailable(f"{label} failed: {detail}")
    return proc.stdout


def sha256_file(path: str | Path) -> str:
    """Return the hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cached(cache_dir: Path, pattern: str) -> Path | None:
    # Several versions may accumulate; sorted order makes the choice the same every time.
    found = sorted(p for p in cache_dir.glob(pattern) if p.is_file())
    return found[-1] if found else None


def download_deb(package: str, cache_dir: str | Path) -> Path:
    """Return the cached ``.deb`` of a Debian package, downloading it with apt-get if needed.

    Args:
        package: the binary package name.
        cache_dir: the download cache.

    Returns:
        The ``.deb`` file in the cache.

    Raises:
        SourceUnavailable: apt-get is missing or failed (unknown package, no network).
    """
    cache_dir = Path(cache_dir)
    hit = _cached(cache_dir, f"{package}_*.deb")
    if hit is not None:
        return hit
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".apt-") as tmp:
        try:
            _run(["apt-get", "download", "-q", package], cwd=Path(tmp))
        except SourceUnavailable as e:
            if "Unable to locate" in str(e) or "404" in str(e):
                raise SourceUnavailable(
                    f"{e} (stale or missing package lists? try: apt-get update)"
                ) from None
            raise
        debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if not debs:
            raise SourceUnavailable(f"apt-get download {package} produced no .deb file")
        final = cache_dir / debs[-1].name
        os.replace(debs[-1], final)
    return final


def download_wheel(requirement: str, cache_dir: str | Path) -> Path:
    """Return the cached wheel for ``NAME==VERSION``, downloading it with pip if needed.

    Args:
        requirement: an exact pin, e.g. ``"gensim==4.4.0"``.
        cache_dir: the download cache.

    Returns:
        The ``.whl`` file in the cache.

    Raises:
        SourceUnavailable: pip failed (no network, no such wheel).
    """
    cache_dir = Path(cache_dir)
    name, _, version = requirement.partition("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    hit = _cached(cache_dir, f"{stem}*.whl")
    if hit is not None:
        return hit
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               *WHEEL_PLATFORM_ARGS, "--disable-pip-version-check", "-q", "-d", tmp, requirement]  # fmt: skip
        _run(cmd, label=f"pip download {requirement}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise SourceUnavailable(f"pip download {requirement} produced no wheel")
        final = cache_dir / wheels[-1].name
        os.replace(wheels[-1], final)
    return final


def extract_deb(deb: str | Path, dest: str | Path) -> None:
    """Unpack a ``.deb``'s files into ``dest`` with ``dpkg-deb -x`` (no installation).

    Args:
        deb: the package file.
        dest: the folder to unpack into (created if needed; several packages may share it).

    Raises:
        SourceUnavailable: dpkg-deb is missing or failed.
    """
    Path(dest).mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(deb), str(dest)])


def deb_version(deb: str | Path) -> str:
    """Return a ``.deb``'s version (``dpkg-deb -f``, else parsed from the file name).

    Args:
        deb: the package file.

    Returns:
        The Debian version string.
    """
    try:
        version = _run(["dpkg-deb", "-f", str(deb), "Version"]).strip()
        if version:
            return version
    except SourceUnavailable:
        pass
    parts = Path(deb).name.split("_")  # NAME_VERSION_ARCH.deb, epoch ':' written as %3a
    return urllib.parse.unquote(parts[1]) if len(parts) >= 3 else "unknown"


def debian_licence(root: str | Path, package: str) -> str:
    """Summarise the licence in ``usr/share/doc/PACKAGE/copyright`` of an unpacked package.

    A machine-readable (DEP-5) file gives the short names of its ``Files:`` paragraphs'
    ``License:`` fields, in order, without repeats. Otherwise the first lines of the file
    are quoted, followed by any ``License:`` lines it has.

    Args:
        root: where the package was unpacked.
        package: its name.

    Returns:
        One line (``"GPL-2+, MIT"`` or ``"see copyright: ..."``).
    """
    path = Path(root) / "usr" / "share" / "doc" / package / "copyright"
    if not path.is_file():
        return "unknown (no copyright file in the package)"
    text = path.read_text(encoding="utf-8", errors="replace")
    paragraphs = [p for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    names: list[str] = []
    if text.lstrip().startswith("Format:"):
        for para in paragraphs:
            fields = {}
            for line in para.split("\n"):
                if line[:1] not in (" ", "\t") and ":" in line:
                    key, _, value = line.partition(":")
                    fields.setdefault(key.strip().lower(), value.strip())
            if "files" in fields and fields.get("license") and fields["license"] not in names:
                names.append(fields["license"])
        if names:
            return ", ".join(names)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    quoted = " ".join(lines[:3])
    if len(quoted) > 240:
        quoted = quoted[:237] + "..."
    for ln in lines:
        value = ln[8:].strip() if ln.lower().startswith("license:") else ""
        # Short names only ("GPL-2"): some free-form files start licence prose with "License:".
        if value and len(value) <= 40 and value.count(" ") <= 4 and value not in names:
            names.append(value)
    return f"see copyright: {quoted}" + (f" [License: {', '.join(names)}]" if names else "")


def wheel_metadata(wheel: str | Path) -> dict[str, str]:
    """Read name, version and licence from a wheel's ``METADATA``.

    Args:
        wheel: the ``.whl`` file.

    Returns:
        ``{"name", "version", "licence"}``; the licence joins License-Expression, License
        (its first line) and the ``License ::`` classifiers.
    """
    with zipfile.ZipFile(wheel) as zf:
        meta_name = next((n for n in zf.namelist() if n.endswith(".dist-info/METADATA")), None)
        if meta_name is None:
            return {"name": "unknown", "version": "unknown", "licence": "unknown"}
        msg = email.parser.Parser().parsestr(zf.read(meta_name).decode("utf-8", errors="replace"))
    parts: list[str] = []
    for value in (msg.get("License-Expression"), msg.get("License")):
        if value and value.strip() and value.strip().upper() != "UNKNOWN":
            first = value.strip().splitlines()[0]
            if first not in parts:
                parts.append(first)
    for classifier in msg.get_all("Classifier") or []:
        if classifier.startswith("License ::"):
            short = classifier.split("::")[-1].strip()
            if short not in parts:
                parts.append(short)
    return {
        "name": msg.get("Name", "unknown"),
        "version": msg.get("Version", "unknown"),
        "licence": ", ".join(parts) or "unknown",
    }


def extract_wheel_members(wheel: str | Path, members: tuple[str, ...], dest: str | Path) -> None:
    """Copy named files out of a wheel into ``dest`` (keeping their paths).

    Args:
        wheel: the ``.whl`` file.
        members: archive paths to extract.
        dest: the folder.

    Raises:
        SourceUnavailable: a member is not in the wheel.
    """
    dest = Path(dest)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for member in members:
            if member not in names:
                raise SourceUnavailable(f"{member} is not in {Path(wheel).name}")
            target = dest / member
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
