"""Reading domains, packing, the held-out split and the domain sampler."""

from __future__ import annotations

import json

import pytest
import torch

from shear.data import Corpus, DomainSampler, pack, read_domains
from shear.errors import ShearError


def test_read_domains_from_files_and_folders(tmp_path):
    (tmp_path / "books.txt").write_text("Once upon a time.")
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "a.txt").write_text("print(1)")
    (tmp_path / "code" / "b.jsonl").write_text(
        json.dumps({"text": "x = 2"}) + "\n\n" + json.dumps({"text": "y"})
    )
    (tmp_path / "notes.md").write_text("ignored")
    assert read_domains(tmp_path) == {"books": ["Once upon a time."], "code": ["print(1)", "x = 2", "y"]}


@pytest.mark.parametrize(
    "files,message",
    [
        ({}, "holds no domains"),
        ({"a.txt": "   "}, "'a'.*no text"),
        ({"a.jsonl": "{not json"}, "not valid JSON"),
        ({"a.jsonl": json.dumps({"body": "x"})}, '"text" field'),
    ],
)
def test_read_domains_errors(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ShearError, match=message):
        read_domains(tmp_path)
    with pytest.raises(ShearError, match="not found"):
        read_domains(tmp_path / "missing")


def test_pack_joins_with_eos_and_drops_the_tail():
    out = pack([[1, 2, 3], [4, 5]], seq_len=3, eos=0)
    assert out.tolist() == [[1, 2, 3], [0, 4, 5]]  # the final EOS does not fill a sequence


def _corpus() -> Corpus:
    train = {"a": torch.arange(40).view(10, 4), "b": torch.arange(100, 124).view(6, 4)}
    return Corpus(
        4, train, {"a": torch.zeros(1, 4, dtype=torch.long), "b": torch.ones(1, 4, dtype=torch.long)}
    )


def test_sampler_is_deterministic_and_resumes_exactly():
    s1 = DomainSampler(_corpus(), {"a": 3.0, "b": 1.0}, seed=5)
    s2 = DomainSampler(_corpus(), {"a": 3.0, "b": 1.0}, seed=5)
    for _ in range(3):
        assert torch.equal(s1.next_batch(8)[0], s2.next_batch(8)[0])
    state = s1.state_dict()
    ahead = [s1.next_batch(8) for _ in range(5)]  # walks past an epoch of both domains
    s3 = DomainSampler(_corpus(), {"a": 1.0, "b": 1.0}, seed=5)
    s3.load_state_dict(state)
    for ids, doms in ahead:
        ids3, doms3 = s3.next_batch(8)
        assert torch.equal(ids, ids3) and doms == doms3
    assert s3.weights == {"a": 0.75, "b": 0.25}


def test_pruning_and_training_read_different_streams_of_a_seed():
    """Continued pre-training after pruning (same seed) must not re-read the pruning stage's rows."""
    from shear.trainer import DATA_STREAMS

    corpus = Corpus(2, {"a": torch.arange(4000).view(2000, 2)}, {"a": torch.zeros(1, 2, dtype=torch.long)})

    def rows(stream: int) -> set[int]:
        s = DomainSampler(corpus, {"a": 1.0}, seed=3, stream=stream)
        return {int(r[0]) for _ in range(20) for r in s.next_batch(4)[0]}

    prune, train = rows(DATA_STREAMS["prune"]), rows(DATA_STREAMS["train"])
    assert len(prune) == len(train) == 80
    assert len(prune & train) <= 8  # two independent draws of 80 of 2000 rows share ~3
    assert rows(DATA_STREAMS["prune"]) == prune  # each stream is deterministic


def test_sampler_ranks_are_disjoint_slices_of_the_global_batch():
    whole = DomainSampler(_corpus(), {"a": 1.0, "b": 1.0}, seed=2)
    ranks = [DomainSampler(_corpus(), {"a": 1.0, "b": 1.0}, seed=2, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(4):
        ids, doms = whole.next_batch(6)
        parts = [r.next_batch(6) for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), ids)
        assert parts[0][1] + parts[1][1] == doms
        assert parts[0][0].shape[0] == 3


def test_sampler_follows_the_weights_and_checks_them():
    s = DomainSampler(_corpus(), {"a": 0.0, "b": 1.0}, seed=0)
    _, doms = s.next_batch(20)
    assert set(doms) == {"b"}
    with pytest.raises(ShearError, match="do not match"):
        s.set_weights({"a": 1.0})
    with pytest.raises(ShearError, match="non-negative"):
        s.set_weights({"a": -1.0, "b": 2.0})
    with pytest.raises(ShearError, match="divisible"):
        DomainSampler(_corpus(), {"a": 1.0, "b": 1.0}, world_size=2).next_batch(3)
