"""A pruning step against a plain training step of the same Hugging Face model and batch.

Both steps are complete optimiser steps: forward, backward, gradient clipping, AdamW.
The pruning step adds what shear adds: a fresh sample of every mask, the masked ops, the
Lagrangian, the log_alpha and multiplier groups and the log_alpha clamp. With a distillation
weight both steps replace the LM loss by shear's distillation loss from a frozen copy of
the source (:mod:`shear.distill`), as ``--distill-weight`` does.
"""

from __future__ import annotations

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from shear.distill import Distiller, lm_loss
from shear.lagrangian import Lagrangian, build_optimizer
from shear.patch import apply_masks
from shear.prune import PruningObjective

#: SmolLM2-135M's shape (30 layers, hidden 576, 9 / 3 heads, intermediate 1536, vocab 49152).
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)  # fmt: skip
TARGET = "layers=24,hidden=384,heads=6,kv_heads=2,intermediate=1024"


def build(
    layers: int | None = None, device: str = "cpu", distill_weight: float = 0.0, temperature: float = 1.0
):
    """``(plain_step, prune_step)`` closures over two copies of one random model.

    Args:
        layers: decoder layers (default: SmolLM2's 30).
        device: where to run.
        distill_weight: > 0: both steps distil from a frozen copy of the model (in bf16 on GPU,
            the training dtype there) with this weight and ``temperature``.
    """
    torch.manual_seed(0)
    cfg = LlamaConfig(**dict(SMOLLM2, num_hidden_layers=layers or SMOLLM2["num_hidden_layers"]))
    plain = LlamaForCausalLM(cfg).to(device).train()
    pruned = copy.deepcopy(plain)
    distiller = None
    if distill_weight > 0:
        teacher = copy.deepcopy(plain).to(torch.bfloat16 if device == "cuda" else torch.float32)
        distiller = Distiller(teacher, distill_weight, temperature)
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    target = TARGET if layers is None else TARGET.replace("layers=24", f"layers={max(1, layers * 4 // 5)}")
    masks = apply_masks(pruned, target)
    lagrangian = Lagrangian(masks, warmup_steps=10).to(device)
    objective = PruningObjective(pruned, masks, lagrangian)
    objective.distiller = distiller
    opt_prune = build_optimizer(pruned, masks, lagrangian)
    clip_prune = list(pruned.parameters()) + list(masks.parameters())
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device == "cuda"
        else torch.autocast("cpu", enabled=False)
    )

    def plain_step(ids: torch.Tensor) -> None:
        with autocast:
            loss = lm_loss(plain, ids, distiller)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt_plain.step()
        opt_plain.zero_grad(set_to_none=True)

    def prune_step(ids: torch.Tensor) -> None:
        with autocast:
            lm, lag = objective(ids, step=5)
        (lm + lag).backward()
        torch.nn.utils.clip_grad_norm_(clip_prune, 1.0)
        opt_prune.step()
        opt_prune.zero_grad(set_to_none=True)
        masks.clamp_()

    return plain_step, prune_step


def batch(size: int = 4, seq: int = 128, device: str = "cpu") -> torch.Tensor:
    """Random token ids."""
    return torch.randint(
        0, SMOLLM2["vocab_size"], (size, seq), generator=torch.Generator().manual_seed(0)
    ).to(device)
