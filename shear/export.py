"""Finalize the masks and export a dense Hugging Face checkpoint of the target architecture.

Finalization reads the deterministic masks (exactly the target count of units per row),
keeps the units whose mask is non-zero, folds the kept mask values into the weights and
slices every tensor, so that the exported model computes exactly what the masked model
computes under the deterministic masks:

* q_proj rows / o_proj columns: for each kept KV group, its own kept query heads, packed
  group after group (the Hugging Face GQA layout of the target); k_proj / v_proj rows:
  the kept KV groups.
* o_proj: columns of kept heads scaled by ``kv * head``; rows of kept hidden dimensions
  scaled by ``layer * head_layer * hidden`` (its bias too).
* up_proj: rows of kept channels scaled by ``intermediate`` (its bias too).
* down_proj: rows scaled by ``layer * mlp * hidden`` (its bias too).
* RMSNorm weights: scaled by ``hidden``; the embedding and LM head are only sliced
  (the masked model never masks the embedding output, so neither does the export).

:func:`export_plan` describes every output tensor as a gather with optional row and
column scales; :func:`gather` is the plain-PyTorch reference that executes one entry.

Two backends write the weights, and the export always says which one it used (a
``shear: export backend: ...`` line on stderr and the ``backend`` / ``backend_detail``
fields of ``shear_export.json``):

* ``cpp``: the C++ extension (``csrc/gather.cpp``, see :mod:`shear.extension`) gathers
  every tensor in one multi-threaded pass straight into its place in the safetensors
  file (header written here, tensor data written with ``pwrite`` from small per-thread
  buffers), byte for byte what :func:`gather` gives. fp32, fp16 and bf16 contiguous
  tensors. CUDA sources are gathered on the device by :func:`gather` and copied to the
  host in batches of about 1 GiB, then written by the extension (untested: no GPU here).
* ``torch``: :func:`gather` per tensor, then ``safetensors.torch.save_file`` (the reference).

``backend="auto"`` (the default; ``$SHEAR_EXPORT_BACKEND`` overrides it) uses ``cpp``
when the extension loads or builds and otherwise states
``torch (extension unavailable: <reason>)``; ``backend="cpp"`` fails with the reason.
Both backends lay files out as the safetensors library does (tensors ordered by dtype,
then name; the header padded with spaces to 8 bytes), so their files are identical, and
both split weights above ``max_shard_size`` (default 5GB, as Hugging Face's hub and
transformers 4 did) into ``model-0000k-of-0000n.safetensors`` shards with a
``model.safetensors.index.json``, as ``save_pretrained`` writes them.
"""

from __future__ import annotations

import copy
import json
import os
import re
import struct
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor

from shear.arch import Arch
from shear.checkpoint import atomic_dir
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


#: Backends of :func:`export_pruned`; ``auto`` picks ``cpp`` when the extension is available.
BACKENDS: tuple[str, ...] = ("auto", "cpp", "torch")
#: Environment variable that sets the backend when none is passed.
BACKEND_ENV = "SHEAR_EXPORT_BACKEND"
#: Default shard size limit (decimal units, as Hugging Face parses "5GB").
DEFAULT_MAX_SHARD_SIZE = "5GB"
#: Dtypes the C++ extension reads and writes.
CPP_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
# CUDA sources are gathered on the device and copied to the host in batches of this size.
_CUDA_BATCH_BYTES = 1 << 30
# safetensors dtype names, and the order the library writes tensors in (larger first).
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_ST_RANK = {"F64": 3, "F32": 2, "BF16": 1, "F16": 0}


@dataclass(frozen=True)
class Backend:
    """The backend an export uses.

    Attributes:
        name: ``"cpp"`` or ``"torch"``.
        detail: what the export reports, e.g. ``"cpp (C++ gather extension, setup.py
            build, 2 threads)"`` or ``"torch (extension unavailable: ...)"``.
        module: the extension module (``cpp`` only).
    """

    name: str
    detail: str
    module: ModuleType | None = None


