"""The one exception type shear raises for bad input or a missing resource, and how write
failures (a full disk above all) are put into words."""

from __future__ import annotations

import errno

# errno values that mean "no room": a full file system or an exhausted quota
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# how libraries that do their own I/O (safetensors, tokenizers: Rust) report ENOSPC
_NO_SPACE_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


class ShearError(Exception):
    """A user-facing error: bad input, an unsupported model, a missing resource.

    The CLI prints its message and exits with status 2, without a traceback.
    """


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions it was raised from or during (``__cause__``, ``__context__``)."""
    seen: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and all(e is not s for s in seen):
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def interrupted(error: BaseException) -> bool:
    """Whether ``error`` wraps a Ctrl-C: torch.save turns a ``KeyboardInterrupt`` raised
    while it writes into ``RuntimeError: ... unexpected pos``, the interrupt in its context."""
    return any(isinstance(e, KeyboardInterrupt) for e in _chain(error))


def load_failure(error: BaseException) -> str:
    """A short reason why a torch / safetensors load failed: its type and first line, or for
    a pickle that ``weights_only`` refused, that it was refused unread (torch's own advice to
    load it with ``weights_only=False`` is not passed on: that would run its code)."""
    import pickle

    if isinstance(error, pickle.UnpicklingError) and "weights only" in str(error).lower().replace("_", " "):
        return "it holds Python objects besides tensors and numbers; refused unread, nothing in it ran"
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first[:200]}"


def clip(text: str, limit: int = 2000) -> str:
    """``text``, its middle left out when it is longer than ``limit`` characters (an input
    echoed back, such as a 100 KB file name, is not printed whole)."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}...({len(text) - 2 * half} characters left out)...{text[-half:]}"


def disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or one it came from) says the disk or the quota is full.

    torch.save reports a full disk as ``RuntimeError: ... unexpected pos``, with the
    ``OSError`` only in its context; safetensors and tokenizers put it in their message.
    """
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return True
        if any(t in str(e) for t in _NO_SPACE_TEXT):
            return True
    return False


def describe_write_error(error: BaseException) -> str:
    """A short reason for a failed write: ``the disk is full (...)`` or the error's own text."""
    os_error = next((e for e in _chain(error) if isinstance(e, OSError)), None)
    detail = (os_error.strerror or str(os_error)) if os_error is not None else str(error)
    if disk_full(error):
        return f"the disk is full ({detail or 'No space left on device'})"
    return f"{type(error).__name__}: {detail}" if os_error is None else str(os_error)


def write_failed(path: object, error: BaseException, kept: str) -> ShearError:
    """The error for a write of ``path`` that failed with ``error``, saying what was kept.

    Args:
        path: the file or folder that was being written.
        error: what the write raised.
        kept: what survived, e.g. ``"the checkpoint of step 40 is kept"``.

    Returns:
        A :class:`ShearError` to raise ``from error``.
    """
    return ShearError(f"writing {path} failed: {describe_write_error(error)}; {kept}")
