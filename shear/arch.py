"""Architecture of a LLaMA-family model, read from its config, and exact parameter counts.

One :class:`Arch` describes a uniform decoder (every layer the same shape), which is
what both a source model and a Sheared-LLaMA target are. Counts include biases, so they
match ``sum(p.numel() for p in model.parameters())`` of the Hugging Face model exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from shear.errors import ShearError

#: Causal-LM classes shear can prune, and their ``model_type``.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


def supported_text() -> str:
    """Human-readable list of the supported architectures, for error messages."""
    return ", ".join(f"{a} (model_type {t!r})" for a, t in SUPPORTED_ARCHITECTURES.items())


@dataclass(frozen=True)
class Arch:
    """Shape of a uniform LLaMA-family decoder.

    Attributes:
        model_type: ``llama``, ``mistral`` or ``qwen2``.
        layers: number of decoder layers (L).
        hidden: residual-stream width (d).
        heads: query heads per layer (H).
        kv_heads: key/value heads per layer (G); ``heads % kv_heads == 0``.
        head_dim: width of one head (dh); pruning never changes it.
        intermediate: MLP width (I).
        vocab: vocabulary size.
        tied: whether the LM head shares the embedding matrix.
        qkv_bias: q, k and v projections carry biases.
        o_bias: o_proj carries a bias.
        mlp_bias: gate, up and down projections carry biases.
    """

    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False

    @property
    def architecture(self) -> str:
        """The Hugging Face class name (``LlamaForCausalLM``, ...)."""
        return next(a for a, t in SUPPORTED_ARCHITECTURES.items() if t == self.model_type)

    @property
    def heads_per_group(self) -> int:
        """Query heads sharing one KV head (n = H / G); 1 for multi-head attention."""
        return self.heads // self.kv_heads

    @classmethod
    def from_config(cls, config: Any) -> Arch:
        """Read the architecture from a Hugging Face config of a supported family.

        Args:
            config: a ``PretrainedConfig`` (or anything with the same attributes).

        Returns:
            The :class:`Arch`.

        Raises:
            ShearError: unsupported family, or a field missing or inconsistent.
        """
        model_type = getattr(config, "model_type", None)
        archs = getattr(config, "architectures", None) or []
        if model_type not in SUPPORTED_ARCHITECTURES.values() or (
            archs and archs[0] not in SUPPORTED_ARCHITECTURES
        ):
            found = archs[0] if archs else model_type
            raise ShearError(f"unsupported architecture {found!r}; shear supports {supported_text()}")
        try:
            heads = int(config.num_attention_heads)
            hidden = int(config.hidden_size)
            kv = getattr(config, "num_key_value_heads", None)
            head_dim = getattr(config, "head_dim", None) or hidden // heads
            arch = cls(
                model_type=model_type,
                layers=int(config.num_hidden_layers),
                hidden=hidden,
                heads=heads,
                kv_heads=int(kv) if kv is not None else heads,
                head_dim=int(head_dim),
                intermediate=int(config.intermediate_size),
                vocab=int(config.vocab_size),
                tied=bool(getattr(config, "tie_word_embeddings", False)),
                # Qwen2 hard-codes biases on q/k/v only; Llama's attention_bias covers q/k/v/o.
                qkv_bias=model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
                o_bias=model_type == "llama" and bool(getattr(config, "attention_bias", False)),
                mlp_bias=model_type == "llama" and bool(getattr(config, "mlp_bias", False)),
            )
        except (AttributeError, TypeError, ValueError, ZeroDivisionError) as e:
            raise ShearError(f"config of model_type {model_type!r} lacks a field shear needs: {e}") from e
        arch.check()
        return arch

    def check(self) -> None:
        """Raise :class:`ShearError` unless every size is positive and heads divide evenly."""
        for f in ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab"):
            if getattr(self, f) <= 0:
                raise ShearError(f"{f} must be positive, got {getattr(self, f)}")
        if self.heads % self.kv_heads:
            raise ShearError(
                f"heads ({self.heads}) must be divisible by kv_heads ({self.kv_heads}): "
                "every KV group holds the same number of query heads"
            )
        if self.model_type == "llama" and self.hidden % self.heads:
            raise ShearError(
                f"hidden ({self.hidden}) must be divisible by heads ({self.heads}): transformers' "
                "LlamaConfig refuses other sizes, so the exported model could not be loaded"
            )

    def replace(self, **changes: Any) -> Arch:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    # --- parameter counts -------------------------------------------------------------

    def attention_params(self) -> int:
        """Parameters of one layer's q, k, v and o projections (biases included)."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        n = self.hidden * (2 * q + 2 * kv)
        if self.qkv_bias:
            n += q + 2 * kv
        if self.o_bias:
            n += self.hidden
        return n

    def mlp_params(self) -> int:
        """Parameters of one layer's gate, up and down projections (biases included)."""
        n = 3 * self.hidden * self.intermediate
        if self.mlp_bias:
            n += 2 * self.intermediate + self.hidden
        return n

    def prunable_params(self) -> int:
        """Parameters the masks act on: every layer's attention and MLP projections."""
        return self.layers * (self.attention_params() + self.mlp_params())

    def embedding_params(self) -> int:
        """Token embedding plus the LM head (counted once when tied)."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def norm_params(self) -> int:
        """RMSNorm weights: two per layer and the final one."""
        return (2 * self.layers + 1) * self.hidden

    def total_params(self) -> int:
        """Every parameter of the causal LM, as ``model.num_parameters()`` counts it."""
        return self.prunable_params() + self.embedding_params() + self.norm_params()

    def summary(self) -> dict[str, Any]:
        """Plain-dict view with the counts, for printing and JSON."""
        d = dataclasses.asdict(self)
        d["architecture"] = self.architecture
        d["params"] = {
            "total": self.total_params(),
            "prunable": self.prunable_params(),
            "embedding_and_lm_head": self.embedding_params(),
            "norms": self.norm_params(),
        }
        return d
