"""Hard-concrete masks of a whole model: which ones a run learns, their parameters and values.

Granularities (L layers, d hidden, G KV groups, n = H / G query heads per group, I MLP):

=============  ========  =========================================================
mask           shape     multiplies
=============  ========  =========================================================
layer          [L]       the attention and the MLP output of that layer
head_layer     [L]       the whole attention output (after o_proj)
mlp            [L]       the whole MLP output (after down_proj)
head           [L, G, n] query head j of KV group g (each group chooses its own)
kv             [L, G]    every query head of KV group g (for MHA: each head)
intermediate   [L, I]    the up_proj output, before silu(gate) * up
hidden         [d]       every read (RMSNorm outputs) and write (o_proj, down_proj)
=============  ========  =========================================================

A query head h = g * n + j of layer l is scaled by ``kv[l, g] * head[l, g, j]``; that is
the Hugging Face GQA layout (``repeat_kv`` maps query head h to KV head h // n). The
deterministic head mask keeps the same count in every (layer, group) row but each group
picks its own heads; export packs every kept group's heads contiguously (their order within
a group does not matter), so any mask result is a valid uniform GQA configuration.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from shear.arch import Arch
from shear.errors import ShearError
from shear.ops import hard_concrete as hc

#: Every mask type, in a fixed order.
MASK_TYPES: tuple[str, ...] = ("layer", "head_layer", "mlp", "head", "kv", "intermediate", "hidden")


@dataclass(frozen=True)
class MaskSpec:
    """One mask type of a run.

    Attributes:
        name: a member of :data:`MASK_TYPES`.
        shape: shape of its log_alpha: ``[size]``, ``[layers, size]`` or, for ``head``,
            ``[layers, groups, size]``; a row is the last dimension.
        target: units kept per row in the target architecture.
    """

    name: str
    shape: tuple[int, ...]
    target: int

    @property
    def size(self) -> int:
        """Units per row in the source."""
        return self.shape[-1]

    @property
    def target_sparsity(self) -> float:
        """Fraction of each row the target removes: 1 - target / size."""
        return 1.0 - self.target / self.size


def mask_shapes(source: Arch) -> dict[str, tuple[int, ...]]:
    """Shape of every mask type for a source architecture."""
    L = source.layers
    return {
        "layer": (L,),
        "head_layer": (L,),
        "mlp": (L,),
        "head": (L, source.kv_heads, source.heads_per_group),
        "kv": (L, source.kv_heads),
        "intermediate": (L, source.intermediate),
        "hidden": (source.hidden,),
    }


def target_counts(source: Arch, target: Arch) -> dict[str, int]:
    """Units kept per row by the target, for every mask type.

    head_layer and mlp keep every layer: a uniform target has attention and an MLP in
    each of its layers (whole layers go through the ``layer`` mask).
    """
    return {
        "layer": target.layers,
        "head_layer": source.layers,
        "mlp": source.layers,
        "head": target.heads_per_group,
        "kv": target.kv_heads,
        "intermediate": target.intermediate,
        "hidden": target.hidden,
    }


def plan_masks(source: Arch, target: Arch, types: Iterable[str] | None = None) -> list[MaskSpec]:
    """Decide which masks a run learns.

    Args:
        source: the source architecture.
        target: a validated target (see :func:`shear.target.resolve_target`).
        types: mask types to learn; ``None`` learns exactly those the target shrinks.
            Every type the target shrinks must be present, so no target dimension can be
            missed silently (the reference's failure when the hidden mask was left out).

    Returns:
        The specs, in :data:`MASK_TYPES` order.
    """
    shapes, counts = mask_shapes(source), target_counts(source, target)
    needed = [t for t in MASK_TYPES if counts[t] < shapes[t][-1]]
    if types is None:
        chosen = needed
    else:
        chosen = list(dict.fromkeys(types))
        unknown = [t for t in chosen if t not in MASK_TYPES]
        if unknown:
            raise ShearError(f"unknown mask type(s) {unknown}; choose from {', '.join(MASK_TYPES)}")
        missing = [t for t in needed if t not in chosen]
        if missing:
            raise ShearError(
                f"the target shrinks {', '.join(missing)} but those masks are not learned; "
                f"add them to the mask types (the target would otherwise be missed)"
            )
    return [MaskSpec(t, shapes[t], counts[t]) for t in MASK_TYPES if t in chosen]


@dataclass
class LayerMasks:
    """Per-layer mask vectors in the form the masked modules consume (None: no mask).

    Attributes:
        attn_in: ``[L, H]``, one entry per query head (head and KV-group masks): o_proj's
            input mask (one entry per head of head_dim features) and attention's skip mask.
        attn_out: ``[L, d]`` on o_proj's output (layer * head_layer * hidden).
        int_out: ``[L, I]`` on up_proj's output (intermediate).
        mlp_out: ``[L, d]`` on down_proj's output (layer * mlp * hidden).
        hidden: ``[d]`` on every RMSNorm (hidden).
    """

    attn_in: torch.Tensor | None
    attn_out: torch.Tensor | None
    int_out: torch.Tensor | None
    mlp_out: torch.Tensor | None
    hidden: torch.Tensor | None


def product(*factors: torch.Tensor | None) -> torch.Tensor | None:
    """Product of the factors that are not None (None if all are): absent masks multiply by 1."""
    out = None
    for f in factors:
        if f is not None:
            out = f if out is None else out * f
    return out


def combine_layer_masks(source: Arch, z: dict[str, torch.Tensor]) -> LayerMasks:
    """Turn mask values by type into the per-layer vectors of :class:`LayerMasks`.

    Args:
        source: the source architecture.
        z: mask values by type (any subset of :data:`MASK_TYPES`).

    Returns:
        The combined masks; differentiable in every entry of ``z``.
    """
    L, d = source.layers, source.hidden
    hidden = z.get("hidden")
    layer = z.get("layer")
    attn_scale = product(layer, z.get("head_layer"))  # [L]
    mlp_scale = product(layer, z.get("mlp"))

    def out_mask(scale: torch.Tensor | None) -> torch.Tensor | None:
        if scale is None and hidden is None:
            return None
        s = scale[:, None] if scale is not None else hidden.new_ones(L, 1)
        h = hidden[None, :] if hidden is not None else s.new_ones(1, d)
        return s * h

    attn_in = None
    head, kv = z.get("head"), z.get("kv")
    if head is not None or kv is not None:
        n, G = source.heads_per_group, source.kv_heads
        per_head = product(kv[:, :, None] if kv is not None else None, head).expand(L, G, n)
        attn_in = per_head.reshape(L, G * n)
    return LayerMasks(
        attn_in=attn_in,
        attn_out=out_mask(attn_scale),
        int_out=z.get("intermediate"),
        mlp_out=out_mask(mlp_scale),
        hidden=hidden,
    )


class HardConcreteMasks(nn.Module):
    """The learned masks of one run: a log_alpha parameter per mask type.

    The values the model uses on a forward pass come from :meth:`values`: a fresh sample
    while training, the deterministic masks in evaluation, or values fixed by the user
    (:meth:`fixed`). :func:`shear.patch.apply_masks` wires this module into a model.

    Args:
        source: the source architecture.
        target: a validated target architecture.
        types: mask types to learn (see :func:`plan_masks`); None: those the target shrinks.
        generator: optional RNG for the initial log_alpha and the training noise.
    """

    def __init__(
        self,
        source: Arch,
        target: Arch,
        types: Iterable[str] | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        specs = plan_masks(source, target, types)
        self.source, self.target = source, target
        self.specs = {s.name: s for s in specs}
        self.generator = generator
        self.log_alpha = nn.ParameterDict()
        for s in specs:
            init = torch.randn(s.shape, generator=generator) * hc.INIT_STD + hc.INIT_MEAN
            self.log_alpha[s.name] = nn.Parameter(init)
        self._fixed: dict[str, torch.Tensor] | None = None
        #: The deterministic masks at :meth:`freeze`, used by every later forward pass.
        self.frozen: dict[str, torch.Tensor] | None = None
        #: Masks of the forward pass in progress, set by :meth:`refresh`.
        self.current: LayerMasks | None = None

    @property
    def types(self) -> list[str]:
        """Names of the learned mask types."""
        return list(self.specs)

    # --- values -----------------------------------------------------------------------

    def sample(self) -> dict[str, torch.Tensor]:
        """One training sample of every mask (one per micro-batch, shared by its tokens)."""
        from shear.dispatch import hard_concrete_sample_all

        names = list(self.log_alpha)
        z = hard_concrete_sample_all([self.log_alpha[n] for n in names], self.generator)
        return dict(zip(names, z, strict=True))

    def deterministic(self) -> dict[str, torch.Tensor]:
        """Deterministic masks: exactly the target count of non-zeros per row."""
        return {n: hc.deterministic_mask(la, self.specs[n].target) for n, la in self.log_alpha.items()}

    def keep_probabilities(self) -> dict[str, torch.Tensor]:
        """P(z > 0) of every unit, by mask type."""
        return {n: hc.keep_probability(la) for n, la in self.log_alpha.items()}

    def ones(self) -> dict[str, torch.Tensor]:
        """All-ones masks (the unpruned model), by mask type."""
        return {n: torch.ones_like(la) for n, la in self.log_alpha.items()}

    def values(self, training: bool) -> dict[str, torch.Tensor]:
        """The mask values a forward pass uses: fixed, else frozen, else sampled (training) or
        deterministic."""
        if self._fixed is not None:
            return self._fixed
        if self.frozen is not None:
            return self.frozen
        return self.sample() if training else self.deterministic()

    @contextlib.contextmanager
    def fixed(self, values: dict[str, torch.Tensor]) -> Iterator[None]:
        """Use the given mask values (one tensor per learned type) inside the block.

        Args:
            values: mask values by type; shapes must match the log_alpha shapes.
        """
        if set(values) != set(self.specs):
            raise ShearError(f"fixed masks must give exactly the types {self.types}, got {sorted(values)}")
        for n, v in values.items():
            if tuple(v.shape) != self.specs[n].shape:
                raise ShearError(f"mask {n!r} must have shape {self.specs[n].shape}, got {tuple(v.shape)}")
        previous, self._fixed = self._fixed, values
        try:
            yield
        finally:
            self._fixed = previous

    @torch.no_grad()
    def freeze(self) -> None:
        """Fix the masks to their current deterministic values for good (training, evaluation
        and export), so that the remaining steps train the weights of the final architecture
        without mask noise. Saved with the module's state."""
        self.frozen = {n: z.detach().clone() for n, z in self.deterministic().items()}

    def get_extra_state(self) -> dict[str, torch.Tensor] | None:
        return self.frozen

    def set_extra_state(self, state: dict[str, torch.Tensor] | None) -> None:
        self.frozen = state

    def refresh(self, training: bool) -> LayerMasks:
        """Compute the masks for the next forward pass and store them in :attr:`current`."""
        self.current = combine_layer_masks(self.source, self.values(training))
        return self.current

    # --- constraint quantities -----------------------------------------------------------

    def expected_sparsity(self) -> dict[str, torch.Tensor]:
        """Expected fraction of pruned units of every row: 1 - mean P(z > 0) over the last dimension.

        Returns:
            By type, a 1-D tensor with one entry per row (a 1-D mask is one row; a
            ``[L, ...]`` mask has one row per leading index, e.g. per layer), which the
            Lagrangian holds to the target row by row.
        """
        return {n: 1.0 - p.reshape(-1, p.shape[-1]).mean(-1) for n, p in self.keep_probabilities().items()}

    def expected_kept(self) -> dict[str, torch.Tensor]:
        """Expected kept units of every row, by type (1-D, one entry per row; no gradient)."""
        with torch.no_grad():
            return {n: p.reshape(-1, p.shape[-1]).sum(-1) for n, p in self.keep_probabilities().items()}

    def expected_params(self) -> torch.Tensor:
        """Expected prunable parameter count under the keep probabilities (differentiable)."""
        return expected_prunable_params(self.source, self.keep_probabilities())

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp every log_alpha to [ln 1e-2, ln 1e2]; call after each optimiser step."""
        for la in self.log_alpha.values():
            la.clamp_(hc.LOG_ALPHA_MIN, hc.LOG_ALPHA_MAX)


def expected_prunable_params(source: Arch, probs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Expected prunable parameters given keep probabilities (or 0/1 indicators) by type.

    E = sum_l s_attn[l] (D dh (2Q_l + 2K_l) + biases) + s_mlp[l] (3 D I_l + biases), with
    D = sum s_hidden, K_l = sum_g s_kv[l, g], Q_l = sum_g s_kv[l, g] sum_j s_head[l, g, j],
    I_l = sum_k s_int[l, k], s_attn = s_layer s_head_layer, s_mlp = s_layer s_mlp.
    With every probability at 1 it equals ``source.prunable_params()``; with 0/1 values of
    a uniform result it equals that architecture's exact count.

    Args:
        source: the source architecture.
        probs: keep probabilities by mask type; absent types count as always kept.

    Returns:
        A scalar tensor.
    """
    ref = next(iter(probs.values()), None)
    kw = {"dtype": ref.dtype if ref is not None else torch.float64}
    if ref is not None:
        kw["device"] = ref.device
    L, dh = source.layers, source.head_dim

    def rows(name: str, full: int) -> torch.Tensor:
        return probs[name].sum(-1) if name in probs else torch.full((L,), float(full), **kw)

    def per_layer(name: str) -> torch.Tensor:
        return probs[name] if name in probs else torch.ones(L, **kw)

    D = probs["hidden"].sum() if "hidden" in probs else torch.tensor(float(source.hidden), **kw)
    kv = probs["kv"] if "kv" in probs else torch.ones(L, source.kv_heads, **kw)
    K = kv.sum(-1)
    # query heads of each group, [L, G]: every group keeps its own
    per_group = probs["head"].sum(-1) if "head" in probs else float(source.heads_per_group)
    Q = (kv * per_group).sum(-1)
    I = rows("intermediate", source.intermediate)  # noqa: E741
    attn = D * dh * (2 * Q + 2 * K)
    if source.qkv_bias:
        attn = attn + dh * (Q + 2 * K)
    if source.o_bias:
        attn = attn + D
    mlp = 3 * D * I
    if source.mlp_bias:
        mlp = mlp + 2 * I + D
    s_layer = per_layer("layer")
    return (s_layer * per_layer("head_layer") * attn + s_layer * per_layer("mlp") * mlp).sum()