def resolve_backend(backend: str | None = None, plan: Sequence[GatherSpec] = ()) -> Backend:
    """Choose the export backend.

    Args:
        backend: ``"auto"``, ``"cpp"`` or ``"torch"``; None reads ``$SHEAR_EXPORT_BACKEND``
            (default ``"auto"``).
        plan: the tensors to write; ``auto`` takes ``torch`` (and says why) when the
            extension cannot handle one of them (dtype, layout).

    Returns:
        The :class:`Backend`.

    Raises:
        ShearError: an unknown backend, or ``cpp`` when the extension is unavailable or
            cannot handle the plan.
    """
    from shear.extension import load_extension

    choice = backend if backend is not None else os.environ.get(BACKEND_ENV, "auto")
    choice = choice.strip().lower()
    if choice not in BACKENDS:
        where = f"${BACKEND_ENV}" if backend is None else "backend"
        raise ShearError(f"unknown export {where} {choice!r}; choose one of {', '.join(BACKENDS)}")
    if choice == "torch":
        return Backend("torch", "torch (requested)")
    unsupported = next((why for why in map(_cpp_limit, plan) if why), None)
    if unsupported and choice == "cpp":
        raise ShearError(f"the C++ export backend cannot write this: {unsupported}; use backend='torch'")
    if unsupported:
        return Backend("torch", f"torch (C++ extension not applicable: {unsupported})")
    try:
        module = load_extension()
    except ShearError as e:
        if choice == "cpp":
            raise
        return Backend("torch", f"torch (extension unavailable: {e})")
    from shear.extension import extension_status

    origin = extension_status().origin
    return Backend("cpp", f"cpp (C++ gather extension, {origin}, {torch.get_num_threads()} threads)", module)


def _cpp_limit(spec: GatherSpec) -> str | None:
    """Why the extension cannot execute ``spec``, or None."""
    dtype = spec.dtype or spec.src.dtype
    if spec.src.dtype not in CPP_DTYPES or dtype not in CPP_DTYPES:
        return f"{spec.name} is {spec.src.dtype} -> {dtype}; the extension handles fp32, fp16 and bf16"
    if not spec.src.is_contiguous():
        return f"{spec.name} is not contiguous"
    if spec.src.device.type not in ("cpu", "cuda"):
        return f"{spec.name} is on the {spec.src.device.type} device"
    return None


def check_spec(spec: GatherSpec) -> GatherSpec:
    """Validate one spec and return it normalised for the C++ extension.

    Indices become contiguous int64 CPU vectors and scales contiguous float32 CPU vectors
    (the conversion :func:`gather` makes too, so results stay identical).

    Args:
        spec: the spec to check.

    Returns:
        A copy of ``spec`` with normalised indices and scales.

    Raises:
        ShearError: a source that is not 1-D or 2-D, column indices on a 1-D tensor,
            indices that are not integers, out of range, unsorted or repeated, scales whose
            length differs from their indices, or a non-floating output dtype.
    """
    src = spec.src
    if src.dim() not in (1, 2):
        raise ShearError(f"{spec.name}: only 1-D and 2-D tensors can be gathered, not {tuple(src.shape)}")
    if src.dim() == 1 and (spec.cols is not None or spec.col_scale is not None):
        raise ShearError(f"{spec.name}: a 1-D tensor takes no column indices or column scale")
    dtype = spec.dtype or src.dtype
    if not dtype.is_floating_point:
        raise ShearError(f"{spec.name}: the output dtype must be floating point, got {dtype}")
    rows = _check_index(spec.name, "rows", spec.rows, src.shape[0])
    cols = _check_index(spec.name, "cols", spec.cols, src.shape[1]) if src.dim() == 2 else None
    n_rows = len(rows) if rows is not None else src.shape[0]
    n_cols = (len(cols) if cols is not None else src.shape[1]) if src.dim() == 2 else 1
    row_scale = _check_scale(spec.name, "row_scale", spec.row_scale, n_rows)
    col_scale = _check_scale(spec.name, "col_scale", spec.col_scale, n_cols)
    return replace(spec, rows=rows, cols=cols, row_scale=row_scale, col_scale=col_scale)


