"""Finalize the masks and export a dense Hugging Face checkpoint of the target architecture.

Finalization reads the deterministic masks (exactly the target count of units per row),
keeps the units whose mask is non-zero, folds the kept mask values into the weights and
slices every tensor, so that the exported model computes exactly what the masked model
computes under the deterministic masks:

* o_proj: columns of kept heads scaled by ``kv * head``; rows of kept hidden dimensions
  scaled by ``layer * head_layer * hidden`` (its bias too).
* up_proj: rows of kept channels scaled by ``intermediate`` (its bias too).
* down_proj: rows scaled by ``layer * mlp * hidden`` (its bias too).
* RMSNorm weights: scaled by ``hidden``; the embedding and LM head are only sliced
  (the masked model never masks the embedding output, so neither does the export).

:func:`export_plan` describes every output tensor as a gather with optional row and
column scales; :func:`gather` is the plain-PyTorch reference that executes one entry.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from shear.arch import Arch
from shear.errors import ShearError
from shear.masks import HardConcreteMasks, product


@dataclass
class GatherSpec:
    """One output tensor: ``out[i, j] = src[rows[i], cols[j]] * row_scale[i] * col_scale[j]``.

    For 1-D tensors only ``rows`` / ``row_scale`` apply. ``None`` means every index, or no
    scale. Scales are float32; the product is formed in float32, then cast to ``dtype``.

    Attributes:
        name: key in the output state dict.
        src: the source tensor.
        rows: kept indices along dimension 0 (sorted, unique), or None.
        cols: kept indices along dimension 1, or None.
        row_scale: ``[len(rows)]`` factors, or None.
        col_scale: ``[len(cols)]`` factors, or None.
        dtype: dtype of the output tensor.
    """

    name: str
    src: torch.Tensor
    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    row_scale: torch.Tensor | None = None
    col_scale: torch.Tensor | None = None
    dtype: torch.dtype | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the output tensor."""
        shape = list(self.src.shape)
        if self.rows is not None:
            shape[0] = len(self.rows)
        if self.cols is not None:
            shape[1] = len(self.cols)
        return tuple(shape)


def gather(spec: GatherSpec) -> torch.Tensor:
    """Execute one :class:`GatherSpec` with plain PyTorch (the reference path).

    Returns:
        A contiguous CPU tensor of ``spec.dtype`` (default: the source's dtype).
    """
    t = spec.src.detach()
    if spec.rows is not None:
        t = t.index_select(0, spec.rows.to(t.device))
    if spec.cols is not None:
        t = t.index_select(1, spec.cols.to(t.device))
    dtype = spec.dtype or spec.src.dtype
    if spec.row_scale is not None or spec.col_scale is not None:
        t = t.float()
        if spec.row_scale is not None:
            rs = spec.row_scale.to(t.device, torch.float32)
            t = t * (rs[:, None] if t.dim() == 2 else rs)
        if spec.col_scale is not None:
            t = t * spec.col_scale.to(t.device, torch.float32)[None, :]
    return t.to(device="cpu", dtype=dtype).contiguous()


