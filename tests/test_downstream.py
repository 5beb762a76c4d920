"""`shear eval --tasks`: lm-evaluation-harness on a local multiple-choice task, offline."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import prune_tiny

from shear.cli import main
from shear.downstream import _metrics, record_in_run, require_harness
from shear.errors import ShearError

TASK = "shear_local_mc"


def write_local_task(folder: Path) -> Path:
    """A multiple-choice task in the harness's YAML format over a JSON-lines file beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {"question": f"What is {a} plus {b}?", "choices": [str(a + b), str(a + b + 1), str(a * b + 7)],
         "answer": 0}
        for a in range(4)
        for b in range(2)
    ]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "local_mc.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'data.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 2.0\n"
    )
    return folder


def test_missing_harness_names_the_extra(monkeypatch, tiny_source, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(ShearError, match=r'pip install "shear\[eval\]"'):
        require_harness()
    assert main(["eval", tiny_source, "--tasks", "arc_easy"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "shear[eval]"' in err


def test_eval_needs_data_or_tasks(tiny_source, capsys):
    assert main(["eval", tiny_source]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "--tasks" in err


def test_metric_names_and_stderr_as_the_harness_gives_them():
    raw = {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.75,
           "acc_norm_stderr,none": "N/A", "sample_len": 8, "exact_match,strict": 0.25,
           "exact_match_stderr,strict": 0.05}  # fmt: skip
    assert _metrics(raw) == {
        "acc": {"value": 0.5, "stderr": 0.1},
        "acc_norm": {"value": 0.75, "stderr": None},
        "exact_match,strict": {"value": 0.25, "stderr": 0.05},
    }


@pytest.mark.slow  # about a minute on 2 cores: importing the harness alone takes 20 s
def test_eval_tasks_on_a_run_folder(tiny_source, data_dir, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    tasks = write_local_task(tmp_path / "tasks")
    run = tmp_path / "run"
    prune_tiny(tiny_source, data_dir, run, steps=0)
    argv = ["eval", str(run), "--tasks", TASK, "--include-path", str(tasks), "--limit", "4",
            "--batch-size", "4", "--out", str(tmp_path / "r.json"), "--json"]  # fmt: skip
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)["downstream"]
    assert printed == json.loads((tmp_path / "r.json").read_text())
    assert printed == json.loads((run / "downstream.json").read_text())
    assert printed["harness_version"] and printed["model"] == str(run / "export")
    task = printed["tasks"][TASK]
    assert float(task["version"]) == 2.0 and task["n_samples"] == 4
    assert set(task["metrics"]) == {"acc", "acc_norm"}
    for m in task["metrics"].values():
        assert 0 <= m["value"] <= 1 and m["value"] * 4 == round(m["value"] * 4)  # a share of 4 examples
        assert m["stderr"] is not None and m["stderr"] >= 0
    report = (run / "report.md").read_text()
    assert f"| {TASK} | 2.0 | acc_norm |" in report and "## Options" in report
    card = (run / "export" / "README.md").read_text()  # the export's model card too
    assert "model-index" in card and f"| {TASK} | 2.0 | acc_norm |" in card


def test_a_run_report_holds_the_latest_table_once(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.md").write_text("# Pruning report\n\ntext\n\n## Options\n\n```json\n{}\n```\n")
    result = {"model": "m", "harness_version": "0.4", "num_fewshot": 0, "limit": None,
              "tasks": {"t": {"version": 1, "n_samples": 9,
                              "metrics": {"acc": {"value": 0.5, "stderr": 0.1}}}}}  # fmt: skip
    record_in_run(run, result)
    result["tasks"]["t"]["metrics"]["acc"]["value"] = 0.75
    record_in_run(run, result)
    report = (run / "report.md").read_text()
    assert report.count("## Downstream tasks") == 1 and report.count("## Options") == 1
    assert "| t | 1 | acc | 0.7500 | 0.1000 | 9 |" in report and "0.5000" not in report
    assert report.index("text") < report.index("## Downstream tasks") < report.index("## Options")
    assert json.loads((run / "downstream.json").read_text()) == result


@pytest.mark.slow
def test_unknown_task_says_so(tiny_source, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    assert main(["eval", tiny_source, "--tasks", "no_such_task_xyz"]) == 2
    err = capsys.readouterr().err
    assert "no_such_task_xyz" in err and "--include-path" in err
