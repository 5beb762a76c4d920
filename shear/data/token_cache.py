"""Tokenise each domain once; keep its tokens as a flat array on disk, memory-mapped.

A domain's documents are tokenised (``datasets.map``, batched fast tokenizer) and joined
into one stream with EOS after every document, stored as ``uint16`` (vocabularies up to
65,536) or ``uint32``. The file name is a hash of the cache format, the tokenizer (its
full serialised vocabulary and rules), the EOS id and the domain's content fingerprint, so
an unchanged domain is never tokenised twice and a changed one never reuses stale tokens.
Files are written under a temporary name and renamed; the ``.json`` beside a ``.bin`` is
written last, so a killed run leaves no entry that looks complete. The temporary files a
kill left are removed by the next run that opens the cache, once they are an hour old
(another process may be writing a newer one: the cache is shared).

Sequence length is not part of the key: packing is a reshape of the mapped stream.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shear.checkpoint import LEFTOVER, write_atomic
from shear.data.sources import DEFAULT_SPEC, DataSpec, DomainSource, read_domain
from shear.errors import ShearError

CACHE_VERSION = 1
#: Age in seconds after which a temporary file in the cache is a killed write's leftover.
STALE_AFTER_S = 3600


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides how ``tokenizer`` encodes text."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # slow tokenizers: the vocabulary and the special tokens
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(getattr(tokenizer, "all_special_tokens", []), sort_keys=True).encode())
    return h.hexdigest()


class TokenFile:
    """A domain's token stream on disk; the memory map opens lazily, once per process.

    It pickles without the map, so DataLoader workers (fork or spawn) reopen the file
    rather than copying the array.

    Attributes:
        path: the ``.bin`` file.
        dtype: ``uint16`` or ``uint32``.
        tokens: length of the stream.
    """

    def __init__(self, path: Path, dtype: str, tokens: int):
        self.path, self.dtype, self.tokens = Path(path), dtype, int(tokens)
        self._array: np.ndarray | None = None

    @property
    def array(self) -> np.ndarray:
        """The read-only memory-mapped stream."""
        if self._array is None:
            if self.tokens == 0:
                self._array = np.zeros(0, dtype=self.dtype)
            else:
                self._array = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.tokens,))
        return self._array

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "dtype": self.dtype, "tokens": self.tokens, "_array": None}

    def __repr__(self) -> str:
        return f"TokenFile({str(self.path)!r}, {self.dtype}, tokens={self.tokens})"


def _default_cache() -> Path:
    if os.environ.get("SHEAR_TOKEN_CACHE"):
        return Path(os.environ["SHEAR_TOKEN_CACHE"])
    from shear.default_model import cache_root

    return cache_root() / "tokens"


def remove_leftovers(folder: Path) -> list[str]:
    """Delete the temporary files of killed writes in the cache (older than
    :data:`STALE_AFTER_S`); returns their names."""
    removed = []
    for entry in folder.iterdir():
        try:
            stale = LEFTOVER.match(entry.name) and time.time() - entry.stat().st_mtime > STALE_AFTER_S
            if stale and entry.is_file():
                entry.unlink()
                removed.append(entry.name)
        except OSError:
            continue  # gone already (another process cleaned it), or not ours to remove
    return removed


def _write_atomic(path: Path, chunks: Sequence[bytes | np.ndarray]) -> None:
    try:
        write_atomic(path, lambda f: [f.write(c if isinstance(c, bytes) else c.tobytes()) for c in chunks])
    except OSError as e:
        raise ShearError(f"cannot write the token cache {path}: {e}") from e


def _tokenize(ds: Any, tokenizer: Any, eos: int | None, dtype: str, num_proc: int | None) -> list[np.ndarray]:
    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        # whole documents are tokenised, then packed: their length beyond the model's maximum is
        # expected, so the tokenizer's warning about it is silenced
        return {"ids": tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]}

    from shear.data.sources import _quiet_datasets

    with _quiet_datasets():
        tok = ds.map(
            encode,
            batched=True,
            batch_size=256,
            remove_columns=["text"],
            num_proc=num_proc,
            keep_in_memory=True,
        )
    chunks = []
    for batch in tok.iter(batch_size=1024):
        flat: list[int] = []
        for ids in batch["ids"]:
            flat.extend(ids)
            if eos is not None:
                flat.append(eos)
        chunks.append(np.asarray(flat, dtype=dtype))
    return chunks


def tokenize_domains(
    sources: Sequence[DomainSource],
    tokenizer: Any,
    spec: DataSpec = DEFAULT_SPEC,
    cache_dir: str | Path | None = None,
    num_proc: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, TokenFile]:
    """The token stream of every domain, from the cache or tokenised now (then cached).

    Args:
        sources: from :func:`shear.data.sources.find_sources`.
        tokenizer: a Hugging Face tokenizer.
        spec: column names.
        cache_dir: the cache folder (default: ``$SHEAR_TOKEN_CACHE``, else ``tokens/`` in the shear
            cache: ``$SHEAR_CACHE`` or ``~/.cache/shear``).
        num_proc: tokenising processes (None: one, the fast tokenizer batches in threads).
        log: called with one line per domain (cached or tokenised, tokens).

    Returns:
        ``{domain: TokenFile}`` in the order of ``sources``.
    """
    eos = tokenizer.eos_token_id
    vocab = len(tokenizer)
    dtype = "uint16" if vocab <= 1 << 16 else "uint32"
    tok_fp = tokenizer_fingerprint(tokenizer)
    folder = Path(cache_dir) if cache_dir is not None else _default_cache()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ShearError(f"cannot create the token cache {folder}: {e}") from e
    removed = remove_leftovers(folder)
    if removed and log:
        log(f"removed what interrupted writes left in the token cache {folder}: {', '.join(removed)}")
    out = {}
    for src in sources:
        key = hashlib.sha256(f"{CACHE_VERSION}:{tok_fp}:{eos}:{dtype}:{src.fingerprint}".encode()).hexdigest()
        bin_path, meta_path = folder / f"{key[:32]}.bin", folder / f"{key[:32]}.json"
        meta = None
        if meta_path.is_file() and bin_path.is_file():
            meta = json.loads(meta_path.read_text())
            itemsize = np.dtype(meta["dtype"]).itemsize
            if bin_path.stat().st_size != meta["tokens"] * itemsize:
                meta = None  # damaged (a copy cut short): tokenise again
        if meta is None:
            ds = read_domain(src, spec)
            chunks = _tokenize(ds, tokenizer, eos, dtype, num_proc)
            meta = {
                "version": CACHE_VERSION,
                "domain": src.name,
                "tokens": int(sum(len(c) for c in chunks)),
                "documents": len(ds),
                "dtype": dtype,
                "eos": eos,
                "tokenizer": getattr(tokenizer, "name_or_path", ""),
            }
            _write_atomic(bin_path, chunks)
            _write_atomic(meta_path, [json.dumps(meta, indent=1).encode()])
            status = "tokenised"
        else:
            status = "cached"
        if log:
            log(f"{src.name}: {meta['tokens']:,} tokens, {meta['documents']:,} docs ({status}, {bin_path})")
        out[src.name] = TokenFile(bin_path, meta["dtype"], meta["tokens"])
    return out