def _check_index(name: str, what: str, idx: torch.Tensor | None, size: int) -> torch.Tensor | None:
    if idx is None:
        return None
    if not isinstance(idx, torch.Tensor) or idx.dim() != 1:
        raise ShearError(f"{name}: {what} must be a 1-D tensor of indices")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise ShearError(f"{name}: {what} must hold integers, got {idx.dtype}")
    idx = idx.detach().to("cpu", torch.int64).contiguous()
    if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= size):
        bad = idx[(idx < 0) | (idx >= size)][0].item()
        raise ShearError(f"{name}: {what} index {bad} is out of range for size {size}")
    if len(idx) > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise ShearError(f"{name}: {what} must be sorted and unique (strictly increasing)")
    return idx


def _check_scale(name: str, what: str, scale: torch.Tensor | None, length: int) -> torch.Tensor | None:
    if scale is None:
        return None
    if not isinstance(scale, torch.Tensor) or scale.dim() != 1:
        raise ShearError(f"{name}: {what} must be a 1-D tensor")
    if len(scale) != length:
        raise ShearError(f"{name}: {what} has {len(scale)} entries but there are {length} kept indices")
    if not scale.dtype.is_floating_point:
        raise ShearError(f"{name}: {what} must be floating point, got {scale.dtype}")
    return scale.detach().to("cpu", torch.float32).contiguous()


def _cpp_args(specs: Sequence[GatherSpec]) -> tuple[list, ...]:
    return (
        [s.src.detach() for s in specs],
        [s.rows for s in specs],
        [s.cols for s in specs],
        [s.row_scale for s in specs],
        [s.col_scale for s in specs],
    )


def _host_batches(specs: Sequence[GatherSpec]) -> list[list[GatherSpec]]:
    """Split ``specs`` into batches whose CUDA tensors are gathered on the device (by the
    reference) and copied to the host, at most about 1 GiB of them per batch; CPU specs
    pass through untouched."""
    batches: list[list[GatherSpec]] = [[]]
    pending = 0
    for spec in specs:
        if spec.src.device.type == "cpu":
            batches[-1].append(spec)
            continue
        size = _nbytes(spec)
        if pending and pending + size > _CUDA_BATCH_BYTES:
            batches.append([])
            pending = 0
        batches[-1].append(spec)
        pending += size
    return batches


def _to_host(spec: GatherSpec) -> GatherSpec:
    if spec.src.device.type == "cpu":
        return spec
    return GatherSpec(spec.name, gather(spec), dtype=spec.dtype)


def gather_cpp(specs: Sequence[GatherSpec], num_threads: int | None = None) -> list[torch.Tensor]:
    """Execute specs with the C++ extension into new tensors (byte for byte :func:`gather`).

    Args:
        specs: the gathers.
        num_threads: worker threads (default ``torch.get_num_threads()``).

    Returns:
        One contiguous CPU tensor per spec.

    Raises:
        ShearError: bad input (see :func:`check_spec`), a dtype or layout the extension
            does not handle, or the extension is unavailable.
    """
    specs = [check_spec(s) for s in specs]
    limit = next((why for why in map(_cpp_limit, specs) if why), None)
    if limit:
        raise ShearError(f"the C++ gather cannot execute this: {limit}")
    from shear.extension import load_extension

    ext = load_extension()
    threads = num_threads or torch.get_num_threads()
    outs: list[torch.Tensor] = []
    for batch in _host_batches(specs):
        batch = [_to_host(s) for s in batch]
        res = [torch.empty(s.shape, dtype=s.dtype or s.src.dtype) for s in batch]
        _call(ext.gather_into, *_cpp_args(batch), res, threads)
        outs += res
    return outs


def _call(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except RuntimeError as e:  # the extension's TORCH_CHECKs, pwrite errors
        raise ShearError(str(e).split("\nException raised from")[0]) from e


def _nbytes(spec: GatherSpec) -> int:
    n = 1
    for s in spec.shape:
        n *= s
    return n * (spec.dtype or spec.src.dtype).itemsize


def parse_size(size: int | str) -> int:
    """Bytes in a size such as ``5GB`` (10^9), ``500MiB`` (2^20) or an int.

    Raises:
        ShearError: an unreadable size.
    """
    if isinstance(size, int) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ShearError(f"cannot read the size {size!r} (write e.g. 5GB, 500MB, 2GiB or bytes)")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0])
    value = int(float(m.group(1)) * base**power)
    if value <= 0:
        raise ShearError(f"the size {size!r} must be positive")
    return value


