"""The least-squares refit at the cut: the solve, its order over layers, the masked model after it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TINY_KINDS, TINY_TARGETS, make_tiny, prune_tiny

from shear.arch import Arch
from shear.errors import ShearError
from shear.export import export_plan, kept_layers
from shear.importance import activation_importance, init_from_importance
from shear.patch import apply_masks
from shear.prune import PruneConfig
from shear.refit import REFITTED, STAGES, RefitStats, dense_pruned, refit_masked

DAMPING = 0.2


def _calibration(n: int = 6, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, 101, (n, seq), generator=torch.Generator().manual_seed(3))


def _cut(kind: str, shard=None):
    """(source, masked model, masks, z): the importance choice of a tiny model, masks attached
    (after ``shard`` prepared the model, as a run does)."""
    source, model = make_tiny(kind), make_tiny(kind)
    if shard is not None:
        model = shard(model)
    arch = Arch.from_config(model.config)
    scores = activation_importance(source, arch, _calibration())
    masks = apply_masks(model, TINY_TARGETS[kind])
    init_from_importance(masks, scores)
    with torch.no_grad():
        z = masks.deterministic()  # kept values below 1: the scales must come out again
    return source, model, masks, z


def _dense(model, masks, z):
    plan, arch = export_plan(model, masks, z)
    return dense_pruned(model, plan, arch, kept_layers(masks, z))


def _inputs(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Input of every refitted linear of a plain model on ``ids``, by weight name."""
    seen, handles = {}, []

    def grab(module, args, name):
        seen[f"{name}.weight"] = args[0].flatten(0, -2).double()  # returns None: the input stays

    for name, module in model.named_modules():
        if f"{name}.weight".endswith(REFITTED):
            handles.append(module.register_forward_pre_hook(lambda m, args, name=name: grab(m, args, name)))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("kind", sorted(TINY_KINDS))
def test_refit_solves_the_damped_least_squares_layer_after_layer(kind):
    """Every refitted weight equals an independent float64 lstsq solve on the inputs that the
    already-refitted layers before it produce; dropped units' weights do not move."""
    source, model, masks, z = _cut(kind)
    cut = _dense(model, masks, z)
    dropped_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    errors = refit_masked(model, masks, z, _calibration(), batch_size=4, damping=DAMPING)
    refit = _dense(model, masks, z)
    ids = _calibration()
    u_src, u_new = _inputs(source, ids), _inputs(refit, ids)
    plan = {s.name: s for s in export_plan(model, masks, z)[0]}
    layers = kept_layers(masks, z)
    source_params, cut_params = dict(source.named_parameters()), dict(cut.named_parameters())
    checked = 0
    for new, old in enumerate(layers):
        for stage in STAGES:
            for n in stage:
                key, src_key = f"model.layers.{new}.{n}.weight", f"model.layers.{old}.{n}.weight"
                rows = plan[key].rows
                w = source_params[src_key].detach().double()
                w = w[rows] if rows is not None else w
                u, v = u_src[src_key], u_new[key]
                lam = DAMPING * (v.T @ v).diagonal().mean()
                a = torch.cat([v, lam.sqrt() * torch.eye(v.shape[1], dtype=v.dtype)])
                b = torch.cat([u @ w.T, lam.sqrt() * cut_params[key].detach().double().T])
                expected = torch.linalg.lstsq(a, b).solution.T
                got = dict(refit.named_parameters())[key].detach().double()
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6, msg=key)
                before, after = errors[key]
                assert after <= before + 1e-9 and 0 < before, key
                checked += 1
    assert checked == 7 * len(layers) == len(errors)
    assert any(after < 0.9 * before for before, after in errors.values())
    # nothing but the kept blocks of the refitted weights changed
    names = {id(p): n for n, p in model.named_parameters()}
    blocks = {}
    for spec in plan.values():
        if spec.name.endswith(REFITTED):
            block = torch.zeros_like(spec.src, dtype=torch.bool)
            rows = spec.rows if spec.rows is not None else torch.arange(block.shape[0])
            cols = spec.cols if spec.cols is not None else torch.arange(block.shape[1])
            block[rows[:, None], cols[None, :]] = True
            blocks[names[id(spec.src)]] = block
    assert len(blocks) == 7 * len(layers)
    for name, p in model.named_parameters():
        outside = ~blocks.get(name, torch.zeros_like(p, dtype=torch.bool))
        assert torch.equal(p.detach()[outside], dropped_before[name][outside]), name


