"""Batches read by DataLoader worker processes, in the order the sampler planned them.

The plan (which domain and row each sample takes) is made in the main process by
:class:`~shear.data.sampler.DomainSampler`; workers only read the planned rows from the
memory-mapped cache. A batch therefore depends on the plan alone, never on the number of
workers or their timing: any ``num_workers`` gives the same batches.

Workers read ahead. The loader remembers the sampler's state after every planned batch
and reports the state after the last batch *handed out*, so a checkpoint resumes exactly
there; when the domain weights change, read-ahead batches planned with the old weights
are dropped and planning restarts from that state.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from shear.data.corpus import Corpus
from shear.data.sampler import DomainSampler, Plan


class _Rows(Dataset):
    """Map-style dataset keyed by ``(domain index, row)``."""

    def __init__(self, corpus: Corpus):
        self.tables = [corpus.train[d] for d in corpus.domains]

    def __len__(self) -> int:
        return sum(len(t) for t in self.tables)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        d, row = key
        return self.tables[d][row].long(), d


class _Plans:
    """Endless batch sampler: plans from the DomainSampler, recording the state after each."""

    def __init__(self, sampler: DomainSampler, batch_size: int, states: deque):
        self.sampler, self.batch_size, self.states = sampler, batch_size, states

    def __iter__(self) -> Iterator[Plan]:
        while True:
            plan = self.sampler.next_plan(self.batch_size)
            self.states.append(self.sampler.state_dict())
            yield plan


class DomainBatchLoader:
    """Iterator of ``(input_ids, domains)`` batches planned by a sampler, read by workers.

    Args:
        sampler: plans the batches (its state is owned by the loader from here on).
        global_batch: samples per step across all ranks (each rank gets its slice).
        num_workers: DataLoader worker processes (0: read in the main process).
        pin_memory: pin batches for faster host-to-GPU copies.
    """

    def __init__(
        self, sampler: DomainSampler, global_batch: int, num_workers: int = 0, pin_memory: bool = False
    ):
        self.sampler, self.global_batch = sampler, global_batch
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self._consumed = sampler.state_dict()
        self._states: deque = deque()
        self._it: Iterator | None = None

    @property
    def weights(self) -> dict[str, float]:
        """The current domain weights."""
        return dict(self._consumed["weights"])

    def _start(self) -> Iterator:
        self.sampler.load_state_dict(self._consumed)
        self._states.clear()
        loader = DataLoader(
            _Rows(self.sampler.corpus),
            batch_sampler=_Plans(self.sampler, self.global_batch, self._states),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=2 if self.num_workers else None,
        )
        return iter(loader)

    def __iter__(self) -> DomainBatchLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, list[str]]:
        if self._it is None:
            self._it = self._start()
        ids, dom = next(self._it)
        self._consumed = self._states.popleft()
        return ids, [self.sampler.corpus.domains[d] for d in dom.tolist()]

    def _restart(self) -> None:
        self._it = None  # the old iterator's workers shut down when it is collected

    def set_weights(self, weights: dict[str, float]) -> None:
        """New domain weights from the next batch on (read-ahead batches are re-planned)."""
        self.sampler.load_state_dict(self._consumed)
        self.sampler.set_weights(weights)
        self._consumed = self.sampler.state_dict()
        self._restart()

    def state_dict(self) -> dict[str, Any]:
        """The sampler's state after the last batch handed out."""
        return self._consumed

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly after the batch whose state this is."""
        self.sampler.load_state_dict(state)
        self._consumed = self.sampler.state_dict()
        self._restart()
