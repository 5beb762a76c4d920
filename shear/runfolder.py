"""A run folder (the ``--out`` of ``shear prune`` and ``shear train``): where it may be, its
lock, its recorded options, its log and the leftovers of killed writes.

* **Where.** A run never writes into its inputs: :func:`check_output_folder` refuses an
  ``--out`` equal to, inside or containing the model, data (or any other input) folder,
  before anything is written.
* **Lock.** :class:`RunLock` takes ``RUN_DIR/.lock`` with ``fcntl.flock`` and writes its pid
  and host into it. A second process that opens the same folder fails at once, naming the
  holder. The kernel drops the lock when its process dies, so a killed run never leaves a
  folder locked; the pid it left in the file tells the next owner that it was killed. Locks
  taken inside a function decorated with :func:`hold_run_lock` are released when it
  returns or raises.
* **Options.** ``config.json`` holds the run's options and a ``shear_run`` entry (the task,
  the working directory relative paths refer to, the shear version). A resume reads them
  back (:func:`recorded_options`) and refuses options that cannot change within a run
  (:func:`changed_options`).
* **Log.** :class:`RunLog` appends one JSON record per line, each written whole (one
  ``write``, the file cut back to its old size if that fails) and fsynced. A kill can still
  cut the last line short: reading drops a last line that does not parse.
* **Leftovers.** :func:`clean_leftovers` removes the temporary files and folders of writes
  a kill interrupted (``.checkpoint.pt.*.tmp``, ``.export.tmp-*``, ``.model.tmp-*``,
  ``.export.old-*``...), once the lock is held, and puts back a folder a kill left
  swapped out.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import functools
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from shear.checkpoint import LEFTOVER, checkpoint_step, write_text_atomic
from shear.errors import ShearError, write_failed

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
#: One record per session: the planner's per-rank memory and each rank's measured peak.
MEMORY_FILE = "memory.jsonl"
#: Where a run writes its model, by task.
MODEL_FOLDER = {"prune": "export", "train": "model"}
#: The entry of config.json that marks a run folder and says how to read its options.
RUN_KEY = "shear_run"

F = TypeVar("F", bound=Callable[..., Any])

# locks taken by this process and not yet released, innermost last
_held: list[RunLock] = []


class RunLock:
    """An exclusive lock on a run folder (``fcntl.flock`` on ``.lock``, holder pid inside).

    Attributes:
        folder: the run folder.
        previous: ``"pid N on HOST"`` of an earlier holder that died without releasing
            (a killed run), else None.
        created: this process created the folder (a run that fails before it writes more
            than its options removes it again: see :func:`hold_run_lock`).
    """

    def __init__(self, folder: Path, fd: int, previous: str | None):
        self.folder, self._fd, self.previous = folder, fd, previous
        self.created = False

    @classmethod
    def acquire(cls, folder: str | os.PathLike) -> RunLock:
        """Lock ``folder`` (which must exist) or fail at once.

        Raises:
            ShearError: another process holds the lock (its pid and host are named).
        """
        folder = Path(folder)
        path = folder / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_failed(path, e, "nothing was run") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ShearError(f"cannot lock {path}: {e}") from e
            raise ShearError(
                f"{folder} is in use by another shear process ({holder or 'pid unknown'}); wait for "
                "it to finish or stop it, or choose another --out"
            ) from None
        previous = _holder(fd)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            raise write_failed(path, e, "nothing was run") from e
        lock = cls(folder, fd, previous)
        _held.append(lock)
        return lock

    def discard_if_unused(self) -> None:
        """Remove the folder if this process created it and it holds nothing but the run's
        options (a run that failed while loading its weights or data leaves no folder)."""
        if self.created and contents(self.folder) == [CONFIG_FILE]:
            shutil.rmtree(self.folder, ignore_errors=True)

    def release(self) -> None:
        """Empty the lock file (this run ended normally) and unlock it."""
        if self._fd < 0:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass  # a full disk cannot stop an unlock; the next owner sees a stale pid
        os.close(self._fd)  # closing drops the flock
        self._fd = -1
        if self in _held:
            _held.remove(self)


def _holder(fd: int) -> str | None:
    """``"pid N on HOST"`` from a lock file's contents, or None if it is empty or unreadable."""
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"null")
        return f"pid {int(data['pid'])} on {data['host']}"
    except (OSError, ValueError, TypeError, KeyError):
        return None


