"""The target architecture a run prunes to: parsed from numbers or a config, then validated.

A target is an :class:`~shear.arch.Arch` of the same family as the source, no larger in
any dimension, with the source's head dimension, vocabulary and embedding tying, and a
valid uniform GQA layout reachable by pruning (KV groups and query heads per group each
no more than the source has).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from shear.arch import Arch
from shear.errors import ShearError

#: Accepted keys in ``"layers=24,hidden=384,..."`` strings and dicts, with their Arch field.
TARGET_KEYS: dict[str, str] = {
    "layers": "layers",
    "num_hidden_layers": "layers",
    "hidden": "hidden",
    "hidden_size": "hidden",
    "heads": "heads",
    "num_attention_heads": "heads",
    "kv_heads": "kv_heads",
    "num_key_value_heads": "kv_heads",
    "intermediate": "intermediate",
    "intermediate_size": "intermediate",
}
_DIMENSIONS = ("layers", "hidden", "heads", "kv_heads", "intermediate")


def parse_target_numbers(text: str) -> dict[str, int]:
    """Parse ``"layers=24,hidden=384,heads=6,kv_heads=2,intermediate=1024"``.

    Args:
        text: comma-separated ``key=integer`` pairs; keys from :data:`TARGET_KEYS`.

    Returns:
        A dict from Arch field name to the requested size.
    """
    out: dict[str, int] = {}
    named: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in TARGET_KEYS:
            raise ShearError(
                f"cannot read target item {item!r}: expected key=integer with key one of "
                f"{', '.join(sorted(set(TARGET_KEYS)))} (or a path to a config.json)"
            )
        field = TARGET_KEYS[key]
        if field in named:
            raise ShearError(f"the target names {field} twice ({named[field]} and {key}); give it once")
        try:
            out[field] = int(value)
        except ValueError:
            raise ShearError(f"target {key} must be an integer, got {value.strip()!r}") from None
        named[field] = key
    if not out:
        raise ShearError("empty target: give key=integer pairs or a config.json path")
    return out


def _config_dict(path: Path) -> dict[str, Any]:
    file = path / "config.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShearError(f"target config not found: {file}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShearError(f"target config {file} is not valid JSON: {e}") from None
    except OSError as e:
        raise ShearError(f"cannot read the target config {file}: {e}") from None
    if not isinstance(data, dict):
        raise ShearError(
            f"target config {file} holds {type(data).__name__ if data is not None else 'null'}, not a "
            "JSON object of sizes"
        )
    return data


def _integer(value: Any, name: str) -> int:
    """A size given as an integer (an integral float such as 64.0 too; never 64.7, "64" or true)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ShearError(f"target {name} must be an integer, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise ShearError(f"target {name} must be an integer, got {value!r}")
    return int(value)


def _from_config_dict(source: Arch, cfg: dict[str, Any]) -> Arch:
    """A target Arch from a config dict, checked for family and fixed-by-pruning fields."""
    mt = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if mt is not None and mt != source.model_type or archs and archs[0] != source.architecture:
        raise ShearError(
            f"architecture mismatch: the source is {source.architecture} but the target config is "
            f"{archs[0] if archs else mt}; pruning keeps the model family"
        )
    needed = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
    missing = [k for k in needed if k not in cfg]
    if missing:
        raise ShearError(f"target config lacks {', '.join(missing)}")
    heads = _integer(cfg["num_attention_heads"], "num_attention_heads")
    hidden = _integer(cfg["hidden_size"], "hidden_size")
    if heads <= 0:
        raise ShearError(f"heads must be positive, got {heads}")
    head_dim = _integer(cfg["head_dim"], "head_dim") if cfg.get("head_dim") is not None else hidden // heads
    if head_dim != source.head_dim:
        raise ShearError(
            f"the target's head dimension is {head_dim} but the source's is {source.head_dim}: pruning "
            "removes whole heads and never changes the head dimension (set head_dim in the target config)"
        )
    if "vocab_size" in cfg and int(cfg["vocab_size"]) != source.vocab:
        raise ShearError(f"vocabulary mismatch: target {cfg['vocab_size']}, source {source.vocab}")
    if "tie_word_embeddings" in cfg and bool(cfg["tie_word_embeddings"]) != source.tied:
        raise ShearError(
            f"tie_word_embeddings mismatch: target {cfg['tie_word_embeddings']}, source {source.tied}"
        )
    kv = cfg.get("num_key_value_heads")
    return source.replace(
        layers=_integer(cfg["num_hidden_layers"], "num_hidden_layers"),
        hidden=hidden,
        heads=heads,
        kv_heads=heads if kv is None else _integer(kv, "num_key_value_heads"),
        intermediate=_integer(cfg["intermediate_size"], "intermediate_size"),
    )


def _from_numbers(source: Arch, nums: dict[str, int]) -> Arch:
    """A target Arch from explicit sizes; unspecified dimensions keep the source's."""
    nums = dict(nums)
    if "heads" in nums and "kv_heads" not in nums and nums["heads"] != source.heads:
        if source.heads_per_group == 1:
            nums["kv_heads"] = nums["heads"]  # multi-head attention stays multi-head
        else:
            h = nums["heads"]
            options = [
                f"kv_heads={g}"
                for g in range(1, source.kv_heads + 1)
                if h % g == 0 and h // g <= source.heads_per_group
            ]
            raise ShearError(
                f"heads changes to {h} on a GQA source ({source.heads} heads in {source.kv_heads} KV "
                f"groups): name kv_heads too; valid choices: {', '.join(options) or 'none'}"
            )
    return source.replace(**nums)


def resolve_target(source: Arch, spec: str | os.PathLike | dict | Arch) -> Arch:
    """Turn a target specification into a validated target :class:`Arch`.

    Args:
        source: the source model's architecture.
        spec: one of ``"layers=24,hidden=384,heads=6,kv_heads=2,intermediate=1024"``
            (unnamed dimensions keep the source's size), a path to a config.json or to a
            folder holding one, a dict of sizes or of config.json fields, or an Arch.

    Returns:
        The target Arch (same family, head dim, vocab and tying as the source).

    Raises:
        ShearError: the spec cannot be read or is not a valid target for ``source``.
    """
    if isinstance(spec, Arch):
        target = spec
        if (target.model_type, target.head_dim, target.vocab, target.tied) != (
            source.model_type,
            source.head_dim,
            source.vocab,
            source.tied,
        ):
            raise ShearError(
                "architecture mismatch: a target Arch must share the source's family, head dim, "
                "vocabulary and embedding tying"
            )
    elif isinstance(spec, dict):
        if any(k in spec for k in ("hidden_size", "model_type", "num_hidden_layers")):
            target = _from_config_dict(source, spec)
        else:
            nums: dict[str, int] = {}
            for k, v in spec.items():
                field = TARGET_KEYS.get(k, k)
                if field in nums:
                    raise ShearError(f"the target names {field} twice; give it once")
                nums[field] = _integer(v, k)
            target = _from_numbers(source, nums)
    else:
        text = os.fspath(spec)
        path = Path(text)
        looks_like_path = (
            bool(text.strip())
            and "=" not in text
            and (_exists(path) or text.endswith(".json") or os.sep in text)
        )
        if looks_like_path:
            target = _from_config_dict(source, _config_dict(path))
        else:
            target = _from_numbers(source, parse_target_numbers(text))
    check_target(source, target)
    return target


def _exists(path: Path) -> bool:
    """``path.exists()``, False for a name the file system cannot hold (too long)."""
    try:
        return path.exists()
    except OSError:
        return False


def check_target(source: Arch, target: Arch) -> None:
    """Raise :class:`ShearError` unless ``target`` is reachable by pruning ``source``."""
    for f in _DIMENSIONS:
        if getattr(target, f) <= 0:
            raise ShearError(f"target {f} must be positive, got {getattr(target, f)}")
    larger = [
        f"{f} {getattr(target, f)} > {getattr(source, f)}"
        for f in _DIMENSIONS
        if getattr(target, f) > getattr(source, f)
    ]
    if larger:
        raise ShearError("the target is larger than the source: " + "; ".join(larger))
    target.check()
    if target.heads_per_group > source.heads_per_group:
        raise ShearError(
            f"the target has {target.heads_per_group} query heads per KV group but the source has "
            f"{source.heads_per_group}: pruning cannot add query heads to a group "
            f"(choose kv_heads >= {-(-target.heads // source.heads_per_group)})"
        )
