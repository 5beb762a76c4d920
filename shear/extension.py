"""Build and load the C++ gather extension (``csrc/gather.cpp``) used by the export.

Where the module comes from, in order:

1. ``shear._gather``, compiled by ``setup.py`` at install time (``pip install
   --no-build-isolation -e .``) when a C++ compiler was there. It is used only if it was
   built from the current ``csrc/gather.cpp`` and imports against the installed torch.
2. A just-in-time build in the shear cache, ``$SHEAR_CACHE`` or ``~/.cache/shear``, under
   ``extensions/gather-torch<version>-py<version>-<source hash>``: compiled with ninja
   through ``torch.utils.cpp_extension.load`` on first use (about 30 s on 2 cores), then
   loaded from there at once. Importing a shared library runs its code, so a library in the
   cache is imported only if shear built it: each build writes ``shear_gather.build.json``
   beside it (the SHA-256 of the sources, flags, torch and Python it was built with, and of
   the library file itself), checked before every import; a library without a matching
   record is deleted with its build folder and built again. A cache folder that another
   user owns or that others may write to is refused (they could swap the library after the
   check).

Nothing here falls back silently: :func:`load_extension` raises :class:`ShearError` with
the reason and what to do, and :func:`extension_status` reports the state without building.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import stat
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from shear.errors import ShearError

#: Module name of the setup.py build (``TORCH_EXTENSION_NAME`` is its last component).
PREBUILT_MODULE = "shear._gather"
#: Module name of the just-in-time build.
JIT_NAME = "shear_gather"
SOURCE_NAME = "gather.cpp"
#: The record a JIT build writes beside its library (see the module docstring).
BUILD_RECORD = f"{JIT_NAME}.build.json"
#: Flags of both builds (the JIT build adds the source hash itself).
# -ffp-contract=off: the fp16 rounding relies on a separate multiply and add (no FMA).
CXX_FLAGS = ["-O3", "-ffp-contract=off"]

_loaded: ModuleType | None = None
_origin: str | None = None


@dataclass(frozen=True)
class ExtensionStatus:
    """What :func:`extension_status` found.

    Attributes:
        available: the module can be imported now, without compiling.
        origin: ``"setup.py build"``, ``"JIT cache"`` or ``None``.
        path: file of the module, if available.
        reason: why it is not available (or why the prebuilt module was passed over).
        can_build: a compiler and ninja are present, so a first use would build it.
        compiler: the C++ compiler command (``$CXX`` or ``c++``) and where it resolves.
        ninja: path of the ninja binary, or None.
        source: path of ``csrc/gather.cpp``, or None when the sources are not installed.
        cache_dir: where a JIT build goes.
    """

    available: bool
    origin: str | None
    path: str | None
    reason: str | None
    can_build: bool
    compiler: str
    ninja: str | None
    source: str | None
    cache_dir: str

    def as_dict(self) -> dict[str, Any]:
        """The status as a JSON-ready dict."""
        return asdict(self)


def source_path() -> Path | None:
    """``csrc/gather.cpp``: installed with the package (``shear/csrc/``, a wheel) or beside it
    (an editable install or a source tree)."""
    here = Path(__file__).resolve().parent
    for path in (here / "csrc" / SOURCE_NAME, here.parent / "csrc" / SOURCE_NAME):
        if path.is_file():
            return path
    return None


def source_hash(path: Path | None = None) -> str | None:
    """First 16 hex digits of the SHA-256 of the C++ source, prefixed with ``h``."""
    path = path or source_path()
    if path is None:
        return None
    return "h" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def jit_cache_dir() -> Path:
    """Build folder of the JIT extension, keyed by torch, Python and source versions."""
    import torch

    from shear.default_model import cache_root

    py = f"{sys.version_info.major}{sys.version_info.minor}"
    tag = source_hash() or "nosource"
    return cache_root() / "extensions" / f"gather-torch{torch.__version__}-py{py}-{tag}"


def build_key(src: Path) -> str:
    """SHA-256 of what a JIT build depends on: the source, the flags, torch and Python."""
    import torch

    h = hashlib.sha256(src.read_bytes())
    h.update(json.dumps([CXX_FLAGS, torch.__version__, sys.version]).encode())
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _unsafe_folder(cache: Path) -> str | None:
    """Why the cache folders from ``cache`` up to the shear cache root could be written by
    someone else (another owner, write permission for others or another group), or None."""
    from shear.default_model import cache_root

    root = cache_root().resolve()
    folder = cache.resolve()
    while True:
        st = folder.stat() if folder.exists() else None
        # others may write; so may a group other than the user's own (a umask of 002 gives the
        # user's private group write access); a sticky folder (/tmp) lets no one else rename or
        # delete what is ours inside it
        writers = stat.S_IWOTH | (stat.S_IWGRP if st and st.st_gid != os.getgid() else 0)
        shared = st and st.st_mode & writers and not st.st_mode & stat.S_ISVTX
        if st and (st.st_uid != os.getuid() or shared):
            return (
                f"the extension cache folder {folder} can be written by other users (owner uid "
                f"{st.st_uid}, mode {stat.filemode(st.st_mode)}): a library there could be replaced "
                f"after it is checked; `chmod go-w {folder}` or set SHEAR_CACHE to a folder only you "
                "can write"
            )
        if folder == root or folder.parent == folder:
            return None
        folder = folder.parent


def _verified_jit(cache: Path, src: Path) -> tuple[Path | None, str]:
    """The cached JIT library if this shear built it from ``src`` as it is now (its build
    record matches the sources, flags and the library's bytes), else None and why not."""
    lib = cache / f"{JIT_NAME}.so"
    if not lib.is_file():
        return None, "not built in the cache"
    try:
        record = json.loads((cache / BUILD_RECORD).read_text())
    except (OSError, ValueError):
        return None, f"{lib} has no build record of shear's (not built by shear)"
    if not isinstance(record, dict) or record.get("key") != build_key(src):
        return None, f"{lib} was built from other sources or flags"
    if record.get("sha256") != _file_sha256(lib):
        return None, f"{lib} was changed after shear built it"
    return lib, ""


def _compiler() -> tuple[str, str | None]:
    cxx = os.environ.get("CXX", "c++")
    return cxx, shutil.which(cxx)


def _ninja() -> str | None:
    from torch.utils.cpp_extension import is_ninja_available

    return shutil.which("ninja") if is_ninja_available() else None


def _import_prebuilt() -> tuple[ModuleType | None, str | None]:
    """The setup.py build, or None and why it is not usable."""
    try:
        spec = importlib.util.find_spec(PREBUILT_MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return None, "not built by setup.py"
    try:
        module = importlib.import_module(PREBUILT_MODULE)
    except ImportError as e:  # built against another torch or Python
        return None, f"the setup.py build does not import ({e}); rebuild it"
    want = source_hash()
    if want is not None and getattr(module, "SOURCE_HASH", None) != want:
        return None, f"the setup.py build is older than {source_path()}"
    return module, None


def _import_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(JIT_NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension_status() -> ExtensionStatus:
    """Report whether the extension is built, where, and whether it could be; builds nothing.

    Returns:
        An :class:`ExtensionStatus`.
    """
    cxx, cxx_path = _compiler()
    ninja = _ninja()
    src = source_path()
    cache = jit_cache_dir()
    compiler = f"{cxx} ({cxx_path})" if cxx_path else f"{cxx} (not found)"
    can_build = bool(cxx_path and ninja and src)
    common = dict(can_build=can_build, compiler=compiler, ninja=ninja, source=str(src) if src else None)
    if _loaded is not None:
        return ExtensionStatus(True, _origin, _loaded.__file__, None, cache_dir=str(cache), **common)
    module, why = _import_prebuilt()
    if module is not None:
        return ExtensionStatus(True, "setup.py build", module.__file__, None, cache_dir=str(cache), **common)
    reason = why
    if src is not None:
        unsafe = _unsafe_folder(cache)
        jit, not_jit = _verified_jit(cache, src) if unsafe is None else (None, unsafe)
        if jit is not None:
            return ExtensionStatus(True, "JIT cache", str(jit), why, cache_dir=str(cache), **common)
        reason = f"{why}; {not_jit}"
    if not can_build:
        reason = f"{reason}; {_cannot_build_reason(cxx, cxx_path, ninja, src)}"
    return ExtensionStatus(False, None, None, reason, cache_dir=str(cache), **common)


def _cannot_build_reason(cxx: str, cxx_path: str | None, ninja: str | None, src: Path | None) -> str:
    if src is None:
        return (
            "the C++ sources (csrc/gather.cpp) are not installed; reinstall shear (its wheel "
            "carries them as shear/csrc/) or install from a source checkout"
        )
    if cxx_path is None:
        return (
            f"no C++ compiler found (looked for `{cxx}`; install g++, e.g. `apt-get install g++`, "
            "or set CXX to a compiler)"
        )
    if ninja is None:
        return "ninja is not on PATH (`pip install ninja`, and put that environment's bin/ on PATH)"
    return ""


def _match_torch(module: ModuleType) -> ModuleType:
    """Make the module write the bf16 NaN bits torch writes on this machine (its float32 ->
    bf16 conversion gives one NaN pattern whatever the input NaN, but which one depends on
    the CPU path it takes)."""
    import torch

    nans = torch.tensor([float("nan"), -float("nan")] * 40).view(torch.int32)
    nans[1::2] |= 0x1234  # payloads too
    bits = nans.view(torch.float32).to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    module.set_bf16_nan(int(bits[0]) if bool((bits == bits[0]).all()) else -1)
    return module


def load_extension(build: bool = True, verbose: bool = False) -> ModuleType:
    """Import the C++ gather extension, compiling it into the cache on first use.

    Args:
        build: compile it when no usable build exists (otherwise raise).
        verbose: show the compiler's output.

    Returns:
        The extension module (functions ``gather_into`` and ``gather_to_files``).

    Raises:
        ShearError: it is not built and cannot be (no compiler, no ninja, no sources, a
            failed compilation), or the cache folder can be written by other users; the
            message says what to do.
    """
    global _loaded, _origin
    if _loaded is not None:
        return _loaded
    module, why = _import_prebuilt()
    if module is not None:
        _loaded, _origin = _match_torch(module), "setup.py build"
        return _loaded
    src = source_path()
    cache = jit_cache_dir()
    if src is not None:
        unsafe = _unsafe_folder(cache)
        if unsafe is not None:
            raise ShearError(f"the C++ gather extension is not loaded from the cache: {unsafe}")
        jit, not_jit = _verified_jit(cache, src)
        if jit is not None:
            try:
                _loaded, _origin = _match_torch(_import_file(jit)), "JIT cache"
                return _loaded
            except ImportError as e:  # shear's own build, but it does not import: build it again
                not_jit = f"{jit} does not import ({e})"
        if cache.exists():  # not shear's build (or a stale one): none of it is used
            print(f"shear: rebuilding the C++ gather extension: {not_jit}", file=sys.stderr, flush=True)
            shutil.rmtree(cache)
    cxx, cxx_path = _compiler()
    ninja = _ninja()
    if src is None or cxx_path is None or ninja is None:
        raise ShearError(
            f"the C++ gather extension is not available: {why}, and it cannot be built: "
            f"{_cannot_build_reason(cxx, cxx_path, ninja, src)}. Meanwhile export with backend='torch'."
        )
    if not build:
        raise ShearError(f"the C++ gather extension is not built ({why}); `shear doctor --build` builds it")
    _loaded, _origin = _match_torch(_build(src, cache, verbose)), "JIT build"
    return _loaded


def _build(src: Path, cache: Path, verbose: bool) -> ModuleType:
    from torch.utils.cpp_extension import load

    print(
        f"shear: compiling the C++ gather extension into {cache} (first use, about 30 s)",
        file=sys.stderr,
        flush=True,
    )
    t0 = time.perf_counter()
    try:
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        module = load(
            JIT_NAME,
            [str(src)],
            extra_cflags=[*CXX_FLAGS, f"-DSHEAR_GATHER_SOURCE_HASH={source_hash(src)}"],
            build_directory=str(cache),
            verbose=verbose,
        )
    except (OSError, RuntimeError, ImportError, SystemExit) as e:
        tail = "\n".join(str(e).strip().splitlines()[-15:])
        raise ShearError(
            f"compiling the C++ gather extension failed ({type(e).__name__}):\n{tail}\n"
            f"Run `shear doctor --build --verbose` for the full output, or export with backend='torch'."
        ) from e
    from shear.checkpoint import write_text_atomic

    lib = cache / f"{JIT_NAME}.so"
    record = {"key": build_key(src), "sha256": _file_sha256(lib)}
    write_text_atomic(cache / BUILD_RECORD, json.dumps(record, indent=2) + "\n")
    print(f"shear: compiled the C++ gather extension in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return module