def hold_run_lock(fn: F) -> F:
    """Release, when ``fn`` returns or raises, every run lock taken while it ran; when it
    raises, first remove the run folders it created and did not use
    (:meth:`RunLock.discard_if_unused`)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        depth = len(_held)
        try:
            return fn(*args, **kwargs)
        except BaseException:
            for lock in _held[depth:]:
                lock.discard_if_unused()
            raise
        finally:
            while len(_held) > depth:
                _held[-1].release()

    return wrapper  # type: ignore[return-value]


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def input_path(value: str) -> Path:
    """The path an input option names (``default`` is the embedded model's cache folder)."""
    if value == "default":
        from shear.default_model import default_model_cache_path

        return default_model_cache_path()
    return Path(value)


def check_output_folder(
    out: str | os.PathLike, inputs: Mapping[str, str | None], what: str = "--out"
) -> None:
    """Refuse an output folder that would write into an input.

    Args:
        out: the output folder (it need not exist).
        inputs: ``{option: path}`` of what the run reads (``--model``, ``--data``...);
            None or a missing path is skipped (it fails later, as not found).
        what: the output's option name, for the message.

    Raises:
        ShearError: ``out`` equals, lies inside or contains an input folder (or file).
    """
    o = _real(out)
    for option, value in inputs.items():
        if not value:
            continue
        path = input_path(value)
        if not path.exists():
            continue
        r = _real(path)
        if o == r:
            relation = "the same folder as"
        elif r.is_dir() and r in o.parents:
            relation = "inside"
        elif o in r.parents:
            relation = "a folder that contains"
        else:
            continue
        raise ShearError(
            f"{what} {out} is {relation} {option} {value}: a run never writes into what it reads; "
            f"choose another {what}"
        )


def contents(out: str | os.PathLike) -> list[str]:
    """What a folder holds besides a run lock and the leftovers of killed writes (sorted names)."""
    out = Path(out)
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE and not LEFTOVER.match(p.name))


def clean_leftovers(out: str | os.PathLike) -> list[str]:
    """Remove what killed writes left in a run folder (and in its ``plots/``).

    A folder swapped out by an interrupted replace (``.export.old-*/export`` with no
    ``export`` beside it) is put back first.

    Returns:
        The names removed.
    """
    out = Path(out)
    removed = []
    for folder in (out, out / "plots"):
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            if not LEFTOVER.match(entry.name):
                continue
            if ".old-" in entry.name and entry.is_dir():
                name = entry.name[1:].rsplit(".old-", 1)[0]
                if not (folder / name).exists() and (entry / name).is_dir():
                    os.replace(entry / name, folder / name)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(str(entry.relative_to(out)))
    return removed


def kept_checkpoint(out: str | os.PathLike) -> str:
    """What a run stopped now leaves to continue from, and what to run: its checkpoint
    (``--resume``), or none (the same command again starts over)."""
    path = Path(out) / CHECKPOINT_FILE
    step = checkpoint_step(path) if path.is_file() else None
    if step is None:
        return "there is no checkpoint yet: run the same command again, without --resume, to start over"
    return f"the checkpoint of step {step} is kept: continue with --resume"