def shard(
    specs: Sequence[GatherSpec], max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
) -> list[list[GatherSpec]]:
    """Split specs into shards as Hugging Face does: in order, a new shard when the next
    tensor would pass the limit, a tensor above the limit alone in its own shard.

    Returns:
        The shards (one when everything fits).
    """
    limit = parse_size(max_shard_size)
    shards: list[list[GatherSpec]] = []
    current: list[GatherSpec] = []
    size = 0
    for spec in specs:
        n = _nbytes(spec)
        if n > limit:
            shards.append([spec])
            continue
        if current and size + n > limit:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += n
    if current or not shards:
        shards.append(current)
    return shards


def safetensors_layout(
    specs: Sequence[GatherSpec], metadata: dict[str, str] | None = None
) -> tuple[bytes, list[tuple[GatherSpec, int]]]:
    """The file layout the safetensors library writes for these tensors.

    Args:
        specs: the tensors (any order).
        metadata: the ``__metadata__`` entry.

    Returns:
        The header (length prefix, JSON, space padding to 8 bytes) and each spec with its
        byte offset from the start of the file, in file order (dtype, larger first, then name).
    """

    def key(s: GatherSpec) -> tuple[int, str]:
        return (-_ST_RANK[_st_dtype(s)], s.name)

    ordered = sorted(specs, key=key)
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    pos = 0
    for s in ordered:
        n = _nbytes(s)
        header[s.name] = {"dtype": _st_dtype(s), "shape": list(s.shape), "data_offsets": [pos, pos + n]}
        pos += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    offsets, pos = [], start
    for s in ordered:
        offsets.append((s, pos))
        pos += _nbytes(s)
    return struct.pack("<Q", len(text)) + text, offsets


def _st_dtype(spec: GatherSpec) -> str:
    dtype = spec.dtype or spec.src.dtype
    if dtype not in _ST_DTYPES:
        raise ShearError(f"{spec.name}: cannot write dtype {dtype} (float64, float32, bfloat16 or float16)")
    return _ST_DTYPES[dtype]


