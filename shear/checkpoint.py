"""Atomic files and folders: write under a temporary name, fsync, rename.

A kill or a full disk during :func:`write_atomic` / :func:`save_atomic` leaves the previous
file intact and no partial one behind; :func:`atomic_dir` does the same for whole folders
(exports, saved models). :func:`load` uses ``torch.load(weights_only=True)``, so a
checkpoint holds only tensors, numbers, strings and containers of them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO

import torch

from shear.errors import ShearError


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Write a file through ``write(f)`` under a temporary name beside ``path``, fsync, rename.

    Args:
        path: destination file; its folder is created.
        write: fills the open binary file.

    Returns:
        The path.

    Raises:
        Whatever ``write`` or the file system raised; the temporary file is gone and an
        old ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """Save ``obj`` with ``torch.save`` to ``path`` atomically.

    Args:
        obj: a state dict of tensors, numbers, strings, lists and dicts.
        path: destination file; its folder is created.

    Returns:
        The path.

    Raises:
        ShearError: the write failed (e.g. the disk is full); the old file is untouched.
    """
    try:
        return write_atomic(path, lambda f: torch.save(obj, f))
    except (OSError, RuntimeError) as e:
        raise ShearError(f"writing checkpoint {path} failed ({e}); the previous one is kept") from e


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (a staging folder's owner, say)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, it is not ours
    except OSError:
        return False
    return True


def load(path: str | os.PathLike) -> Any:
    """Load a checkpoint written by :func:`save_atomic` (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise ShearError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out``; an existing ``out`` is swapped out, then deleted."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(out: str | os.PathLike, what: str = "the folder") -> Iterator[Path]:
    """A temporary folder beside ``out`` to fill; on success it replaces ``out``, on failure it goes.

    Args:
        out: the destination folder (an existing one is kept until the new one is complete).
        what: named in error messages ("the export", "the model").

    Yields:
        The temporary folder.

    Raises:
        ShearError: the folder could not be created or written (an ``OSError`` inside).
    """
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise ShearError(f"cannot write {what} to {out.parent}: {e}") from e
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise ShearError(f"writing {what} to {out} failed: {e}") from e
        raise


def save_model_atomic(model: Any, out: str | os.PathLike, tokenizer: Any = None) -> Path:
    """``save_pretrained`` (safetensors) into a temporary folder beside ``out``, then rename it to ``out``.

    Args:
        model: a Hugging Face model.
        out: destination folder (replaced if it exists).
        tokenizer: saved alongside when given.

    Returns:
        The folder.

    Raises:
        ShearError: the write failed; nothing partial is left and an old ``out`` is kept.
    """
    with atomic_dir(out, "the model") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)