class RunLog:
    """Append-only JSONL log of a run (rank 0 writes): whole, fsynced records."""

    def __init__(self, path: Path, enabled: bool, mirror: Any = None):
        """``mirror``: also gets every record once it is written (``--report-to``, shear.reporting)."""
        self.path, self.enabled, self.mirror = path, enabled, mirror

    def write(self, record: dict[str, Any]) -> None:
        """Append one record, whole or not at all.

        Raises:
            ShearError: the write failed (e.g. the disk is full); the log is as it was.
        """
        if not self.enabled:
            return
        data = (json.dumps(record) + "\n").encode("utf-8")
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_failed(self.path, e, "the log is as it was") from e
        try:
            size = os.fstat(fd).st_size
            try:
                done = 0
                while done < len(data):
                    done += os.write(fd, data[done:])
                os.fsync(fd)
            except OSError as e:
                os.ftruncate(fd, size)  # no half record
                kept = f"the log keeps every earlier record; {kept_checkpoint(self.path.parent)}"
                raise write_failed(self.path, e, kept) from e
        finally:
            os.close(fd)
        if self.mirror is not None:
            self.mirror.write(record)

    def records(self) -> Iterator[dict[str, Any]]:
        """Every whole record so far (a last line cut short by a kill is skipped).

        Raises:
            ShearError: a line other than the last is not a JSON record.
        """
        if not self.path.exists():
            return
        lines = self.path.read_bytes().split(b"\n")
        whole, tail = lines[:-1], lines[-1]  # tail: the bytes after the last newline
        for n, line in enumerate(whole, 1):
            try:
                record = json.loads(line)
            except ValueError:
                if n == len(whole) and not tail:
                    return  # a torn last line
                raise ShearError(f"{self.path}:{n} is not a JSON record: the log is damaged") from None
            if not isinstance(record, dict):
                raise ShearError(f"{self.path}:{n} is not a JSON object: the log is damaged")
            yield record
        # bytes after the last newline: a record whose write was cut short

    def truncate_after(self, step: int) -> None:
        """Keep the whole records up to ``step`` (a resume replays the rest), atomically."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def reset(self) -> None:
        """Start an empty log (a fresh run in a folder whose earlier attempt left no checkpoint)."""
        if self.enabled:
            self.path.unlink(missing_ok=True)


def write_run_config(out: Path, cfg: Any, task: str) -> None:
    """Write ``config.json``: the options of ``cfg`` and the ``shear_run`` entry, atomically."""
    from shear import __version__

    record = dataclasses.asdict(cfg)
    record[RUN_KEY] = {"task": task, "cwd": os.getcwd(), "version": __version__}
    write_text_atomic(out / CONFIG_FILE, json.dumps(record, indent=2) + "\n")


def read_run_config(out: str | os.PathLike) -> tuple[str, dict[str, Any], str] | None:
    """The task, options and working directory recorded in a run folder, or None if it has none.

    Raises:
        ShearError: ``config.json`` is there but is not a run's (unreadable or another kind).
    """
    path = Path(out) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ShearError(f"{path} cannot be read as a run's options ({e})") from None
    if not isinstance(data, dict):
        raise ShearError(f"{path} is not a run's options")
    run = data.pop(RUN_KEY, None)
    if isinstance(run, dict) and isinstance(run.get("task"), str):
        return run["task"], data, str(run.get("cwd") or os.getcwd())
    if {"model", "data", "out", "steps"} <= data.keys():  # written before RUN_KEY existed
        return ("prune" if "target" in data else "train"), data, os.getcwd()
    raise ShearError(f"{path} is not a shear run's config.json")


def run_task(folder: str | os.PathLike) -> str | None:
    """The task of the shear run ``folder`` holds (``prune``, ``train``), or None when its
    config.json is missing or of another kind (a model folder's)."""
    try:
        found = read_run_config(folder)
    except ShearError:
        return None
    return found[0] if found else None


def enclosing_run(path: str | os.PathLike) -> Path | None:
    """The run folder that is ``path`` or holds it (the nearest with a shear run's
    config.json), or None."""
    folder = _real(path)
    return next((c for c in (folder, *folder.parents) if run_task(c) is not None), None)


def _rebase(value: Any, cwd: str) -> Any:
    """A relative path option made absolute against the run's recorded working directory."""
    if isinstance(value, str) and value and not os.path.isabs(value) and "=" not in value:
        candidate = Path(cwd) / value
        if candidate.exists():
            return str(candidate)
    return value


def recorded_options(out: str | os.PathLike, task: str, fields: set[str]) -> dict[str, Any]:
    """The options a resume starts from: those recorded in ``out/config.json``.

    Relative paths are made absolute against the recorded working directory, so a resume
    from another directory reads the same inputs.

    Args:
        out: the run folder.
        task: ``prune`` or ``train``; a folder of the other task is refused.
        fields: the option names the current config class knows.

    Raises:
        ShearError: no run there, a run of another task, or options this version does not know.
    """
    found = read_run_config(out)
    if found is None:
        raise ShearError(f"--resume: {out} holds no run (no {CONFIG_FILE})")
    recorded_task, options, cwd = found
    if recorded_task != task:
        raise ShearError(f"--resume: {out} holds a `shear {recorded_task}` run, not a `shear {task}` run")
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ShearError(
            f"--resume: {out}/{CONFIG_FILE} records options this shear version does not know: "
            f"{', '.join(unknown)}"
        )
    return {k: _rebase(v, cwd) for k, v in options.items()}


def _same(a: Any, b: Any, cwd_a: str) -> bool:
    """Equal values, or two paths that lead to the same place (``a`` relative to ``cwd_a``)."""
    if a == b:
        return True
    if not (isinstance(a, str) and isinstance(b, str)) or "default" in (a, b) or "=" in a + b:
        return False
    pa = Path(cwd_a) / a
    return pa.exists() and _real(pa) == _real(b)


def changed_options(
    recorded: dict[str, Any], cwd: str, current: dict[str, Any], changeable: frozenset[str]
) -> list[str]:
    """The options that differ from the recorded ones and may not change within a run.

    Paths compare by where they lead (relative ones from their own working directory).

    Returns:
        ``"--name NEW (recorded OLD)"`` for each, in field order.
    """
    changed = []
    for name, value in current.items():
        if name in changeable or name not in recorded:
            continue
        old = json.loads(json.dumps(recorded[name]))
        new = json.loads(json.dumps(value))
        if not _same(old, new, cwd):
            changed.append(f"{option_flag(name)} {_show(new)} (recorded {_show(old)})")
    return changed


#: Options whose command-line flag is not their name with dashes.
_FLAGS = {"mask_types": "--types"}


def option_flag(name: str) -> str:
    """The command-line flag of a run option (``mask_types``: ``--types``)."""
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
