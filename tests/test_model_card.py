"""Every export carries a Hugging Face model card (README.md) that later evaluations add to."""

from __future__ import annotations

import json
import math

import yaml
from conftest import prune_tiny

from shear.cli import main
from shear.loading import load_source
from shear.model_card import update_card


def _card(folder):
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def test_an_export_carries_a_model_card(tiny_source, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    prune_tiny(tiny_source, data_dir, run, steps=2)
    meta, body = _card(run / "export")
    assert meta["library_name"] == "transformers" and "pruned" in meta["tags"] and "base_model" not in meta
    exported = json.loads((run / "export" / "config.json").read_text())
    assert f"{exported['num_hidden_layers']} layers, hidden {exported['hidden_size']}" in body
    params = sum(p.numel() for p in load_source(run / "export")[0].parameters())
    assert f"Parameters: {params:,} in all" in body
    assert f"2 optimiser steps, {2 * 4 * 32:,} training tokens" in body and '"target": "layers=2' in body
    evals = json.loads((run / "evals.json").read_text())["exported"]
    for domain, loss in evals.items():
        assert f"| {domain} | {math.exp(loss):.2f} | {loss:.4f} |" in body
    assert "model-index" not in meta

    # `shear export` writes the same card (the finished run measured these weights)...
    assert main(["export", str(run), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "README.md").read_bytes() == (run / "export" / "README.md").read_bytes()
    # ...but not an unfinished run's perplexity: the checkpoint's weights were never measured
    record = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**record, "steps": 3}))
    assert main(["export", str(run), "--out", str(tmp_path / "early")]) == 0
    capsys.readouterr()
    meta, body = _card(tmp_path / "early")
    assert "2 optimiser steps" in body and "perplexity" not in body.lower()
    (run / "config.json").write_text(json.dumps(record))

    # downstream results (as `shear eval --tasks` passes them) go into the front matter and the body
    result = {"model": "m", "harness_version": "0.4.13", "num_fewshot": 0, "limit": 8,
              "tasks": {"arc_easy": {"version": 1.0, "n_samples": 8, "metrics": {
                  "acc": {"value": 0.375, "stderr": 0.18},
                  "acc_norm": {"value": 0.5, "stderr": 0.19}}}}}  # fmt: skip
    update_card(run / "export", downstream=result)
    meta, body = _card(run / "export")
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    assert {m["type"]: m["value"] for m in metrics} == {"acc": 0.375, "acc_norm": 0.5}
    assert "| arc_easy | 1.0 | acc_norm | 0.5000 | 0.1900 | 8 |" in body
    assert "Per-domain perplexity" in body  # kept from the run
    assert update_card(tmp_path, downstream=result) is None  # no card: not a shear export, left alone
    assert not (tmp_path / "README.md").exists()
