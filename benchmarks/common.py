"""Shared set-up for the benchmarks: models at real layer shapes, masked and dense.

The first part serves ``report.py`` / ``test_bench_masked_model.py`` (a 2-layer model, LM
loss); the second ``report_kernels.py`` / ``bench_kernels.py`` (one decoder layer per
provider, driven op by op, plus the mask-sampling measurement).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

from shear.arch import Arch
from shear.masks import MASK_TYPES, HardConcreteMasks, LayerMasks, combine_layer_masks
from shear.patch import apply_masks
from shear.target import resolve_target

#: Layer shapes of the embedded default (SmolLM2-135M); 2 layers and a small vocabulary so
#: that the decoder layers, not the LM head, dominate the time.
SMOLLM2_LAYER = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
SMOLLM2_TARGET = "layers=1,hidden=384,heads=6,kv_heads=2,intermediate=1024"


def build(provider: str, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer model at SmolLM2 layer shapes, in training mode.

    Args:
        provider: ``dense`` (the unpatched Hugging Face model, the floor) or ``masked``
            (the reference path with every mask type, sampled each forward).
        seed: weight seed.

    Returns:
        The model.
    """
    torch.manual_seed(seed)
    cfg = LlamaConfig(**SMOLLM2_LAYER, num_hidden_layers=2, vocab_size=1024, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).train()
    if provider == "masked":
        apply_masks(
            model, SMOLLM2_TARGET, types=list(MASK_TYPES), generator=torch.Generator().manual_seed(seed)
        )
    elif provider != "dense":
        raise ValueError(f"unknown provider {provider!r}")
    return model


def step(model: LlamaForCausalLM, tokens: torch.Tensor, backward: bool) -> None:
    """One forward (and backward) pass with the LM loss."""
    if backward:
        model(tokens, labels=tokens).loss.backward()
    else:
        with torch.no_grad():
            model(tokens, labels=tokens)


def tokens(batch: int = 2, seq: int = 256) -> torch.Tensor:
    """Random token ids for the benchmarks."""
    return torch.randint(0, 1024, (batch, seq), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------
# Kernel benchmarks (bench_kernels.py, report_kernels.py): one decoder layer, per provider.
# ---------------------------------------------------------------------------------------

#: Layer shapes of the two shape sets the issue names (SmolLM2: head dim 576 / 9 = 64).
LAYER_SHAPES: dict[str, dict[str, int]] = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3),
    "llama7b": dict(
        hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32
    ),
}
#: Layers of the full model (for the mask-sampling measurement: every mask of the model).
MODEL_LAYERS = {"smollm2": 30, "llama7b": 32}
#: A pruning target per shape set; it only sets how the masks are initialised (all seven mask
#: types are learned, so every masked module of the layer is patched).
LAYER_TARGETS = {
    "smollm2": "hidden=384,heads=6,kv_heads=2,intermediate=1024",
    "llama7b": "hidden=2560,heads=20,kv_heads=20,intermediate=6912",  # Sheared-LLaMA-2.7B
}
#: Sequence length per sample (tokens = batch x seq_len); the models' training context.
DEFAULT_SEQ_LEN = {"smollm2": 2048, "llama7b": 4096}

OPS = ("mlp", "attention", "rmsnorm", "layer")
PROVIDERS = ("fused", "eager", "compile", "dense")
PASSES = ("forward", "forward_backward")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: What each op is, as shown in reports.
OP_DOC = {
    "mlp": "SwiGLU MLP (gate/up/down) with intermediate and output masks",
    "attention": "self-attention block (q/k/v proj, RoPE, causal GQA attention, o_proj) with head masks",
    "rmsnorm": "RMSNorm with the hidden mask",
    "layer": "whole decoder layer (2 RMSNorms, attention block, MLP, residuals)",
}
PROVIDER_DOC = {
    "fused": "shear's Triton kernels (SHEAR_KERNELS=triton; shear attention kernel)",
    "eager": "shear's reference path (SHEAR_KERNELS=reference: shear.ops masks, HF sdpa attention)",
    "compile": "torch.compile of the eager reference path",
    "dense": "unmasked Hugging Face layer (the floor)",
}


def kernels_env(provider: str) -> str:
    """The SHEAR_KERNELS value a provider runs under."""
    return "triton" if provider == "fused" else "reference"