def test_streamed_statistics_equal_the_all_at_once_ones():
    """G, C and the output norms summed chunk by chunk (float32 products, float64 sums) equal the
    float64 products over all tokens at once."""
    g = torch.Generator().manual_seed(0)
    u_src, u_new = torch.randn(50, 9, generator=g), torch.randn(50, 7, generator=g)
    y = [torch.randn(50, 6, generator=g), torch.randn(50, 4, generator=g)]
    rows = [torch.tensor([5, 0, 2]), None]
    stats = RefitStats(2)
    for a, b, y0, y1 in zip(u_src.split(8), u_new.split(8), y[0].split(8), y[1].split(8), strict=True):
        stats.add(a, b, [y0, y1], rows)
    a, b = u_src.double(), u_new.double()
    torch.testing.assert_close(stats.g, b.T @ b, rtol=1e-6, atol=1e-5)  # float32 products of O(1) values
    torch.testing.assert_close(stats.c, a.T @ b, rtol=1e-6, atol=1e-5)  # float32 products of O(1) values
    expected = torch.stack([y[0].double()[:, rows[0]].square().sum(), y[1].double().square().sum()])
    torch.testing.assert_close(stats.y, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", sorted(TINY_KINDS))
def test_refit_errors_from_statistics_equal_errors_on_tokens(kind):
    """The before/after errors the refit reports from G, C and Y alone equal the relative errors
    computed on the calibration tokens, and the chunk size does not change the fit."""
    source, model, masks, z = _cut(kind)
    cut = _dense(model, masks, z)
    _, other, other_masks, _ = _cut(kind)
    errors = refit_masked(model, masks, z, _calibration(), batch_size=4, damping=DAMPING)
    refit_masked(other, other_masks, z, _calibration(), batch_size=1, damping=DAMPING)
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    refit = _dense(model, masks, z)
    ids = _calibration()
    u_src, u_new = _inputs(source, ids), _inputs(refit, ids)
    plan = {s.name: s for s in export_plan(model, masks, z)[0]}
    source_params, cut_params = dict(source.named_parameters()), dict(cut.named_parameters())
    refit_params = dict(refit.named_parameters())
    for new, old in enumerate(kept_layers(masks, z)):
        for n in REFITTED:
            key, src_key = f"model.layers.{new}.{n}", f"model.layers.{old}.{n}"
            rows = plan[key].rows
            w = source_params[src_key].detach().double()
            y = u_src[src_key] @ (w[rows] if rows is not None else w).T
            for got, fit in zip(errors[key], (cut_params[key], refit_params[key]), strict=True):
                on_tokens = float((y - u_new[key] @ fit.detach().double().T).norm() / y.norm())
                assert got == pytest.approx(on_tokens, rel=1e-4, abs=1e-4), key


@pytest.mark.parametrize("kind", sorted(TINY_KINDS))
def test_masked_model_after_refit_computes_the_refitted_export(kind):
    _, model, masks, z = _cut(kind)
    ids = _calibration(2, 13)
    with torch.no_grad(), masks.fixed(z):
        before = model(ids).logits
    refit_masked(model, masks, z, _calibration(), damping=DAMPING)
    with torch.no_grad(), masks.fixed(z):
        masked = model(ids).logits
    dense = _dense(model, masks, z)
    with torch.no_grad():
        torch.testing.assert_close(masked, dense(ids).logits, rtol=1e-4, atol=1e-4)
    assert (masked - before).abs().max() > 1e-2  # the refit changed the pruned model


def test_refit_needs_a_choice_that_no_longer_changes():
    base = dict(model="m", target="layers=1", data="d", out="o")
    PruneConfig(**base, refit=0.3, freeze_masks=1.0).check()
    PruneConfig(**base, refit=0.3, steps=0).check()
    with pytest.raises(ShearError, match="freeze-masks 1"):
        PruneConfig(**base, refit=0.3, freeze_masks=0.5).check()
    with pytest.raises(ShearError, match="init importance"):
        PruneConfig(**base, refit=0.3, freeze_masks=1.0, init="uniform").check()
    with pytest.raises(ShearError, match="refit"):
        PruneConfig(**base, refit=-1.0, freeze_masks=1.0).check()
    with pytest.raises(ShearError, match="refit_sequences must be positive"):
        PruneConfig(**base, refit=0.3, freeze_masks=1.0, refit_sequences=0).check()


def test_one_shot_with_refit_exports_the_refitted_model(tiny_source, data_dir, tmp_path):
    """`shear prune --one-shot --refit`: the export is the refitted masked model, not the cut, and
    the reconstruction errors (below the cut's) are recorded."""
    prune_tiny(tiny_source, data_dir, tmp_path / "cut", steps=0)
    prune_tiny(tiny_source, data_dir, tmp_path / "refit", steps=0, refit=DAMPING, refit_sequences=12)
    out = tmp_path / "refit"
    record = json.loads((out / "refit.json").read_text())
    assert record["damping"] == DAMPING and len(record["error"]) == 7 * 2  # 2 kept layers
    # the refit's 12 rows start with the importance's 8
    importance = json.loads((out / "calibration.json").read_text())
    assert sum(map(len, record["rows"].values())) == 12
    assert all(record["rows"][d][: len(r)] == r for d, r in importance.items())
    assert all(e["refit"] <= e["cut"] for e in record["error"].values())
    evals = json.loads((out / "evals.json").read_text())
    assert evals["exported"] == pytest.approx(evals["masked"], abs=1e-4)
    assert evals["exported"] != json.loads((tmp_path / "cut" / "evals.json").read_text())["exported"]
    assert (out / "calibration.json").read_text() == (tmp_path / "cut" / "calibration.json").read_text()


def test_pruning_run_trains_from_the_refitted_weights(tiny_source, data_dir, tmp_path):
    out = tmp_path / "run"
    prune_tiny(tiny_source, data_dir, out, steps=2, freeze_masks=1.0, refit=DAMPING, export=False)
    assert (out / "refit.json").exists()
    log = [json.loads(x) for x in open(out / "log.jsonl") if '"loss"' in x]
    assert len(log) == 2 and all(math.isfinite(x["loss"]) for x in log)


_DISTRIBUTED = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor
    from shear.parallel import Parallel
    from shear.refit import refit_masked
    from test_refit import DAMPING, KIND, _calibration, _cut

    strategy, out = sys.argv[1:3]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    parallel = Parallel(strategy, rank, dist.get_world_size(), torch.device("cpu"))
    _, model, masks, z = _cut(KIND, shard=parallel.shard)
    errors = refit_masked(model, masks, z, _calibration(), batch_size=2, damping=DAMPING, distributed=True)
    assert all(isinstance(p, DTensor) for p in model.parameters()) == (strategy == "fsdp")
    state = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
             for n, p in model.named_parameters()}
    save_file(state, f"{out}/rank{rank}.safetensors")
    with open(f"{out}/errors{rank}.json", "w") as f:
        json.dump(errors, f)
    dist.destroy_process_group()
    """
)
KIND = "llama_gqa_bias_untied"  # GQA with biases


@pytest.mark.parametrize("strategy,port", [("ddp", 29675), ("fsdp", 29676)])
def test_refit_on_two_ranks_equals_one_process(strategy, port, tmp_path):
    """Under torchrun (2 gloo ranks) each rank streams half the sequences, the statistics are
    all-reduced, and every rank ends with the single-process refit's weights and errors; under
    FSDP the model stays sharded and the new weights are in its shards."""
    from safetensors.torch import load_file

    script = tmp_path / "refit_ranks.py"
    script.write_text(_DISTRIBUTED)
    tests = str(Path(__file__).resolve().parent)
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         str(script), strategy, str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, model, masks, z = _cut(KIND)
    errors = refit_masked(model, masks, z, _calibration(), batch_size=4, damping=DAMPING)
    one = dict(model.named_parameters())
    for rank in range(2):
        state = load_file(tmp_path / f"rank{rank}.safetensors")
        assert state.keys() == one.keys()
        for name, p in one.items():
            torch.testing.assert_close(state[name], p.detach(), rtol=1e-5, atol=1e-6, msg=name)
        got = json.loads((tmp_path / f"errors{rank}.json").read_text())
        assert got.keys() == errors.keys()
        for key, (before, after) in errors.items():
            assert got[key] == pytest.approx([before, after], rel=1e-4, abs=1e-5), key


def test_refit_shares_need_a_sequence_per_chunk_on_every_rank(monkeypatch):
    """Every rank streams as many chunks (FSDP gathers in lockstep): too few sequences for the
    ranks are refused by the same rule on every rank, before any collective."""
    import shear.refit as refit

    monkeypatch.setattr(refit.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(refit.dist, "get_rank", lambda: 0)
    with pytest.raises(ShearError, match="give at least 4 sequences"):
        refit._chunks(torch.zeros(3, 5, dtype=torch.long), 1, distributed=True)
    assert [len(c) for c in refit._chunks(torch.zeros(5, 5, dtype=torch.long), 2, distributed=True)] == [2, 1]
    monkeypatch.setattr(refit.dist, "get_rank", lambda: 1)
    assert [len(c) for c in refit._chunks(torch.zeros(5, 5, dtype=torch.long), 2, distributed=True)] == [1, 1]
