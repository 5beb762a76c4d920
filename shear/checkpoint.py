"""Atomic files and folders: write under a temporary name, fsync, rename.

A kill or a full disk during :func:`write_atomic` / :func:`save_atomic` leaves the previous
file intact and no partial one behind; :func:`atomic_dir` does the same for whole folders
(exports, saved models). A kill can leave the temporary names behind (``.NAME.XXXXXXXX.tmp``,
``.NAME.tmp-XXXXXXXX``, ``.NAME.old-XXXXXXXX``): :data:`LEFTOVER` matches exactly those, and
:mod:`shear.runfolder` removes them when a run folder is next opened. Failed writes raise
:class:`~shear.errors.ShearError` saying whether the disk was full and what was kept.
:func:`load` uses ``torch.load(weights_only=True)``, so a checkpoint holds only tensors,
numbers, strings and containers of them.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO

import torch

from shear.errors import ShearError, disk_full, interrupted, load_failure, write_failed

#: Names the temporary files and folders of this module take (tempfile's 8 random characters).
LEFTOVER = re.compile(r"^\..+\.(?:[a-z0-9_]{8}\.tmp|(?:tmp|old)-[a-z0-9_]{8})$")


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


def save_atomic(obj: Any, path: str | os.PathLike, kept: str | None = None) -> Path:
    """Save ``obj`` with ``torch.save`` to ``path`` atomically.

    Args:
        obj: a state dict of tensors, numbers, strings, lists and dicts.
        path: destination file; its folder is created.
        kept: what survives a failed write, for the message (default: says whether a
            previous ``path`` is kept or there was none).

    Returns:
        The path.

    Raises:
        ShearError: the write failed (e.g. the disk is full); the old file is untouched.
    """
    path = Path(path)
    if kept is None:
        kept = "the previous checkpoint is kept" if path.exists() else "there is no previous checkpoint"
    try:
        return write_atomic(path, lambda f: torch.save(obj, f))
    except (OSError, RuntimeError) as e:
        if interrupted(e):  # Ctrl-C: an interrupt, not a failed write (the old file is intact)
            raise KeyboardInterrupt from None
        raise write_failed(f"checkpoint {path}", e, kept) from e


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (reports, plots, small JSON files).

    Raises:
        ShearError: the write failed; an old ``path`` is untouched and nothing partial is left.
    """
    path = Path(path)
    try:
        return write_atomic(path, lambda f: f.write(data))
    except OSError as e:
        kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
        raise write_failed(path, e, kept) from e


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`write_bytes_atomic`)."""
    return write_bytes_atomic(path, text.encode("utf-8"))


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
    """Load a checkpoint written by :func:`save_atomic` (``weights_only=True``).

    Raises:
        ShearError: no such file, or it is damaged (cut short, overwritten) or not a shear
            checkpoint (including a pickle that ``weights_only`` refuses: nothing in it ran).
    """
    path = Path(path)
    if not path.is_file():
        raise ShearError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (zip, pickle and EOF errors of a damaged file: any of them)
        raise ShearError(
            f"checkpoint {path} cannot be read: it is damaged or not a shear checkpoint ({load_failure(e)})"
        ) from e
    if not isinstance(state, dict) or "step" not in state:
        raise ShearError(f"checkpoint {path} is not a shear checkpoint (no step in it)")
    return state


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step of a checkpoint, read without loading its tensors (memory-mapped), or None when
    it cannot be read (:func:`load` then says why)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception:  # noqa: BLE001 (damaged: reported by load)
        return None


def checkpoint_sharded(path: str | os.PathLike) -> bool:
    """Whether a checkpoint keeps its model in sharded files (an FSDP run's), read without
    loading its tensors; False when it cannot be read (:func:`load` then says why)."""
    try:
        return "shards" in torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 (damaged: reported by load)
        return False


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
        # tokenizers and safetensors report a full disk as their own exception types
        if isinstance(e, OSError) or (isinstance(e, Exception) and disk_full(e)):
            kept = "the previous one is kept" if out.exists() else "there was none before"
            raise write_failed(f"{what} to {out}", e, kept + "; nothing partial is left") from e
        raise


def save_model_atomic(
    model: Any, out: str | os.PathLike, tokenizer: Any = None, max_shard_size: int | str | None = None
) -> Path:
    """``save_pretrained`` (safetensors) into a temporary folder beside ``out``, then rename it to ``out``.

    Args:
        model: a Hugging Face model.
        out: destination folder (replaced if it exists).
        tokenizer: saved alongside when given.
        max_shard_size: passed to ``save_pretrained`` when given (else its default).

    Returns:
        The folder.

    Raises:
        ShearError: the write failed; nothing partial is left and an old ``out`` is kept.
    """
    with atomic_dir(out, "the model") as tmp:
        shards = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(tmp, safe_serialization=True, **shards)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)