@contextlib.contextmanager
def shear_backend(provider: str) -> Iterator[None]:
    """Run the block with SHEAR_KERNELS set for ``provider`` (restored afterwards)."""
    old = os.environ.get("SHEAR_KERNELS")
    os.environ["SHEAR_KERNELS"] = kernels_env(provider)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SHEAR_KERNELS", None)
        else:
            os.environ["SHEAR_KERNELS"] = old


def interpreter_smoke() -> bool:
    """``SHEAR_BENCH_INTERPRET=1`` with ``TRITON_INTERPRET=1``: run ``fused`` on CPU through the
    Triton interpreter, to smoke-test the benchmark code at tiny sizes (its timings mean nothing)."""
    return os.environ.get("SHEAR_BENCH_INTERPRET") == "1" and os.environ.get("TRITON_INTERPRET") == "1"


def skip_reason(provider: str, shapes: str, device: torch.device) -> str | None:
    """Why a provider / shape set cannot be measured on ``device`` (None when it can).

    ``SHEAR_BENCH_COMPILE=0`` skips the torch.compile provider (its first call compiles: about
    10-25 s per op on a 2-core CPU, under a minute per op on a GPU host).
    """
    if provider == "compile" and os.environ.get("SHEAR_BENCH_COMPILE", "1") == "0":
        return "torch.compile disabled by SHEAR_BENCH_COMPILE=0"
    if device.type != "cuda":
        if provider == "fused" and not interpreter_smoke():
            return (
                "fused needs CUDA: on CPU the Triton kernels only run in the interpreter, "
                "whose timings are meaningless"
            )
        if shapes == "llama7b":
            return "LLaMA-2-7B layer shapes need CUDA (too slow for a shared CPU)"
    return None


def layer_config(shapes: str, seq_len: int) -> LlamaConfig:
    """A one-layer LlamaConfig at the layer shapes of ``shapes`` (small vocabulary)."""
    return LlamaConfig(
        **LAYER_SHAPES[shapes],
        num_hidden_layers=1,
        vocab_size=256,
        max_position_embeddings=max(seq_len, 2048),
        tie_word_embeddings=True,
    )


def model_arch(shapes: str) -> Arch:
    """The whole model's architecture (all layers) at ``shapes``, for the mask-sampling measurement."""
    cfg = LlamaConfig(
        **LAYER_SHAPES[shapes],
        num_hidden_layers=MODEL_LAYERS[shapes],
        vocab_size=32000,
        tie_word_embeddings=False,
    )
    return Arch.from_config(cfg)


def _closest_half_heads(kv_heads: int, per_group: int) -> tuple[int, int]:
    """(KV groups zeroed, heads-per-group zeroed) that zero the fraction of query heads closest to 1/2."""
    total = kv_heads * per_group
    best = min(
        ((a, b) for a in range(kv_heads + 1) for b in range(per_group + 1)),
        key=lambda ab: (abs(total - (kv_heads - ab[0]) * (per_group - ab[1]) - total / 2), ab[1], ab[0]),
    )
    return best


