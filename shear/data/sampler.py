"""Which sequences each batch holds: every sample draws its domain from the current weights.

:class:`DomainSampler` plans batches as ``(domain index, row)`` pairs. Each domain is
walked in a seeded shuffled order (a fresh permutation per pass), so a domain repeats only
after all its sequences were seen. The whole state (draw RNG, per-domain positions and
passes, weights) is a small dict that a checkpoint restores exactly. Every rank plans the
same global batch and keeps its own contiguous slice: ranks agree on the weights and see
disjoint samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from shear.data.corpus import Corpus
from shear.errors import ShearError

#: One planned sample: (index into ``corpus.domains``, training row of that domain).
Plan = list[tuple[int, int]]


#: Offset between the seeds of two data streams: far from any seed, domain or epoch term, and
#: below 2**32 (the CPU generator keeps only a seed's low 32 bits).
_STREAM_STRIDE = 0x9E3779B1


@dataclass
class DomainSampler:
    """Plans batches whose samples pick their domain from ``weights``.

    Deterministic from ``seed``; :meth:`state_dict` / :meth:`load_state_dict` resume it
    exactly.

    Attributes:
        corpus: the packed data.
        weights: ``{domain: weight}``, normalised to sum to 1.
        seed: RNG seed.
        stream: which of the seed's data streams to read. Pruning reads stream 1 and
            continued pre-training stream 0, so that the second stage of a run does not
            re-read, in the same order, the sequences the first stage trained on.
        rank: this process's rank.
        world_size: number of ranks sharing each global batch.
    """

    corpus: Corpus
    weights: dict[str, float]
    seed: int = 0
    stream: int = 0
    rank: int = 0
    world_size: int = 1
    _gen: torch.Generator = field(init=False, repr=False)
    _order: dict[str, torch.Tensor] = field(init=False, repr=False)
    _cursor: dict[str, int] = field(init=False, repr=False)
    _epoch: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        empty = [d for d in self.corpus.domains if len(self.corpus.train[d]) == 0]
        if empty:
            raise ShearError(f"domain(s) {empty} have no training sequences")
        self.set_weights(self.weights)
        self._gen = torch.Generator().manual_seed(self.seed + self.stream * _STREAM_STRIDE)
        self._cursor = dict.fromkeys(self.corpus.domains, 0)
        self._epoch = dict.fromkeys(self.corpus.domains, 0)
        self._order = {d: self._permutation(d, 0) for d in self.corpus.domains}

    def _permutation(self, domain: str, epoch: int) -> torch.Tensor:
        # Seeded per (domain, epoch), independent of the draw RNG, so resuming only needs
        # the cursor and epoch, not the permutation itself.
        idx = self.corpus.domains.index(domain)
        stream = self.stream * _STREAM_STRIDE
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + idx * 7919 + epoch + stream)
        return torch.randperm(len(self.corpus.train[domain]), generator=g)

    def set_weights(self, weights: dict[str, float]) -> None:
        """Replace the domain weights (normalised; every corpus domain must be present)."""
        if set(weights) != set(self.corpus.domains):
            raise ShearError(
                f"domain weights {sorted(weights)} do not match the data's {self.corpus.domains}"
            )
        total = sum(weights.values())
        if not math.isfinite(total) or total <= 0 or any(not w >= 0 for w in weights.values()):
            raise ShearError(f"domain weights must be non-negative with a positive sum, got {weights}")
        self.weights = {d: weights[d] / total for d in self.corpus.domains}

    def _take(self, domain: str) -> int:
        if self._cursor[domain] == len(self._order[domain]):
            self._epoch[domain] += 1
            self._order[domain] = self._permutation(domain, self._epoch[domain])
            self._cursor[domain] = 0
        row = int(self._order[domain][self._cursor[domain]])
        self._cursor[domain] += 1
        return row

    def next_plan(self, global_batch: int) -> Plan:
        """Plan this rank's share of the next global batch.

        Args:
            global_batch: samples drawn across all ranks (divisible by world_size).

        Returns:
            ``global_batch / world_size`` pairs ``(domain index, row)``.
        """
        if global_batch % self.world_size:
            raise ShearError(f"global batch {global_batch} is not divisible by {self.world_size} ranks")
        probs = torch.tensor([self.weights[d] for d in self.corpus.domains], dtype=torch.float64)
        picks = torch.multinomial(probs, global_batch, replacement=True, generator=self._gen).tolist()
        plan = [(p, self._take(self.corpus.domains[p])) for p in picks]  # every rank advances every cursor
        per = global_batch // self.world_size
        return plan[self.rank * per : (self.rank + 1) * per]

    def fetch(self, plan: Plan) -> tuple[torch.Tensor, list[str]]:
        """The sequences of a plan: ``input_ids [len(plan), seq_len]`` and each sample's domain."""
        domains = [self.corpus.domains[d] for d, _ in plan]
        rows = [self.corpus.train[name][row] for name, (_, row) in zip(domains, plan, strict=True)]
        return torch.stack(rows).long(), domains

    def next_batch(self, global_batch: int) -> tuple[torch.Tensor, list[str]]:
        """Plan and read this rank's next batch in one call (no worker processes)."""
        return self.fetch(self.next_plan(global_batch))

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
