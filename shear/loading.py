"""Finding and loading source models: a Hugging Face folder, a bare config, or ``default``.

shear works on decoder-only LLaMA-family models: LlamaForCausalLM, MistralForCausalLM and
Qwen2ForCausalLM. Configs are read from JSON with transformers' own config classes and
never with remote code.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from shear.arch import SUPPORTED_ARCHITECTURES, supported_text
from shear.errors import ShearError, load_failure

SUPPORTED_MODEL_TYPES = tuple(SUPPORTED_ARCHITECTURES.values())

# Fields shear needs to reason about the shapes; the config classes would otherwise fill
# in their own defaults (e.g. LLaMA-7B's sizes) for missing ones.
REQUIRED_CONFIG_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
)
_OPTIONAL_INT_FIELDS = ("num_key_value_heads", "head_dim")

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")

DEFAULT_MODEL_NAME = "default"


def resolve_model_path(name: str | os.PathLike) -> Path:
    """Turn a model name into a path.

    Args:
        name: ``"default"`` (the embedded SmolLM2-135M-Instruct), a Hugging Face folder
            holding config.json, or a path to a JSON config file.

    Returns:
        The folder, or the JSON file.

    Raises:
        ShearError: the path does not exist, or is a folder without config.json, or a file
            that is not JSON.
    """
    if isinstance(name, str) and name == DEFAULT_MODEL_NAME:
        from shear.default_model import default_model_dir

        return default_model_dir()
    path = Path(name).expanduser()
    if path.is_dir():
        _refuse_run_folder(path)
        if not (path / "config.json").is_file():
            raise ShearError(
                f"{path} is a folder but has no config.json; it is not a Hugging Face model folder"
            )
        return path
    if path.is_file():
        if path.suffix.lower() != ".json":
            raise ShearError(f"{path} is not a model folder or a .json config file")
        return path
    raise ShearError(
        f"model not found: {path} does not exist (give a Hugging Face model folder, a config .json "
        f'file, or "{DEFAULT_MODEL_NAME}")'
    )


def _refuse_run_folder(path: Path) -> None:
    """A run folder's config.json holds the run's options, not a model's: name its model."""
    from shear.runfolder import MODEL_FOLDER, run_task

    task = run_task(path)
    if task is None:
        return
    model = path / MODEL_FOLDER[task]
    later = "" if model.is_dir() else f" (not written yet: `shear export {path}` writes it)"
    raise ShearError(
        f"{path} is the folder of a `shear {task}` run, not a model: pass its model, {model}{later}"
    )


def check_seq_len(config: PreTrainedConfig, seq_len: int, option: str = "--seq-len") -> None:
    """Refuse sequences longer than the model's positions (``max_position_embeddings``).

    Raises:
        ShearError: ``seq_len`` is above the model's maximum.
    """
    most = getattr(config, "max_position_embeddings", None)
    if isinstance(most, int) and seq_len > most:
        raise ShearError(
            f"{option} {seq_len} is longer than the model's max_position_embeddings ({most}): positions "
            f"beyond it were never trained; give at most {most}"
        )


def _config_file(path: Path) -> Path:
    return path / "config.json" if path.is_dir() else path