def zero_half_pattern(arch: Arch, pattern: str = "blocks", seed: int = 0) -> dict[str, torch.Tensor]:
    """0/1 factors that zero (about) half the query heads and exactly half the intermediate channels.

    Args:
        arch: the (one-layer) architecture.
        pattern: ``blocks``: the zeros are contiguous (the first half of the channels / KV
            groups, the same heads in every group): kernels that skip whole blocks of zero
            channels see every zero; ``random``: a random half (each KV group its own heads),
            as sampled masks scatter them (block skipping then finds almost no all-zero block
            of channels).
        seed: RNG seed of ``random``.

    Returns:
        Factors by mask type (``kv``, ``head``, ``intermediate``), each of the mask's shape.
    """
    gen = torch.Generator().manual_seed(seed)

    def half(n: int, zeros: int) -> torch.Tensor:
        keep = torch.ones(n)
        idx = torch.arange(zeros) if pattern == "blocks" else torch.randperm(n, generator=gen)[:zeros]
        keep[idx] = 0.0
        return keep

    if pattern not in ("blocks", "random"):
        raise ValueError(f"unknown zero pattern {pattern!r}")
    a, b = _closest_half_heads(arch.kv_heads, arch.heads_per_group)
    L = arch.layers
    kv = half(arch.kv_heads, a)
    head = torch.stack([half(arch.heads_per_group, b) for _ in range(arch.kv_heads)])  # each group its own
    return {
        "kv": kv.expand(L, -1).clone(),
        "head": head.expand(L, -1, -1).clone(),
        "intermediate": half(arch.intermediate, arch.intermediate // 2).expand(L, -1).clone(),
    }


def zero_fractions(arch: Arch, pattern: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(fraction of query heads, fraction of intermediate channels) that the pattern zeroes."""
    heads = (pattern["kv"][0][:, None] * pattern["head"][0]).flatten()
    return float((heads == 0).float().mean()), float((pattern["intermediate"][0] == 0).float().mean())


def leaf_layer_masks(masks: HardConcreteMasks, zero: dict[str, torch.Tensor] | None = None) -> LayerMasks:
    """One hard-concrete sample of every mask, combined per layer, as leaf tensors needing grad.

    The masked model samples its masks once per forward pass of the whole model (the
    mask-sampling measurement times that); a layer benchmark fixes one sample so that it
    times the layer alone. The combined masks are leaves with ``requires_grad`` so that the
    layer still computes every mask gradient (as it does inside the model).

    Args:
        masks: the masks of the model.
        zero: optional 0/1 factors by mask type (:func:`zero_half_pattern`).
    """
    with torch.no_grad():
        z = masks.sample()
        if zero is not None:
            z = {n: v * zero[n].to(v) if n in zero else v for n, v in z.items()}
        combined = combine_layer_masks(masks.source, z)
    fields = {}
    for name in ("attn_in", "attn_out", "int_out", "mlp_out", "hidden"):
        t = getattr(combined, name)
        fields[name] = None if t is None else t.detach().contiguous().clone().requires_grad_(True)
    return LayerMasks(**fields)


@dataclass
class LayerCase:
    """One benchmark setting: shapes, token count, dtype, device, and the zero-half switch."""

    shapes: str
    tokens: int
    dtype: torch.dtype
    device: torch.device
    seq_len: int | None = None
    zero_half: str | None = None  # None, "blocks" or "random"

    def __post_init__(self) -> None:
        if self.seq_len is None:
            self.seq_len = min(self.tokens, DEFAULT_SEQ_LEN[self.shapes])
        if self.tokens % self.seq_len:
            raise ValueError(f"tokens ({self.tokens}) must be a multiple of seq_len ({self.seq_len})")

    @property
    def batch(self) -> int:
        return self.tokens // self.seq_len


@dataclass
class LayerWorld:
    """The models of one :class:`LayerCase`: one per provider, same weights, same inputs."""

    case: LayerCase
    models: dict[str, LlamaModel] = field(default_factory=dict)
    masks: dict[str, HardConcreteMasks] = field(default_factory=dict)
    x: torch.Tensor | None = None
    dy: torch.Tensor | None = None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    _compiled: dict[tuple[str, str], Callable] = field(default_factory=dict)


def build_layer_model(
    case: LayerCase, provider: str, seed: int = 0
) -> tuple[LlamaModel, HardConcreteMasks | None]:
    """A one-layer LlamaModel for ``provider``, in training mode, at the case's dtype and device.

    ``dense`` is the unpatched Hugging Face model. The masked providers get
    :func:`shear.patch.apply_masks` with every mask type (what shear's masked model runs):
    ``fused`` applied under SHEAR_KERNELS=triton (so attention runs shear's kernel), ``eager``
    and ``compile`` under SHEAR_KERNELS=reference (attention stays the model's sdpa). Their
    masks are fixed to one sample (:func:`leaf_layer_masks`).
    """
    torch.manual_seed(seed)
    with torch.device(case.device):
        model = LlamaModel(layer_config(case.shapes, case.seq_len))
    model.to(case.dtype).train()
    if provider == "dense":
        return model, None
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}")
    with shear_backend(provider):
        masks = apply_masks(
            model,
            LAYER_TARGETS[case.shapes],
            types=list(MASK_TYPES),
            generator=torch.Generator().manual_seed(seed),
        )
    zero = zero_half_pattern(masks.source, case.zero_half) if case.zero_half else None
    masks.current = leaf_layer_masks(masks, zero)
    return model, masks


def build_world(case: LayerCase, providers: tuple[str, ...], seed: int = 0) -> LayerWorld:
    """Models for every provider of ``providers`` plus the shared input, output gradient and RoPE."""
    world = LayerWorld(case)
    for p in providers:
        world.models[p], m = build_layer_model(case, p, seed)
        if m is not None:
            world.masks[p] = m
    gen = torch.Generator(device=case.device).manual_seed(seed + 1)
    shape = (case.batch, case.seq_len, LAYER_SHAPES[case.shapes]["hidden_size"])
    world.x = torch.randn(shape, generator=gen, device=case.device, dtype=case.dtype).requires_grad_(True)
    world.dy = torch.randn(shape, generator=gen, device=case.device, dtype=case.dtype)
    any_model = next(iter(world.models.values()))
    pos = torch.arange(case.seq_len, device=case.device)[None].expand(case.batch, -1)
    with torch.no_grad():
        world.position_embeddings = any_model.rotary_emb(world.x, pos)
    return world


def op_module(model: LlamaModel, op: str) -> torch.nn.Module:
    """The module of the one decoder layer that ``op`` benchmarks."""
    layer = model.layers[0]
    return {
        "mlp": layer.mlp,
        "attention": layer.self_attn,
        "rmsnorm": layer.input_layernorm,
        "layer": layer,
    }[op]


def op_callable(world: LayerWorld, provider: str, op: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``f(x) -> out`` running ``op`` for ``provider`` (``compile`` wraps the eager module once)."""
    model_key = provider
    module = op_module(world.models[model_key], op)
    if provider == "compile":
        key = (provider, op)
        if key not in world._compiled:
            world._compiled[key] = torch.compile(module)
        module = world._compiled[key]
    pe = world.position_embeddings
    if op == "layer":
        return lambda x: module(x, attention_mask=None, position_embeddings=pe)
    if op == "attention":
        return lambda x: module(hidden_states=x, position_embeddings=pe, attention_mask=None)[0]
    return module


def _grad_leaves(world: LayerWorld, provider: str) -> list[torch.Tensor]:
    leaves = list(world.models[provider].parameters())
    m = world.masks.get(provider)
    if m is not None and m.current is not None:
        for name in ("attn_in", "attn_out", "int_out", "mlp_out", "hidden"):
            t = getattr(m.current, name)
            if t is not None:
                leaves.append(t)
    return leaves + [world.x]


def make_step(world: LayerWorld, provider: str, op: str, backward: bool) -> tuple[Callable, Callable]:
    """``(setup, step)`` for one timed pass; ``setup`` drops the gradients of the previous one.

    ``forward`` is the training forward (autograd on, inputs and weights needing grad, so the
    kernels save what backward needs); ``forward_backward`` adds ``out.backward(dy)``.
    """
    fn = op_callable(world, provider, op)
    leaves = _grad_leaves(world, provider)
    x, dy = world.x, world.dy

    def setup() -> None:
        for t in leaves:
            t.grad = None

    def step() -> None:
        with shear_backend(provider):
            out = fn(x)
            if backward:
                out.backward(dy)

    return setup, step


# --- FLOPs and bytes (anchors.md conventions) ------------------------------------------------


def op_flops(op: str, case: LayerCase, backward: bool) -> float | None:
    """Nominal (dense) FLOPs of one pass: matmul 2MNK, causal attention 2*B*H*S^2*D; backward 2.5x.

    RMSNorm does no matmul: None (see :func:`op_bytes`). Zero-half runs keep the dense count,
    so their TFLOP/s is the effective rate.
    """
    s = LAYER_SHAPES[case.shapes]
    d, inter, H, G = (
        s["hidden_size"],
        s["intermediate_size"],
        s["num_attention_heads"],
        s["num_key_value_heads"],
    )
    D = d // H
    T = case.tokens
    mlp = 3 * 2 * T * d * inter
    proj = 2 * T * d * (H * D) * 2 + 2 * T * d * (G * D) * 2  # q, o + k, v
    core = 4 * case.batch * H * case.seq_len**2 * D / 2  # causal: half of 4*B*H*N^2*D
    fwd = {"mlp": mlp, "attention": proj + core, "layer": mlp + proj + core}.get(op)
    if fwd is None:
        return None
    return fwd * (3.5 if backward else 1.0)


def op_bytes(op: str, case: LayerCase, backward: bool) -> float | None:
    """Minimal HBM traffic of RMSNorm: read x, write y (forward); read x and dy, write dx (backward)."""
    if op != "rmsnorm":
        return None
    elt = torch.finfo(case.dtype).bits // 8
    n = case.tokens * LAYER_SHAPES[case.shapes]["hidden_size"] * elt
    return n * (5 if backward else 2)


# --- timing ------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    """Wait for the device (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Sample:
    """One timed round: seconds per call and the peak extra memory (bytes; None on CPU)."""

    seconds: float
    peak_bytes: int | None


def timed(setup: Callable, step: Callable, device: torch.device, inner: int = 1) -> Sample:
    """Time ``inner`` calls of ``step`` (after ``setup`` each), synchronised on GPU.

    Peak memory (GPU only) is ``torch.cuda.max_memory_allocated`` during the calls minus the
    memory allocated just before them: activations, gradients and workspaces, not the weights
    and inputs that exist anyway.
    """
    cuda = device.type == "cuda"
    setup()
    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    for i in range(inner):
        if i:
            setup()
        step()
    sync(device)
    dt = (time.perf_counter() - t0) / inner
    peak = torch.cuda.max_memory_allocated(device) - base if cuda else None
    return Sample(dt, peak)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation."""
    v = sorted(values)
    if not v:
        return math.nan
    k = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


# --- mask sampling -----------------------------------------------------------------------------


def model_masks(shapes: str, device: torch.device, seed: int = 0) -> HardConcreteMasks:
    """Every mask of the whole model at ``shapes`` (all seven types; float32 log_alphas)."""
    source = model_arch(shapes)
    target = resolve_target(source, LAYER_TARGETS[shapes])
    masks = HardConcreteMasks(source, target, list(MASK_TYPES), torch.Generator().manual_seed(seed))
    return masks.to(device)


def sampling_step(
    masks: HardConcreteMasks, provider: str, what: str, backward: bool
) -> tuple[Callable, Callable]:
    """``(setup, step)`` sampling every mask once (``what="sample"``) or refreshing the layer masks
    (``what="refresh"``: sample + per-layer combination, what the model's pre-hook runs).

    ``fused`` is :func:`shear.kernels.hard_concrete.sample_all` (one launch each way) through
    :func:`shear.dispatch.hard_concrete_sample_all`; ``eager`` is the reference loop over mask types.
    """
    params = list(masks.log_alpha.values())

    def setup() -> None:
        for p in params:
            p.grad = None

    def step() -> None:
        with shear_backend(provider):
            if what == "sample":
                outs = list(masks.sample().values())
            else:
                cur = masks.refresh(True)
                outs = [t for t in vars(cur).values() if t is not None]
            if backward:
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    return setup, step


def mask_units(masks: HardConcreteMasks) -> int:
    """Number of mask entries (units) the model learns."""
    return sum(p.numel() for p in masks.log_alpha.values())


# --- sanity check -------------------------------------------------------------------------------


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS error ||a - b|| / ||b|| in float32 (suits bf16 better than elementwise allclose)."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


#: Relative error above which a provider's output is flagged as not matching the eager reference.
REL_TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def check_against_eager(world: LayerWorld, op: str) -> dict[str, tuple[float, float]]:
    """Relative error of each masked provider's output and input gradient against ``eager``.

    One forward+backward per provider. Mask gradients are not compared: for a mask entry that
    is exactly 0 the kernels return 0 by design (the reference computes a value there, which
    never reaches log_alpha). Returns provider -> (output error, dx error); empty without eager.
    """
    if "eager" not in world.models:
        return {}
    results = {}
    for provider in [p for p in world.models if p not in ("eager", "dense")] + ["eager"]:
        fn = op_callable(world, provider, op)
        for t in _grad_leaves(world, provider):
            t.grad = None
        with shear_backend(provider):
            out = fn(world.x)
            out.backward(world.dy)
        results[provider] = (out.detach(), world.x.grad.detach().clone())
        world.x.grad = None
    ref_out, ref_dx = results.pop("eager")
    return {p: (rel_err(o, ref_out), rel_err(dx, ref_dx)) for p, (o, dx) in results.items()}
