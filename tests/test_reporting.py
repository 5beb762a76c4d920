"""`--report-to tensorboard`: the scalars of log.jsonl as event files TensorBoard's own reader loads."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import prune_tiny

from shear.cli import main
from shear.errors import ShearError
from shear.reporting import parse_report_to, scalars


def test_report_to_names():
    assert parse_report_to("none") == [] and parse_report_to("") == []
    installed = [n for n in ("tensorboard", "wandb") if importlib.util.find_spec(n) is not None]
    assert parse_report_to("all") == installed
    with pytest.raises(ShearError, match="unknown comet"):
        parse_report_to("tensorboard,comet")
    if importlib.util.find_spec("wandb") is None:  # never required: named, it says how to get it
        with pytest.raises(ShearError, match="pip install wandb"):
            parse_report_to("wandb")


def test_scalars_flatten_a_record():
    record = {"step": 3, "loss": 2.5, "frozen": True, "expected": {"head": 2.0, "mlp": 5},
              "dynamic": {"weights": {"code": 0.4}}, "note": "x", "rows": [1, 2]}  # fmt: skip
    flat = {"loss": 2.5, "expected/head": 2.0, "expected/mlp": 5.0, "dynamic/weights/code": 0.4}
    assert scalars(record) == flat


def test_bad_report_to_fails_before_any_work(tiny_source, data_dir, tmp_path, capsys):
    argv = ["prune", "--model", tiny_source, "--target", "layers=2", "--data", data_dir,
            "--out", str(tmp_path / "run"), "--report-to", "comet"]  # fmt: skip
    assert main(argv) == 2
    assert "unknown comet" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_tensorboard_event_files_hold_the_logs_scalars(tiny_source, data_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    prune_tiny(tiny_source, data_dir, run, steps=4, eval_interval=2, dynamic_interval=2,
               report_to="tensorboard")  # fmt: skip
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    logged: dict[str, dict[int, float]] = {}
    for line in (run / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        for tag, value in scalars(record).items():
            logged.setdefault(tag, {})[record.get("step", 0)] = value
    assert {"loss", "tokens_per_s", "lr", "eval/code"} <= set(logged)
    assert any(t.startswith("expected/") for t in logged)
    assert any(t.startswith("dynamic/weights/") for t in logged)
    assert set(events.Tags()["scalars"]) == set(logged)
    for tag, by_step in logged.items():
        read = {e.step: e.value for e in events.Scalars(tag)}
        assert read == pytest.approx(by_step, rel=1e-6), tag
