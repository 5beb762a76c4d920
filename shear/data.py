"""Multi-domain training data: read, tokenise, pack, split, and sample by domain weights.

A data folder holds one entry per domain: a sub-folder (every ``.txt`` / ``.jsonl`` file in
it) or a single ``.txt`` / ``.jsonl`` file (the domain is the file's stem). ``.jsonl``
lines carry a ``"text"`` field. Each domain's documents are tokenised, joined with the
EOS token and packed into fixed-length sequences; the last sequences of every domain are
held out for evaluation, so the two splits never overlap.

:class:`DomainSampler` draws each sample's domain from the current domain weights and
walks each domain in a seeded shuffled order; its whole state (RNG, positions, weights)
is a plain dict of tensors and numbers that a checkpoint restores exactly. Every rank
draws the same global batch and keeps its own slice, so ranks agree on the weights and
see disjoint samples.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shear.errors import ShearError

TEXT_SUFFIXES = (".txt", ".jsonl")


def _read_texts(file: Path) -> list[str]:
    try:
        if file.suffix == ".txt":
            return [file.read_text(encoding="utf-8", errors="replace")]
        texts = []
        with open(file, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ShearError(f"{file}:{n}: not valid JSON ({e})") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ShearError(f'{file}:{n}: each .jsonl line needs a string "text" field')
                texts.append(record["text"])
        return texts
    except OSError as e:
        raise ShearError(f"cannot read {file}: {e}") from e


def read_domains(path: str | Path) -> dict[str, list[str]]:
    """Read a data folder into ``{domain: [document, ...]}``.

    Args:
        path: folder with one sub-folder or ``.txt``/``.jsonl`` file per domain.

    Returns:
        Documents by domain, domains in sorted order.

    Raises:
        ShearError: a missing path, no domains, or a domain without text.
    """
    root = Path(path)
    if not root.is_dir():
        raise ShearError(f"data folder not found: {root}")
    domains: dict[str, list[str]] = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            files = sorted(p for p in entry.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
            name = entry.name
        elif entry.suffix in TEXT_SUFFIXES:
            files, name = [entry], entry.stem
        else:
            continue
        texts = [t for f in files for t in _read_texts(f) if t.strip()]
        if not texts:
            raise ShearError(f"domain {name!r} in {root} has no text ({entry})")
        domains[name] = texts
    if not domains:
        raise ShearError(f"{root} holds no domains: add one sub-folder or .txt/.jsonl file per domain")
    return domains


@dataclass
class Corpus:
    """Packed token sequences per domain.

    Attributes:
        seq_len: tokens per sequence.
        train: ``{domain: LongTensor [n, seq_len]}``.
        eval: ``{domain: LongTensor [m, seq_len]}`` (held out, never in train).
    """

    seq_len: int
    train: dict[str, torch.Tensor]
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
    """Join documents (with EOS between them) and cut into full sequences of ``seq_len``."""
    flat: list[int] = []
    for ids in token_lists:
        flat.extend(ids)
        if eos is not None:
            flat.append(eos)
    n = len(flat) // seq_len
    return torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)


def build_corpus(
    path: str | Path,
    tokenizer: Any,
    seq_len: int,
    eval_sequences: int = 4,
    max_train_sequences: int | None = None,
) -> Corpus:
    """Read, tokenise and pack a data folder, holding out the last sequences of each domain.

    Args:
        path: the data folder (see :func:`read_domains`).
        tokenizer: a Hugging Face tokenizer.
        seq_len: tokens per sequence.
        eval_sequences: held-out sequences per domain.
        max_train_sequences: cap on training sequences per domain (None: all).

    Returns:
        The corpus.

    Raises:
        ShearError: a domain too small for one training and the evaluation sequences.
    """
    if seq_len < 2 or eval_sequences < 1:
        raise ShearError("seq_len must be >= 2 and eval_sequences >= 1")
    train, held = {}, {}
    for name, texts in read_domains(path).items():
        # whole documents are tokenised, then packed: their length beyond the model's
        # maximum is expected, so the tokenizer's warning about it is silenced
        ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        seqs = pack(ids, seq_len, tokenizer.eos_token_id)
        if len(seqs) < eval_sequences + 1:
            raise ShearError(
                f"domain {name!r} has {len(seqs)} sequences of {seq_len} tokens; it needs at least "
                f"{eval_sequences + 1} (training plus {eval_sequences} held out)"
            )
        held[name] = seqs[-eval_sequences:].clone()
        rest = seqs[:-eval_sequences]
        train[name] = rest[:max_train_sequences].clone() if max_train_sequences else rest.clone()
    return Corpus(seq_len, train, held)


@dataclass
class DomainSampler:
    """Draws batches whose samples pick their domain from ``weights``.

    Deterministic from ``seed``; :meth:`state_dict` / :meth:`load_state_dict` resume it
    exactly. With ``world_size > 1`` every rank draws the same global batch and returns
    its own contiguous slice.

    Attributes:
        corpus: the packed data.
        weights: ``{domain: weight}``, summing to 1.
        seed: RNG seed.
    """

    corpus: Corpus
    weights: dict[str, float]
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    _gen: torch.Generator = field(init=False, repr=False)
    _order: dict[str, torch.Tensor] = field(init=False, repr=False)
    _cursor: dict[str, int] = field(init=False, repr=False)
    _epoch: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.set_weights(self.weights)
        self._gen = torch.Generator().manual_seed(self.seed)
        self._cursor = dict.fromkeys(self.corpus.domains, 0)
        self._epoch = dict.fromkeys(self.corpus.domains, 0)
        self._order = {d: self._permutation(d, 0) for d in self.corpus.domains}

    def _permutation(self, domain: str, epoch: int) -> torch.Tensor:
        # Seeded per (domain, epoch), independent of the draw RNG, so resuming only needs
        # the cursor and epoch, not the permutation itself.
        idx = self.corpus.domains.index(domain)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + idx * 7919 + epoch)
        return torch.randperm(len(self.corpus.train[domain]), generator=g)

    def set_weights(self, weights: dict[str, float]) -> None:
        """Replace the domain weights (normalised; every corpus domain must be present)."""
        if set(weights) != set(self.corpus.domains):
            raise ShearError(
                f"domain weights {sorted(weights)} do not match the data's {self.corpus.domains}"
            )
        total = sum(weights.values())
        if not math.isfinite(total) or total <= 0 or any(w < 0 for w in weights.values()):
            raise ShearError(f"domain weights must be non-negative with a positive sum, got {weights}")
        self.weights = {d: weights[d] / total for d in self.corpus.domains}

    def _take(self, domain: str) -> torch.Tensor:
        if self._cursor[domain] == len(self._order[domain]):
            self._epoch[domain] += 1
            self._order[domain] = self._permutation(domain, self._epoch[domain])
            self._cursor[domain] = 0
        i = self._order[domain][self._cursor[domain]]
        self._cursor[domain] += 1
        return self.corpus.train[domain][i]

    def next_batch(self, global_batch: int) -> tuple[torch.Tensor, list[str]]:
        """The next batch of this rank.

        Args:
            global_batch: samples drawn across all ranks (divisible by world_size).

        Returns:
            ``input_ids [global_batch / world_size, seq_len]`` and each sample's domain.
        """
        if global_batch % self.world_size:
            raise ShearError(f"global batch {global_batch} is not divisible by {self.world_size} ranks")
        probs = torch.tensor([self.weights[d] for d in self.corpus.domains], dtype=torch.float64)
        picks = torch.multinomial(probs, global_batch, replacement=True, generator=self._gen).tolist()
        domains = [self.corpus.domains[p] for p in picks]
        rows = [self._take(d) for d in domains]  # every rank advances every cursor alike
        per = global_batch // self.world_size
        lo, hi = self.rank * per, (self.rank + 1) * per
        return torch.stack(rows[lo:hi]), domains[lo:hi]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (tensors, numbers and strings only)."""
        return {
            "rng": self._gen.get_state(),
            "cursor": dict(self._cursor),
            "epoch": dict(self._epoch),
            "weights": dict(self.weights),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        self.set_weights(state["weights"])
        self._gen.set_state(state["rng"])
        self._cursor = dict(state["cursor"])
        self._epoch = dict(state["epoch"])
        self._order = {d: self._permutation(d, self._epoch[d]) for d in self.corpus.domains}
