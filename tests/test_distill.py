"""Distillation (shear.distill): the loss against full logits, the teacher's sources and isolation."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TARGETS, make_tiny

from shear.distill import Distiller, build_distiller, lm_loss, recorded_source
from shear.errors import ShearError
from shear.patch import apply_masks


def _full_logits_loss(student, teacher, ids, weight, temperature):
    """(1 - A) * HF's LM loss + A * T^2 * KL over the same positions, from full logits."""
    s = student(ids).logits[:, :-1].flatten(0, 1).double()
    with torch.no_grad():
        t = teacher(ids).logits[:, :-1].flatten(0, 1).double()
    ce = F.cross_entropy(s, ids[:, 1:].flatten())
    kl = F.kl_div(
        torch.log_softmax(s / temperature, -1),
        torch.log_softmax(t / temperature, -1),
        log_target=True,
        reduction="batchmean",
    )
    return (1 - weight) * ce + weight * temperature**2 * kl


@pytest.mark.parametrize("weight,temperature", [(0.0, 1.0), (0.5, 2.0), (1.0, 1.0)])
def test_loss_equals_the_full_logits_loss_on_a_masked_student(tiny_kind, tokens, weight, temperature):
    teacher = make_tiny(tiny_kind, seed=1)
    student = make_tiny(tiny_kind)
    apply_masks(student, TINY_TARGETS[tiny_kind])  # the hidden mask too
    student.eval()  # deterministic masks: both losses see the same ones
    distiller = Distiller(teacher, weight, temperature)
    fused = lm_loss(student, tokens, distiller)
    expect = _full_logits_loss(student, teacher, tokens, weight, temperature)
    torch.testing.assert_close(fused.double(), expect, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(fused, list(student.parameters()), allow_unused=True)
    ref = torch.autograd.grad(expect, list(student.parameters()), allow_unused=True)
    for g, r in zip(grads, ref, strict=True):
        if r is not None:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_no_distiller_is_the_hugging_face_loss(tokens):
    model = make_tiny("llama_mha_tied")
    assert torch.equal(lm_loss(model, tokens, None), model(tokens, labels=tokens).loss)


def _ctx(device="cpu"):
    said = []
    return SimpleNamespace(device=torch.device(device), compute_dtype=torch.float32, say=said.append,
                           said=said)  # fmt: skip


def _cfg(**kw):
    base = dict(distill_weight=0.5, distill_temperature=2.0, teacher=None, model="unused")
    return SimpleNamespace(**{**base, **kw})


def test_teacher_sources(tiny_source, tmp_path):
    from shear.loading import load_source

    student, _ = load_source(tiny_source)
    assert build_distiller(_cfg(distill_weight=0.0), _ctx(), student, copy_student=True) is None
    ctx = _ctx()
    copied = build_distiller(_cfg(), ctx, student, copy_student=True)
    assert copied.teacher is not student and "frozen copy" in ctx.said[0] and "MiB" in ctx.said[0]
    for a, b in zip(copied.teacher.parameters(), student.parameters(), strict=True):
        assert torch.equal(a, b) and not a.requires_grad and b.requires_grad
    # training a pruned model: the source its export records, unless --teacher is given
    export = tmp_path / "export"
    shutil.copytree(tiny_source, export)
    with pytest.raises(ShearError, match="needs a teacher: give --teacher"):
        build_distiller(_cfg(model=str(export)), _ctx(), student, copy_student=False)
    (export / "shear_export.json").write_text(json.dumps({"source_model": tiny_source}))
    assert recorded_source(str(export)) == tiny_source
    ctx = _ctx()
    assert build_distiller(_cfg(model=str(export)), ctx, student, copy_student=False) is not None
    assert tiny_source in ctx.said[0]
    # a teacher with another vocabulary cannot teach this student
    other = make_tiny("llama_mha_tied")
    other_dir = tmp_path / "other"
    other.save_pretrained(other_dir)
    with pytest.raises(ShearError, match="vocabulary"):
        build_distiller(_cfg(teacher=str(other_dir)), _ctx(), student, copy_student=False)


def test_cli_options_reach_the_run(tiny_source, data_dir, tmp_path, capsys):
    from shear.cli import main

    out = tmp_path / "run"
    args = ["train", "--model", tiny_source, "--data", data_dir, "--out", str(out), "--steps", "1",
            "--batch-size", "2", "--seq-len", "16", "--fixed", "--no-export", "--distill-weight", "0.5",
            "--distill-temperature", "2", "--teacher", tiny_source]  # fmt: skip
    assert main(args) == 0
    options = json.loads((out / "config.json").read_text())
    assert (options["distill_weight"], options["distill_temperature"], options["teacher"]) == (
        0.5,
        2.0,
        tiny_source,
    )
    assert "distillation: teacher" in capsys.readouterr().err