def write_safetensors(
    path: str | os.PathLike,
    specs: Sequence[GatherSpec],
    backend: Backend | str | None = None,
    metadata: dict[str, str] | None = None,
    num_threads: int | None = None,
) -> Path:
    """Gather ``specs`` into one safetensors file, atomically (temp file, fsync, rename).

    Args:
        path: the file to write (replaced if it exists).
        specs: the tensors; names must be unique.
        backend: a :class:`Backend`, or a name for :func:`resolve_backend`.
        metadata: the header's ``__metadata__`` (default ``{"format": "pt"}``).
        num_threads: C++ worker threads (default ``torch.get_num_threads()``).

    Returns:
        The written file.

    Raises:
        ShearError: bad specs, a backend that cannot run, or a failed write (nothing is
            left behind).
    """
    path = Path(path)
    specs = [check_spec(s) for s in specs]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ShearError(f"duplicate tensor names: {sorted({n for n in names if names.count(n) > 1})}")
    if not isinstance(backend, Backend):
        backend = resolve_backend(backend, specs)
    metadata = {"format": "pt"} if metadata is None else metadata
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as e:
        raise ShearError(f"cannot write {path}: {e}") from e
    try:
        if backend.name == "cpp":
            _write_cpp(fd, specs, backend.module, metadata, num_threads or torch.get_num_threads())
        else:
            os.close(fd)
            fd = -1
            tensors = {s.name: gather(s) for s in specs}
            try:
                save_file(tensors, tmp, metadata=metadata)
            except SafetensorError as e:  # its I/O errors (disk full...) are not OSErrors
                raise ShearError(f"writing {path} failed: {e}") from e
            del tensors
            fd = os.open(tmp, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; save_file gives the umask's default
        os.replace(tmp, path)
    except BaseException as e:
        if fd >= 0:
            os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise ShearError(f"writing {path} failed: {e}") from e
        raise
    return path


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def _write_cpp(fd: int, specs: list[GatherSpec], ext: Any, metadata: dict[str, str], threads: int) -> None:
    header, placed = safetensors_layout(specs, metadata)
    total = placed[-1][1] + _nbytes(placed[-1][0]) if placed else len(header)
    os.ftruncate(fd, total)
    os.pwrite(fd, header, 0)
    offset = {s.name: off for s, off in placed}
    codes = {torch.float32: ext.FLOAT32, torch.float16: ext.FLOAT16, torch.bfloat16: ext.BFLOAT16}
    for batch in _host_batches([s for s, _ in placed]):
        batch = [_to_host(s) for s in batch]
        dtypes = [codes[s.dtype or s.src.dtype] for s in batch]
        offs = [offset[s.name] for s in batch]
        _call(ext.gather_to_files, *_cpp_args(batch), dtypes, [fd] * len(batch), offs, threads)


def write_weights(
    folder: str | os.PathLike,
    specs: Sequence[GatherSpec],
    backend: Backend | str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    num_threads: int | None = None,
) -> list[str]:
    """Write the weights of a Hugging Face folder: ``model.safetensors``, or shards and
    ``model.safetensors.index.json`` above ``max_shard_size``.

    Args:
        folder: an existing folder.
        specs: the tensors, in state-dict order (the order shards follow).
        backend: a :class:`Backend`, or a name for :func:`resolve_backend`.
        max_shard_size: shard limit (``"5GB"``, ``"500MB"``, bytes).
        num_threads: C++ worker threads.

    Returns:
        The names of the files written.
    """
    folder = Path(folder)
    specs = [check_spec(s) for s in specs]
    if not isinstance(backend, Backend):
        backend = resolve_backend(backend, specs)
    shards = shard(specs, max_shard_size)
    if len(shards) == 1:
        write_safetensors(folder / "model.safetensors", shards[0], backend, num_threads=num_threads)
        return ["model.safetensors"]
    files, weight_map = [], {}
    for k, part in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / name, part, backend, num_threads=num_threads)
        files.append(name)
        weight_map.update({s.name: name for s in part})
    index = {
        "metadata": {
            "total_parameters": sum(_nbytes(s) // (s.dtype or s.src.dtype).itemsize for s in specs),
            "total_size": sum(_nbytes(s) for s in specs),
        },
        "weight_map": weight_map,
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [*files, "model.safetensors.index.json"]


def _kept(z: torch.Tensor | None, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sorted kept indices of a 1-D mask and their values (all indices, no scale, if None)."""
    if z is None:
        return torch.arange(size), None
    idx = torch.nonzero(z.detach().cpu() != 0).flatten()
    return idx, z.detach().cpu().float()[idx]


def _uniform(counts: list[int], what: str, expected: int, per: str = "layer") -> None:
    if any(c != expected for c in counts):
        raise ShearError(
            f"cannot export: kept {what} per {per} are {counts}, but the target needs {expected} in "
            f"every {per} (use the deterministic masks)"
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
        kv_counts.append(len(groups))
        # each kept group brings its own kept query heads, packed in the HF layout: new
        # query head i * n' + j' reads new KV head i
        heads, head_scale = [], []
        for i, g in enumerate(groups.tolist()):
            within, j_scale = _kept(z["head"][old, g] if "head" in z else None, n)
            head_counts.append(len(within))
            heads.append(g * n + within)
            scale = product(g_scale[i] if g_scale is not None else None, j_scale)
            if scale is not None:
                head_scale.append(scale.expand(len(within)))
        heads = torch.cat(heads) if heads else torch.zeros(0, dtype=torch.long)
        ar = torch.arange(dh)
        q_rows = (heads[:, None] * dh + ar).flatten()
        kv_rows = (groups[:, None] * dh + ar).flatten()
        o_col_scale = None
        if head_scale:
            o_col_scale = torch.cat(head_scale)[:, None].expand(-1, dh).flatten()
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
    _uniform(head_counts, "query heads", target.heads_per_group, per="kept (layer, KV group)")
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


def gather_sharded(plan: Sequence[GatherSpec], backend: str | None = None) -> list[GatherSpec] | None:
    """Gather a plan over sharded (FSDP, DTensor) sources one tensor at a time: every rank
    all-gathers the source, rank 0 gathers the output tensor from it at once (the C++ gather,
    or the reference without the extension), so rank 0 holds the output and one source
    tensor, never the whole model. Every rank must call it with the same plan.

    Returns:
        On rank 0 the plan over the gathered tensors (nothing left to select or scale: the
        write copies them, so the bytes equal a single-process export's); None elsewhere.
    """
    import torch.distributed as dist

    main = dist.get_rank() == 0
    cpp = main and resolve_backend(backend).name == "cpp"
    out: list[GatherSpec] = []
    for spec in plan:
        src = spec.src.full_tensor() if isinstance(spec.src, DTensor) else spec.src
        if main:
            full = check_spec(replace(spec, src=src))
            done = gather_cpp([full])[0] if cpp else gather(full)
            out.append(GatherSpec(spec.name, done, dtype=spec.dtype))
        del src
    return out if main else None


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
    backend: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    source_model: str | None = None,
) -> Path:
    """Finalize the masks and write a Hugging Face folder of the target architecture.

    The folder (model.safetensors, config.json, generation_config.json, tokenizer) is
    written under a temporary name next to ``out_dir`` and renamed into place, so a crash
    never leaves a half-written export. It loads with plain ``from_pretrained``.

    Args:
        model: the masked source model.
        masks: its masks (the values the model evaluates with are used: the deterministic
            masks, or those fixed with :meth:`HardConcreteMasks.fixed`).
        out_dir: destination folder; must not exist unless ``overwrite``.
        tokenizer: saved alongside if given.
        dtype: dtype of the saved weights (default: each source tensor's dtype).
        overwrite: replace an existing ``out_dir``.
        backend: ``"auto"`` (default, or ``$SHEAR_EXPORT_BACKEND``), ``"cpp"`` or
            ``"torch"``; see the module docstring. The choice is printed on stderr and
            recorded in ``shear_export.json``.
        max_shard_size: above this the weights are split into shards with an index file.
        source_model: where the source was loaded from (a folder, made absolute, or
            ``default``); recorded as ``source_model`` in ``shear_export.json``, the default
            teacher of ``shear train --distill-weight``.

    Returns:
        The output folder.

    Raises:
        ShearError: the destination exists, the masks do not give the target, bad
            tensors, an unavailable ``cpp`` backend, or a failed write (nothing is left).
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ShearError(f"export destination {out} already exists (pass overwrite=True to replace it)")
    with torch.no_grad():
        z = masks.values(training=False)
    plan, arch = export_plan(model, masks, z)
    config = export_config(model, arch, kept_layers(masks, z))
    if dtype is not None:
        config.dtype = dtype
    for spec in plan:
        spec.dtype = dtype
    parse_size(max_shard_size)
    if any(isinstance(spec.src, DTensor) for spec in plan):  # FSDP: every rank calls this
        plan = gather_sharded(plan, backend)
        if plan is None:
            return out  # rank 0 writes
    plan = [check_spec(spec) for spec in plan]
    chosen = resolve_backend(backend, plan)
    print(f"shear: export backend: {chosen.detail}", file=sys.stderr, flush=True)
    with atomic_dir(out, "the export") as tmp:
        files = write_weights(tmp, plan, chosen, max_shard_size)
        config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        record = {
            "source": masks.source.summary(),
            "source_model": _absolute(source_model),
            "target": arch.summary(),
            "backend": chosen.name,
            "backend_detail": chosen.detail,
            "weights": files,
        }
        (tmp / "shear_export.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def _absolute(model: str | None) -> str | None:
    """A model folder as an absolute path (``default`` and None as they are)."""
    if model is None or model == "default" or not Path(model).expanduser().exists():
        return model
    return str(Path(model).expanduser().resolve())
