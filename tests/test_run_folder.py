"""The run folder's mechanisms on their own: the lock across processes, whole log records, the
leftovers of killed writes, where an output may be, and which options a resume may change."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from shear import runfolder
from shear.errors import ShearError, describe_write_error, disk_full
from shear.runfolder import (
    RunLock,
    RunLog,
    changed_options,
    check_output_folder,
    clean_leftovers,
    hold_run_lock,
)

_HOLDER = textwrap.dedent(
    """
    import sys, time
    from shear.runfolder import RunLock
    RunLock.acquire(sys.argv[1])
    print("locked", flush=True)
    time.sleep(300)
    """
)


def test_lock_is_exclusive_across_processes_and_a_killed_holder_frees_it(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        with pytest.raises(ShearError, match=rf"in use by another shear process \(pid {proc.pid} on "):
            RunLock.acquire(tmp_path)
        assert time.monotonic() - t0 < 1  # at once, no waiting
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    lock = RunLock.acquire(tmp_path)  # the kernel dropped the dead holder's lock
    assert lock.previous is not None and f"pid {proc.pid} " in lock.previous
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert (tmp_path / ".lock").read_text() == ""  # a normal end leaves no pid behind
    again = RunLock.acquire(tmp_path)
    assert again.previous is None
    again.release()


def test_hold_run_lock_releases_on_error(tmp_path):
    @hold_run_lock
    def run(fail: bool):
        RunLock.acquire(tmp_path)
        if fail:
            raise ShearError("boom")

    with pytest.raises(ShearError, match="boom"):
        run(True)
    run(False)  # would fail "in use" if the first call had kept its lock
    assert runfolder._held == []


def test_log_records_are_whole_and_a_torn_last_line_is_dropped(tmp_path, monkeypatch):
    log = RunLog(tmp_path / "log.jsonl", True)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1.0 / step})
    before = log.path.read_bytes()

    # a full disk in the middle of a record: the file goes back to its old size
    real_write = os.write

    def half_then_full(fd, data):
        if len(data) > 8:
            real_write(fd, data[: len(data) // 2])
            return len(data) // 2
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runfolder.os, "write", half_then_full)
    with pytest.raises(ShearError, match="the disk is full.*keeps every earlier record"):
        log.write({"step": 4, "loss": 0.25})
    monkeypatch.undo()
    assert log.path.read_bytes() == before

    # a kill in the middle of a record (the old writer could leave one): dropped when read
    with open(log.path, "ab") as f:
        f.write(b'{"step": 4, "lo')
    assert [r["step"] for r in log.records()] == [1, 2, 3]
    log.truncate_after(2)
    assert [r["step"] for r in log.records()] == [1, 2]
    assert log.path.read_text().endswith("}\n")

    # damage anywhere but the end is not hidden
    log.path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ShearError, match=r"log.jsonl:2 is not a JSON record"):
        list(log.records())


def test_leftovers_are_removed_and_a_swapped_out_export_is_put_back(tmp_path):
    run = tmp_path / "run"
    (run / "plots").mkdir(parents=True)
    leftovers = [".checkpoint.pt.ab12cd34.tmp", ".model.tmp-zz99_x1a", ".log.jsonl.k2j3h4g5.tmp"]
    for name in leftovers:
        (run / name).write_bytes(b"partial")
    (run / ".export.tmp-abcdefgh").mkdir()  # a new export, cut short
    old = run / ".export.old-12345678" / "export"  # the previous one, swapped out, not yet replaced
    old.mkdir(parents=True)
    (old / "model.safetensors").write_bytes(b"previous export")
    (run / "plots" / ".loss.png.q1w2e3r4.tmp").write_bytes(b"half a plot")
    keep = ["checkpoint.pt", "log.jsonl", ".lock", "notes.tmp", ".hidden"]
    for name in keep:
        (run / name).write_bytes(b"keep")

    removed = clean_leftovers(run)
    assert sorted(removed) == sorted(
        [*leftovers, ".export.tmp-abcdefgh", ".export.old-12345678", "plots/.loss.png.q1w2e3r4.tmp"]
    )
    assert sorted(p.name for p in run.iterdir()) == sorted([*keep, "export", "plots"])
    assert (run / "export" / "model.safetensors").read_bytes() == b"previous export"
    assert list((run / "plots").iterdir()) == []


@pytest.mark.parametrize(
    "out,relation",
    [
        ("model", "the same folder as --model"),
        ("model/run", "inside --model"),
        ("data", "the same folder as --data"),
        ("data/sub/run", "inside --data"),
        (".", "a folder that contains --model"),
        ("link-to-data", "the same folder as --data"),  # a symbolic link leads to the same place
    ],
)
def test_an_output_never_lands_in_an_input(tmp_path, monkeypatch, out, relation):
    (tmp_path / "model").mkdir()
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "link-to-data").symlink_to(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ShearError, match=f"is {relation}"):
        check_output_folder(out, {"--model": "model", "--data": "data", "--reference-model": None})
    check_output_folder("runs/one", {"--model": "model", "--data": "data"})  # beside them is fine


def test_changed_options_compare_paths_by_where_they_lead(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    recorded = {"data": "data", "target": "layers=2", "seq_len": 32, "num_workers": 0, "mask_types": None}
    monkeypatch.chdir("/")
    same = {"data": str(tmp_path / "data"), "target": "layers=2", "seq_len": 32, "num_workers": 2,
            "mask_types": None}  # fmt: skip
    assert changed_options(recorded, str(tmp_path), same, frozenset({"num_workers"})) == []
    other = dict(same, target="layers=1", seq_len=64, mask_types=["layer"])
    assert changed_options(recorded, str(tmp_path), other, frozenset({"num_workers"})) == [
        "--target 'layers=1' (recorded 'layers=2')",
        "--seq-len 64 (recorded 32)",
        '--types ["layer"] (recorded null)',  # the command line's flag
    ]


def test_disk_full_is_recognised_through_the_libraries_that_hide_it():
    assert disk_full(OSError(errno.ENOSPC, "No space left on device"))
    try:  # torch.save: a RuntimeError whose context is the OSError
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
            ) from None
    except RuntimeError as e:
        hidden = e
    hidden.__context__ = OSError(errno.ENOSPC, "No space left on device")
    assert disk_full(hidden)
    assert describe_write_error(hidden) == "the disk is full (No space left on device)"
    assert disk_full(Exception("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert not disk_full(OSError(errno.EACCES, "Permission denied"))
    assert describe_write_error(OSError(errno.EACCES, "Permission denied")) == "[Errno 13] Permission denied"