def _kept(z: torch.Tensor | None, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sorted kept indices of a 1-D mask and their values (all indices, no scale, if None)."""
    if z is None:
        return torch.arange(size), None
    idx = torch.nonzero(z.detach().cpu() != 0).flatten()
    return idx, z.detach().cpu().float()[idx]


def _uniform(counts: list[int], what: str, expected: int) -> None:
    if any(c != expected for c in counts):
        raise ShearError(
            f"cannot export: kept {what} per layer are {counts}, but the target needs {expected} in "
            "every layer (use the deterministic masks)"
        )


def export_plan(
    model: nn.Module, masks: HardConcreteMasks, z: dict[str, torch.Tensor] | None = None
) -> tuple[list[GatherSpec], Arch]:
    """Plan the finalized tensors of ``model`` under mask values ``z``.

    Args:
        model: the masked (or unmasked) source model; its weights are read, not changed.
        masks: the run's masks.
        z: mask values by type; default the deterministic masks.

    Returns:
        The gather specs (state-dict order, the LM head left out when tied) and the
        resulting architecture.

    Raises:
        ShearError: the kept units do not form a uniform architecture equal to the target.
    """
    src = masks.source
    if z is None:
        with torch.no_grad():
            z = masks.deterministic()
    z = {k: v.detach().cpu().float() for k, v in z.items()}
    decoder = model.base_model
    n, dh = src.heads_per_group, src.head_dim

    hid, hid_scale = _kept(z.get("hidden"), src.hidden)
    layers, layer_scale = _kept(z.get("layer"), src.layers)
    plan: list[GatherSpec] = [GatherSpec("model.embed_tokens.weight", decoder.embed_tokens.weight, cols=hid)]
    kv_counts, head_counts, int_counts = [], [], []
    for new, old in enumerate(layers.tolist()):
        lz = layer_scale[new] if layer_scale is not None else None
        layer = decoder.layers[old]
        attn, mlp = layer.self_attn, layer.mlp
        groups, g_scale = _kept(z["kv"][old] if "kv" in z else None, src.kv_heads)
        within, j_scale = _kept(z["head"][old] if "head" in z else None, n)
        kv_counts.append(len(groups))
        head_counts.append(len(within))
        heads = (groups[:, None] * n + within[None, :]).flatten()
        head_scale = product(
            g_scale[:, None] if g_scale is not None else None,
            j_scale[None, :] if j_scale is not None else None,
        )
        ar = torch.arange(dh)
        q_rows = (heads[:, None] * dh + ar).flatten()
        kv_rows = (groups[:, None] * dh + ar).flatten()
        o_col_scale = None
        if head_scale is not None:
            o_col_scale = head_scale.expand(len(groups), len(within)).reshape(-1, 1).expand(-1, dh).flatten()
        head_layer = z["head_layer"][old] if "head_layer" in z else None
        mlp_z = z["mlp"][old] if "mlp" in z else None
        attn_out = product(hid_scale, lz, head_layer)
        mlp_out = product(hid_scale, lz, mlp_z)
        channels, c_scale = _kept(z["intermediate"][old] if "intermediate" in z else None, src.intermediate)
        int_counts.append(len(channels))

        pre = f"model.layers.{new}."
        entries = [
            ("self_attn.q_proj", attn.q_proj, q_rows, hid, None, None),
            ("self_attn.k_proj", attn.k_proj, kv_rows, hid, None, None),
            ("self_attn.v_proj", attn.v_proj, kv_rows, hid, None, None),
            ("self_attn.o_proj", attn.o_proj, hid, q_rows, attn_out, o_col_scale),
            ("mlp.gate_proj", mlp.gate_proj, channels, hid, None, None),
            ("mlp.up_proj", mlp.up_proj, channels, hid, c_scale, None),
            ("mlp.down_proj", mlp.down_proj, hid, channels, mlp_out, None),
        ]
        for name, lin, rows, cols, rs, cs in entries:
            rs = _full(rs, len(rows))
            plan.append(GatherSpec(pre + name + ".weight", lin.weight, rows, cols, rs, cs))
            if lin.bias is not None:
                plan.append(GatherSpec(pre + name + ".bias", lin.bias, rows, None, rs))
        for name in ("input_layernorm", "post_attention_layernorm"):
            plan.append(GatherSpec(pre + name + ".weight", getattr(layer, name).weight, hid, None, hid_scale))
    plan.append(GatherSpec("model.norm.weight", decoder.norm.weight, hid, None, hid_scale))
    if not src.tied:
        plan.append(GatherSpec("lm_head.weight", model.lm_head.weight, None, hid))

    target = masks.target
    _uniform(kv_counts, "KV groups", target.kv_heads)
    _uniform(head_counts, "query heads per group", target.heads_per_group)
    _uniform(int_counts, "MLP channels", target.intermediate)
    arch = src.replace(
        layers=len(layers),
        hidden=len(hid),
        heads=target.kv_heads * target.heads_per_group,
        kv_heads=target.kv_heads,
        intermediate=target.intermediate,
    )
    if arch != target:
        raise ShearError(f"cannot export: the kept units give {arch}, not the target {target}")
    return plan, arch


def _full(scale: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """A per-row scale of the given length (a layer-level scalar is broadcast)."""
    if scale is None or scale.dim() == 1:
        return scale
    return scale.expand(length).clone()


def export_config(model: nn.Module, arch: Arch, kept_layers: list[int]) -> Any:
    """The source config with the target's sizes (and per-layer lists sliced to kept layers)."""
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = arch.layers
    config.hidden_size = arch.hidden
    config.num_attention_heads = arch.heads
    config.num_key_value_heads = arch.kv_heads
    config.intermediate_size = arch.intermediate
    config.head_dim = arch.head_dim
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in kept_layers]
    if getattr(config, "max_window_layers", None) is not None:
        config.max_window_layers = min(config.max_window_layers, arch.layers)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [arch.architecture]
    return config


def kept_layers(masks: HardConcreteMasks, z: dict[str, torch.Tensor] | None = None) -> list[int]:
    """Source indices of the layers the export keeps, in order."""
    z = z if z is not None else masks.deterministic()
    if "layer" not in z:
        return list(range(masks.source.layers))
    return torch.nonzero(z["layer"].detach().cpu() != 0).flatten().tolist()


def export_pruned(
    model: nn.Module,
    masks: HardConcreteMasks,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Finalize the masks and write a Hugging Face folder of the target architecture.

    The folder (model.safetensors, config.json, generation_config.json, tokenizer) is
    written under a temporary name next to ``out_dir`` and renamed into place, so a crash
    never leaves a half-written export. It loads with plain ``from_pretrained``.

    Args:
        model: the masked source model.
        masks: its masks (the deterministic masks are used).
        out_dir: destination folder; must not exist unless ``overwrite``.
        tokenizer: saved alongside if given.
        dtype: dtype of the saved weights (default: each source tensor's dtype).
        overwrite: replace an existing ``out_dir``.

    Returns:
        The output folder.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ShearError(f"export destination {out} already exists (pass overwrite=True to replace it)")
    with torch.no_grad():
        z = masks.deterministic()
    plan, arch = export_plan(model, masks, z)
    config = export_config(model, arch, kept_layers(masks, z))
    if dtype is not None:
        config.dtype = dtype
    for spec in plan:
        spec.dtype = dtype
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise ShearError(f"cannot write the export to {out.parent}: {e}") from e
    try:
        tensors = {spec.name: gather(spec) for spec in plan}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "shear_export.json").write_text(
            json.dumps({"source": masks.source.summary(), "target": arch.summary()}, indent=2) + "\n"
        )
        _replace_dir(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise ShearError(f"writing the export to {out} failed: {e}") from e
        raise
    return out


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move ``tmp`` to ``out``; an existing ``out`` is swapped out first, then deleted."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
