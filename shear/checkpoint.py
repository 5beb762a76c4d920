"""Atomic checkpoint files: write to a temporary name, fsync, rename.

A kill or a full disk during :func:`save_atomic` leaves the previous checkpoint intact and
no partial file behind. :func:`load` uses ``torch.load(weights_only=True)``, so a
checkpoint holds only tensors, numbers, strings and containers of them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from shear.errors import ShearError


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError | RuntimeError):
            raise ShearError(f"writing checkpoint {path} failed ({e}); the previous one is kept") from e
        raise
    return path


def load(path: str | os.PathLike) -> Any:
    """Load a checkpoint written by :func:`save_atomic` (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise ShearError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)
