"""`shear info`: published sizes from config files, the default model, errors and exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from transformers import LlamaConfig

from shear.cli import main


def _llama2_config(path, **sizes):
    base = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False,
                architectures=["LlamaForCausalLM"])  # fmt: skip
    base.update(sizes)
    path.mkdir()
    LlamaConfig(**base).save_pretrained(path)
    return path / "config.json"


def _info(capsys, *argv):
    assert main(["info", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_published_sizes_through_config_files(tmp_path, capsys):
    src = _llama2_config(tmp_path / "llama2-7b")
    t13 = _llama2_config(tmp_path / "t13", hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                         num_key_value_heads=16, intermediate_size=5504)  # fmt: skip
    t27 = _llama2_config(tmp_path / "t27", hidden_size=2560, num_attention_heads=20, num_key_value_heads=20,
                         intermediate_size=6912)  # fmt: skip
    r = _info(capsys, str(src), "--target", str(t13))
    assert r["source"]["params"]["total"] == 6_738_415_616
    assert r["target"]["params"]["total"] == 1_345_423_360
    assert {m["name"]: m["shape"] for m in r["masks"]} == {
        "layer": [32],
        "kv": [32, 32],
        "intermediate": [32, 11008],
        "hidden": [4096],
    }
    assert {m["name"]: round(m["prune_fraction"], 3) for m in r["masks"]} == {
        "layer": 0.25,
        "kv": 0.5,
        "intermediate": 0.5,
        "hidden": 0.5,
    }
    r = _info(capsys, str(tmp_path / "llama2-7b"), "--target", str(t27.parent))
    assert r["target"]["params"]["total"] == 2_701_560_320
    assert r["prune_fraction"]["total_params"] == pytest.approx(1 - 2_701_560_320 / 6_738_415_616)


def test_text_output_and_types(tmp_path, capsys):
    src = _llama2_config(tmp_path / "src")
    assert main(["info", str(src), "--target", "layers=24,hidden=2048,heads=16,intermediate=5504"]) == 0
    out = capsys.readouterr().out
    assert "6,738,415,616" in out and "1,345,423,360" in out
    assert "keep 24 of 32 per row" in out and "hidden" in out
    r = _info(capsys, str(src), "--target", "intermediate=5504", "--types", "intermediate", "mlp")
    assert [m["name"] for m in r["masks"]] == ["mlp", "intermediate"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--target", "hidden=8192"], "larger than the source"),
        (["--target", "intermediate=5504", "--types", "hidden"], "shrinks intermediate"),
        (["--types", "hidden"], "--types needs --target"),
    ],
)
def test_errors_exit_2_with_a_message(tmp_path, capsys, argv, message):
    src = _llama2_config(tmp_path / "src")
    assert main(["info", str(src), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shear: error:") and message in err


def test_missing_model_exit_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err


def test_console_script_and_default_model(capsys):
    exe = shutil.which("shear")
    assert exe, "the shear console script is not installed (pip install -e .)"
    proc = subprocess.run(
        [
            exe,
            "info",
            "default",
            "--json",
            "--target",
            "layers=24,hidden=384,heads=6,kv_heads=2,intermediate=1024",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    r = json.loads(proc.stdout)
    assert r["source"]["params"]["total"] == 134_515_008
    assert r["source"]["architecture"] == "LlamaForCausalLM"
    assert (r["source"]["heads"], r["source"]["kv_heads"], r["source"]["tied"]) == (9, 3, True)
    assert [m["name"] for m in r["masks"]] == ["layer", "kv", "intermediate", "hidden"]


def test_prune_and_eval_commands(tiny_source, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    target = "layers=2,hidden=48,heads=2,kv_heads=1,intermediate=64"
    argv = ["prune", "--model", tiny_source, "--target", target, "--data", data_dir, "--out", str(out),
            "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--eval-interval", "2"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert str(out / "export") in printed and "report.md" in printed
    cfg = json.loads((out / "export" / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]) == (2, 48, 2)
    assert (cfg["num_key_value_heads"], cfg["intermediate_size"]) == (1, 64)
    report = (out / "report.md").read_text()
    assert "| pruned | 2 | 48 | 2 | 1 | 64 |" in report
    assert all((out / "plots" / f"{n}.png").stat().st_size > 1000 for n in ("loss", "dims", "lambdas"))
    steps = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in steps if "eval" in r] == [2, 4]
    # with no recipe option given: the default recipe, recorded with its resolved options
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["recipe"] == "importance-refit"
    assert (recorded["freeze_masks"], recorded["refit"]) == (1.0, 0.3)
    assert [r for r in steps if "recipe" in r] == [{"recipe": "importance-refit", "options": {
        n: recorded[n] for n in ("steps", "init", "freeze_masks", "search_steps", "refit", "refit_sequences",
                                 "dynamic_eta", "min_domain_weight")}}]  # fmt: skip
    assert "Recipe `importance-refit` (" in report and (out / "refit.json").exists()

    assert (
        main(["eval", "--model", str(out / "export"), "--data", data_dir, "--seq-len", "32", "--json"]) == 0
    )
    r = json.loads(capsys.readouterr().out)
    assert set(r["domains"]) == {"code", "licenses", "changelogs"} or len(r["domains"]) >= 2
    assert all(d["perplexity"] > 1 for d in r["domains"].values())

    assert main(argv) == 2  # the run folder holds a run: --resume or another --out
    assert "already holds a run" in capsys.readouterr().err
    assert main(["prune", "--model", tiny_source, "--target", target, "--data", str(tmp_path / "nodata"),
                 "--out", str(tmp_path / "r2")]) == 2  # fmt: skip
    assert "data folder not found" in capsys.readouterr().err


def test_data_default_command_reports_what_it_cannot_build(tmp_path, capsys):
    # the standard library alone is one domain: the corpus needs two, and says so
    out = tmp_path / "corpus"
    assert main(["data", "default", "--out", str(out), "--sources", "python-stdlib"]) == 2
    assert "at least 2 domains" in capsys.readouterr().err
    assert not out.exists()
    assert main(["data", "default", "--out", str(out), "--sources", "no-such-source"]) == 2
    assert "no-such-source" in capsys.readouterr().err
