"""``--report-to``: the scalars of ``log.jsonl`` mirrored to TensorBoard or Weights & Biases.

The option follows Hugging Face Trainer's ``report_to``: ``none`` (the default), ``all``
(every integration whose package is installed), or a comma-separated list of
``tensorboard`` and ``wandb``. TensorBoard writes event files into ``RUN_DIR/tensorboard/``
(offline; ``tensorboard --logdir RUN_DIR``); W&B is used only when its package is installed
and never required. Each record of the run's log becomes scalars at its step, nested keys
joined by ``/`` (``loss``, ``expected/head``, ``eval/code``, ``dynamic/weights/wiki``,
``tokens_per_s``, ...), the same numbers as ``log.jsonl``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

from shear.errors import ShearError

INTEGRATIONS = ("tensorboard", "wandb")
#: The folder of the event files inside a run folder.
TENSORBOARD_DIR = "tensorboard"
_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb"}
_INSTALL = {"tensorboard": 'pip install "shear[tensorboard]"', "wandb": "pip install wandb"}


def parse_report_to(text: str) -> list[str]:
    """The integrations ``--report-to`` names (``all``: those installed; ``none``: none).

    Raises:
        ShearError: an unknown name, or a named integration whose package is missing.
    """
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if names in ([], ["none"]):
        return []
    if names == ["all"]:
        return [n for n in INTEGRATIONS if importlib.util.find_spec(_PACKAGE[n]) is not None]
    unknown = [n for n in names if n not in INTEGRATIONS]
    if unknown:
        raise ShearError(
            f"report_to: unknown {', '.join(unknown)}; give none, all or a list of {', '.join(INTEGRATIONS)}"
        )
    for n in names:
        if importlib.util.find_spec(_PACKAGE[n]) is None:
            raise ShearError(f"report_to {n}: its package is not installed ({_INSTALL[n]})")
    return names


def scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a log record, nested keys joined by ``/`` (flags, strings and lists left out)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, name + "/"))
        elif isinstance(value, int | float) and not isinstance(value, bool) and key != "step":
            out[name] = float(value)
    return out


class Reporters:
    """The integrations of a run: each log record goes to every one."""

    def __init__(self, names: list[str], out: Path, cfg: Any):
        self.writers: list[Any] = []
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.writers.append(_TensorBoard(SummaryWriter(log_dir=str(out / TENSORBOARD_DIR))))
        if "wandb" in names:
            import wandb

            run = wandb.init(project="shear", name=out.name, dir=str(out), config=dataclasses.asdict(cfg))
            self.writers.append(_WandB(run))

    def write(self, record: dict[str, Any]) -> None:
        """Report one log record's scalars at its step."""
        values = scalars(record)
        if values:
            for w in self.writers:
                w.write(int(record.get("step", 0)), values)

    def close(self) -> None:
        """Flush and close every integration."""
        for w in self.writers:
            w.close()


@dataclasses.dataclass
class _TensorBoard:
    writer: Any

    def write(self, step: int, values: dict[str, float]) -> None:
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)
        self.writer.flush()  # a killed run keeps what it reported

    def close(self) -> None:
        self.writer.close()


@dataclasses.dataclass
class _WandB:
    run: Any

    def write(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()
