"""Packed token sequences per domain, with a held-out evaluation split that never overlaps training.

Each domain's token stream (documents joined with EOS, see :mod:`shear.data.token_cache`)
is cut into consecutive sequences of ``seq_len`` tokens; the partial tail is dropped.
``eval_sequences`` of them, spread evenly over the stream (so a domain made of several
sources is evaluated on all of them), are held out; the rest is training data, so the two
splits share no token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shear.data.sources import DEFAULT_SPEC, DataSpec, find_sources, read_domain
from shear.data.token_cache import TokenFile, tokenize_domains
from shear.errors import ShearError


class TokenRows:
    """Some of the ``seq_len``-token sequences of a memory-mapped stream, by sequence index.

    Indexing returns one sequence as an int64 tensor; nothing is read before that.
    """

    def __init__(self, file: TokenFile, seq_len: int, rows: np.ndarray):
        self.file, self.seq_len, self.rows = file, seq_len, np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        lo = int(self.rows[i]) * self.seq_len
        return torch.from_numpy(self.file.array[lo : lo + self.seq_len].astype(np.int64))

    def numel(self) -> int:
        """Tokens in these sequences."""
        return len(self.rows) * self.seq_len

    def tensor(self) -> torch.Tensor:
        """All these sequences as one ``[len, seq_len]`` int64 tensor (read into memory)."""
        if len(self.rows) == 0:
            return torch.zeros(0, self.seq_len, dtype=torch.long)
        idx = self.rows[:, None] * self.seq_len + np.arange(self.seq_len)
        return torch.from_numpy(self.file.array[idx].astype(np.int64))


def held_out_rows(n: int, m: int) -> np.ndarray:
    """``m`` of ``n`` sequence indices spread evenly: the middle one of each of ``m`` equal stretches."""
    return ((np.arange(m) + 0.5) * n / m).astype(np.int64)


@dataclass
class Corpus:
    """Packed token sequences per domain.

    Attributes:
        seq_len: tokens per sequence.
        train: ``{domain: rows}``; rows support ``len()`` and ``rows[i] -> LongTensor [seq_len]``
            (a :class:`TokenRows` over the cache, or a ``[n, seq_len]`` tensor).
        eval: ``{domain: LongTensor [m, seq_len]}`` (held out, never in train).
    """

    seq_len: int
    train: dict[str, Any]
    eval: dict[str, torch.Tensor]

    @property
    def domains(self) -> list[str]:
        """Domain names, in a fixed order."""
        return list(self.train)

    def summary(self) -> dict[str, dict[str, int]]:
        """Sequences and tokens per domain and split."""
        return {
            d: {
                "train_sequences": len(self.train[d]),
                "eval_sequences": len(self.eval[d]),
                "train_tokens": self.train[d].numel(),
                "eval_tokens": self.eval[d].numel(),
            }
            for d in self.domains
        }


def pack(token_lists: list[list[int]], seq_len: int, eos: int | None) -> torch.Tensor:
    """Join documents (with EOS after each) and cut into full sequences of ``seq_len``.

    The in-memory twin of the cache's stream layout (:mod:`shear.data.token_cache`).
    """
    flat: list[int] = []
    for ids in token_lists:
        flat.extend(ids)
        if eos is not None:
            flat.append(eos)
    n = len(flat) // seq_len
    return torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)


def read_domains(path: str | Path, spec: DataSpec = DEFAULT_SPEC) -> dict[str, list[str]]:
    """Read a data path into ``{domain: [document, ...]}`` (small data; training streams from the cache).

    Args:
        path: a domain folder or a saved Hugging Face dataset (see :mod:`shear.data.sources`).
        spec: column names.

    Returns:
        Documents by domain, domains in sorted order.
    """
    return {s.name: list(read_domain(s, spec)["text"]) for s in find_sources(path, spec)}


def build_corpus(
    path: str | Path,
    tokenizer: Any,
    seq_len: int,
    eval_sequences: int = 4,
    max_train_sequences: int | None = None,
    *,
    spec: DataSpec = DEFAULT_SPEC,
    cache_dir: str | Path | None = None,
    num_proc: int | None = None,
    log: Callable[[str], None] | None = None,
) -> Corpus:
    """Read, tokenise (once, cached) and pack a data path, holding out sequences spread over each domain.

    Args:
        path: a domain folder or a saved Hugging Face dataset.
        tokenizer: a Hugging Face tokenizer.
        seq_len: tokens per sequence.
        eval_sequences: held-out sequences per domain.
        max_train_sequences: cap on training sequences per domain (None: all).
        spec: text and domain column names.
        cache_dir: token cache folder (default: under the shear cache).
        num_proc: tokenising processes.
        log: progress lines (per domain: tokens, cached or not).

    Returns:
        The corpus; training rows stay memory-mapped.

    Raises:
        ShearError: bad input, or a domain too small for one training and the evaluation sequences.
    """
    if seq_len < 2 or eval_sequences < 1:
        raise ShearError("seq_len must be >= 2 and eval_sequences >= 1")
    if max_train_sequences is not None and max_train_sequences < 1:
        raise ShearError(f"max_train_sequences must be positive, got {max_train_sequences}")
    streams = tokenize_domains(find_sources(path, spec), tokenizer, spec, cache_dir, num_proc, log)
    train, held = {}, {}
    for name, file in streams.items():
        n = file.tokens // seq_len
        if n < eval_sequences + 1:
            raise ShearError(
                f"domain {name!r} has {n} sequences of {seq_len} tokens; it needs at least "
                f"{eval_sequences + 1} (training plus {eval_sequences} held out)"
            )
        held_out = held_out_rows(n, eval_sequences)
        rest = np.setdiff1d(np.arange(n), held_out)
        held[name] = TokenRows(file, seq_len, held_out).tensor()
        train[name] = TokenRows(file, seq_len, rest[:max_train_sequences] if max_train_sequences else rest)
    return Corpus(seq_len, train, held)
