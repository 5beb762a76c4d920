"""``shear export RUN_DIR``: write a run's model from its checkpoint.

For a run ended with ``--no-export`` or ``--stop-after``, or to export again with another
backend or shard size. The run's task is rebuilt from its recorded options exactly as the
run built it, the checkpoint's weights (and masks) restored into it, and the task's own
``export`` called: the function a run calls at its end, so the files are the same bytes
(``shear_export.json`` records the backend and thread count it used) (a pruning run: the
finalized model, see :func:`shear.export.export_pruned`; continued pre-training: the
model saved with ``save_pretrained``). The folder is written under a temporary name and
renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from shear.checkpoint import load
from shear.errors import ShearError
from shear.export import parse_size
from shear.model_card import write_card
from shear.runfolder import (
    CHECKPOINT_FILE,
    MODEL_FOLDER,
    RunLock,
    check_output_folder,
    clean_leftovers,
    enclosing_run,
    hold_run_lock,
    read_run_config,
    recorded_options,
)


def _config(run_dir: Path) -> Any:
    found = read_run_config(run_dir)
    if found is None:
        raise ShearError(f"{run_dir} holds no shear run (no config.json)")
    if found[0] == "prune":
        from shear.prune import PruneConfig as config
    elif found[0] == "train":
        from shear.trainer import TrainConfig as config
    else:
        raise ShearError(f"{run_dir} holds a run of an unknown task {found[0]!r}")
    fields = {f.name for f in dataclasses.fields(config)}
    options = recorded_options(run_dir, found[0], fields)
    return config(**{**options, "out": str(run_dir), "resume": True, "device": "cpu"})


def _check_destination(dest: Path, run_dir: Path, default: Path, inputs: dict[str, str | None]) -> None:
    """Refuse a destination that is an input, is or holds the run, lies in another run's
    folder, or is a non-empty folder other than the run's own export (an export replaces
    its folder: only the run's own is replaced in place)."""
    check_output_folder(dest, inputs)
    real, run = Path(os.path.realpath(dest)), Path(os.path.realpath(run_dir))
    if real == run or real in run.parents:
        raise ShearError(f"--out {dest} is or contains the run folder {run_dir}; choose another folder")
    other = enclosing_run(real)
    if other is not None and other != run:
        raise ShearError(
            f"--out {dest} is inside another run's folder ({other}): its export and report belong to "
            "that run; choose a folder outside it"
        )
    if dest.exists() and real != Path(os.path.realpath(default)):
        if not dest.is_dir():
            raise ShearError(f"--out {dest} is a file")
        if any(dest.iterdir()):
            raise ShearError(
                f"--out {dest} is not empty: an export replaces its folder, and only the run's own "
                f"{default.name}/ is replaced in place; choose a new or empty folder"
            )


def _measured(run_dir: Path, task_name: str) -> dict[str, float] | None:
    """The held-out losses the finished run measured on its own export (the same weights), if any."""
    evals = run_dir / "evals.json"
    if not evals.is_file():
        return None
    measured = json.loads(evals.read_text(encoding="utf-8"))
    return measured.get({"prune": "exported", "train": "saved"}[task_name])


@hold_run_lock
def export_run(
    run_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    backend: str | None = None,
    max_shard_size: int | str | None = None,
) -> dict[str, Any]:
    """Export the model of a run's checkpoint.

    Args:
        run_dir: the run folder (of ``shear prune`` or ``shear train``).
        out: the destination folder (default: the run's own ``export/`` or ``model/``,
            replaced atomically).
        backend: the export backend of a pruning run (see :func:`shear.export.resolve_backend`).
        max_shard_size: split the weights above this size (default: as the run did).

    Returns:
        ``{"run", "task", "out", "step", "steps"}``: ``step`` is the checkpoint's.

    Raises:
        ShearError: no run or checkpoint, a damaged checkpoint or one that does not fit the
            recorded options, a destination that would overwrite what is not an export, a
            backend option for a training run, another process holding the run folder, a
            failed write (nothing partial is left).
    """
    from shear.loading import load_source
    from shear.trainer import check_checkpoint_fits

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ShearError(f"run folder not found: {run_dir}")
    cfg = _config(run_dir)
    task_name = cfg.TASK
    default = run_dir / MODEL_FOLDER[task_name]
    dest = Path(out) if out is not None else default
    _check_destination(dest, run_dir, default, cfg.input_paths())
    shard_bytes = None if max_shard_size is None else parse_size(max_shard_size)
    if task_name == "train" and backend is not None:
        raise ShearError("--backend applies to pruning runs; a training run saves with save_pretrained")
    if Path(os.path.realpath(run_dir)) in Path(os.path.realpath(dest)).parents:
        RunLock.acquire(run_dir)  # it writes into the run folder: not while a run uses it
        clean_leftovers(run_dir)
    state = load(run_dir / CHECKPOINT_FILE)

    model, tokenizer = load_source(cfg.model)
    if task_name == "prune":
        from shear.arch import Arch
        from shear.prune import build_task
        from shear.target import resolve_target

        source = Arch.from_config(model.config)
        task = build_task(cfg, model, source, resolve_target(source, cfg.target), torch.device("cpu"))
    else:
        from shear.train import TrainTask

        task = TrainTask(cfg, model)
    # the weights and, for pruning, the masks: the optimiser and RNG states play no part (and
    # a GPU run's generator state would not fit a CPU generator)
    keys = ("masks",) if task_name == "prune" else ()
    check_checkpoint_fits(state, task, run_dir / CHECKPOINT_FILE, keys)
    try:
        if "shards" in state:  # an FSDP run's sharded checkpoint, read into one process
            from shear.parallel import load_sharded

            load_sharded(run_dir / state["shards"], model)
        else:
            model.load_state_dict(state["model"])
        if task_name == "prune":
            task.masks.load_state_dict(state["task"]["masks"])
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise ShearError(f"{run_dir / CHECKPOINT_FILE} does not fit its run ({type(e).__name__}: {e})") from e
    options: dict[str, Any] = {}
    if backend is not None:
        options["backend"] = backend
    if shard_bytes is not None:
        options["max_shard_size"] = shard_bytes
    folder = task.export(dest, tokenizer, **options)
    step = int(state["step"])
    write_card(folder, cfg, step, _measured(run_dir, task_name) if step == cfg.steps else None)
    if step < cfg.steps:
        print(f"shear: exported step {step} of {cfg.steps}: the run is not finished", file=sys.stderr)
    return {"run": str(run_dir), "task": task_name, "out": str(folder), "step": step, "steps": cfg.steps}