def _read_config_dict(config_file: Path) -> dict[str, Any]:
    try:
        with open(config_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ShearError(f"{config_file} is not valid JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ShearError(f"{config_file} is not UTF-8 text, so not a JSON config ({exc})") from exc
    except OSError as exc:
        raise ShearError(f"cannot read {config_file}: {exc}") from exc
    if not isinstance(data, dict):
        raise ShearError(f"{config_file} does not hold a JSON object, so it is not a model config")
    return data


def check_config_dict(data: dict[str, Any], where: str = "config") -> str:
    """Check that a raw config dict describes a supported model; return its model_type.

    Args:
        data: the config as read from JSON.
        where: what to call it in error messages (usually its path).

    Returns:
        The model_type (``"llama"``, ``"mistral"`` or ``"qwen2"``).

    Raises:
        ShearError: unsupported architecture or model type, or a needed field missing or bad.
    """
    architectures = data.get("architectures")
    architecture = None
    if architectures:
        if not isinstance(architectures, list) or not isinstance(architectures[0], str):
            raise ShearError(
                f"{where}: 'architectures' should be a list of class names, got {architectures!r}"
            )
        architecture = architectures[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ShearError(
                f"{where}: unsupported architecture {architecture}; shear supports {supported_text()}"
            )
    model_type = data.get("model_type")
    if model_type is None and architecture is not None:
        model_type = SUPPORTED_ARCHITECTURES[architecture]
    if model_type not in SUPPORTED_MODEL_TYPES:
        shown = "missing" if model_type is None else repr(model_type)
        raise ShearError(f"{where}: unsupported model_type ({shown}); shear supports {supported_text()}")
    if architecture is not None and SUPPORTED_ARCHITECTURES[architecture] != model_type:
        raise ShearError(
            f"{where}: architecture {architecture} does not match model_type {model_type!r} "
            f"(expected {SUPPORTED_ARCHITECTURES[architecture]!r})"
        )
    missing = [field for field in REQUIRED_CONFIG_FIELDS if field not in data]
    if missing:
        raise ShearError(f"{where}: the config lacks {', '.join(missing)}, which shear needs")
    for field in REQUIRED_CONFIG_FIELDS + _OPTIONAL_INT_FIELDS:
        value = data.get(field)
        if field in _OPTIONAL_INT_FIELDS and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ShearError(f"{where}: {field} should be a positive integer, got {value!r}")
    return model_type


def load_config(name: str | os.PathLike) -> PreTrainedConfig:
    """Read and check a model's config, without loading any weights.

    Args:
        name: ``"default"``, a Hugging Face model folder, or a JSON config file (any name).

    Returns:
        The transformers config (LlamaConfig, MistralConfig or Qwen2Config).

    Raises:
        ShearError: missing path, unreadable config, unsupported architecture, or a config
            without the fields shear needs.
    """
    path = resolve_model_path(name)
    config_file = _config_file(path)
    data = _read_config_dict(config_file)
    model_type = check_config_dict(data, where=str(config_file))
    config_class = CONFIG_MAPPING[model_type]
    try:
        return config_class.from_dict(data)
    except Exception as exc:  # noqa: BLE001 (transformers' validators raise their own types)
        reason = " ".join(str(exc).split())
        raise ShearError(f"{config_file}: not a valid {config_class.__name__}: {reason}") from exc


def has_weights(folder: Path) -> bool:
    """Return whether a folder holds Hugging Face weight files (safetensors or .bin)."""
    return any((folder / name).is_file() for name in WEIGHT_FILES)


def load_source(
    name: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, Any | None]:
    """Load a source model and its tokenizer.

    The config is checked first, so an unsupported model fails before any weights load.

    Args:
        name: ``"default"`` or a Hugging Face model folder with weights.
        dtype: the dtype to load the weights in.
        device: where to put the model.

    Returns:
        ``(model, tokenizer)``: the model in eval mode, and the tokenizer, or None when the
        folder has no tokenizer files.

    Raises:
        ShearError: as :func:`load_config`, or the path is a bare config or a folder without
            weights, or the weights or tokenizer cannot be loaded.
    """
    config = load_config(name)
    path = resolve_model_path(name)
    if not path.is_dir():
        raise ShearError(f"{path} is a bare config file; loading a model needs a folder with weights")
    if not has_weights(path):
        raise ShearError(f"{path} has a config but no weights (looked for {', '.join(WEIGHT_FILES)})")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, trust_remote_code=False
        )
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError, pickle.UnpicklingError) as exc:
        # a damaged safetensors file; a pickle that weights_only refused (nothing in it ran)
        raise ShearError(f"could not load the weights in {path}: {load_failure(exc)}") from exc
    model.to(device)
    model.eval()
    return model, load_tokenizer(name)


def load_tokenizer(name: str | os.PathLike) -> Any | None:
    """The tokenizer of a model folder, or None when the folder has no tokenizer files.

    Raises:
        ShearError: the tokenizer files cannot be loaded.
    """
    path = resolve_model_path(name)
    if not any((path / fname).is_file() for fname in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise ShearError(f"could not load the tokenizer in {path}: {exc}") from exc


def meta_model(name: str | os.PathLike, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The model of ``name``'s config on the meta device: its structure, no memory, no weights
    read (the ranks other than 0 of a sharded run receive the weights by broadcast).

    Raises:
        ShearError: as :func:`load_config`.
    """
    config = load_config(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    return model.eval()
