"""The data pipeline: input formats via datasets, the token cache, DataLoader workers, exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import shear.data.token_cache as token_cache
from shear.data import DomainBatchLoader, DomainSampler, TokenRows, build_corpus, find_sources, read_domains
from shear.data.corpus import held_out_rows
from shear.errors import ShearError

DOCS = {
    "prose": [
        f"Chapter {i}. It was a bright cold day in April, and the clocks struck {i}." for i in range(60)
    ],
    "code": [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(80)],
}


@pytest.fixture(scope="module")
def tokenizer(tiny_source):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_source)


def _jsonl_folder(root):
    root.mkdir()
    for d, docs in DOCS.items():
        (root / f"{d}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return root


def _tokens(corpus):
    return {d: (corpus.train[d].tensor(), corpus.eval[d]) for d in corpus.domains}


def test_parquet_and_saved_dataset_read_like_jsonl(tmp_path, tokenizer):
    import datasets

    ref = build_corpus(_jsonl_folder(tmp_path / "jsonl"), tokenizer, 16, 2, cache_dir=tmp_path / "c")
    pq = tmp_path / "parquet"
    for d, docs in DOCS.items():
        (pq / d).mkdir(parents=True)
        datasets.Dataset.from_dict({"text": docs, "id": list(range(len(docs)))}).to_parquet(
            str(pq / d / "p.parquet")
        )
    rows = [{"text": t, "domain": d} for d, docs in DOCS.items() for t in docs]
    saved = tmp_path / "saved"
    ds = datasets.Dataset.from_list(rows[::-1][::-1])
    datasets.DatasetDict({"train": ds}).save_to_disk(str(saved))
    for path in (pq, saved):
        got = build_corpus(path, tokenizer, 16, 2, cache_dir=tmp_path / "c")
        assert got.domains == ref.domains == ["code", "prose"]
        for d in ref.domains:
            assert torch.equal(got.train[d].tensor(), ref.train[d].tensor()), (path, d)
            assert torch.equal(got.eval[d], ref.eval[d])
    assert read_domains(saved) == {d: DOCS[d] for d in sorted(DOCS)}


def test_saved_dataset_needs_its_columns(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["a"], "source": ["x"]}).save_to_disk(str(tmp_path / "s"))
    with pytest.raises(ShearError, match="needs a 'domain' column"):
        find_sources(tmp_path / "s")


def test_packing_and_held_out_split_never_overlap(tmp_path, tokenizer):
    corpus = build_corpus(_jsonl_folder(tmp_path / "d"), tokenizer, 16, 3, cache_dir=tmp_path / "c")
    for d in corpus.domains:
        ids = tokenizer(DOCS[d], add_special_tokens=False)["input_ids"]
        flat = [t for doc in ids for t in doc + [tokenizer.eos_token_id]]
        n = len(flat) // 16
        train, held = corpus.train[d], corpus.eval[d]
        assert len(train) + len(held) == n and len(held) == 3
        rows = list(train.rows) + list(held_out_rows(n, 3))
        assert sorted(rows) == list(range(n))  # every sequence in exactly one split
        spread = held_out_rows(n, 3)
        assert spread[0] < n / 3 <= spread[1] < 2 * n / 3 <= spread[2]  # spread over the stream
        stream = torch.tensor(flat[: n * 16]).view(n, 16)
        assert torch.equal(held, stream[spread]) and torch.equal(train.tensor(), stream[train.rows])


def test_token_cache_is_reused_and_follows_changes(tmp_path, tokenizer, monkeypatch):
    data = _jsonl_folder(tmp_path / "d")
    calls = []
    read = token_cache.read_domain
    monkeypatch.setattr(
        token_cache, "read_domain", lambda src, spec: calls.append(src.name) or read(src, spec)
    )
    lines = []
    first = build_corpus(data, tokenizer, 16, 2, cache_dir=tmp_path / "c", log=lines.append)
    assert sorted(calls) == ["code", "prose"] and all("tokenised" in x for x in lines)
    calls.clear()
    lines.clear()
    again = build_corpus(data, tokenizer, 32, 2, cache_dir=tmp_path / "c", log=lines.append)  # other seq_len
    assert calls == [] and all("cached" in x for x in lines)
    # the same stream, packed at another length
    assert torch.equal(again.train["code"][0], torch.cat([first.train["code"][0], first.train["code"][1]]))
    assert first.train["code"].file.path == again.train["code"].file.path
    # one changed domain is tokenised again, the other still comes from the cache
    (data / "prose.jsonl").write_text(json.dumps({"text": "new text " * 200}) + "\n")
    third = build_corpus(data, tokenizer, 16, 2, cache_dir=tmp_path / "c")
    assert calls == ["prose"]
    assert not torch.equal(third.eval["prose"], first.eval["prose"])
    # a damaged cache file (cut short) is detected and rebuilt
    calls.clear()
    f = third.train["code"].file.path
    f.write_bytes(f.read_bytes()[:10])
    build_corpus(data, tokenizer, 16, 2, cache_dir=tmp_path / "c")
    assert calls == ["code"]


def test_what_a_killed_cache_write_left_is_removed(tmp_path, tokenizer):
    cache = tmp_path / "c"
    cache.mkdir()
    kill = (
        "import os, signal, sys\n"
        "from shear.checkpoint import write_atomic\n"
        "write_atomic(sys.argv[1], lambda f: (f.write(b'x' * 1000), f.flush(), os.kill(os.getpid(), 9)))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", kill, str(cache / "0123.bin")], capture_output=True, timeout=120
    )
    assert r.returncode == -signal.SIGKILL
    (left,) = cache.iterdir()  # the temporary file of the killed write
    hours_ago = time.time() - 2 * 3600
    os.utime(left, (hours_ago, hours_ago))
    (cache / ".4567.bin.abcd1234.tmp").write_bytes(b"another process, writing now")
    lines = []
    build_corpus(_jsonl_folder(tmp_path / "d"), tokenizer, 16, 2, cache_dir=cache, log=lines.append)
    assert not left.exists() and (cache / ".4567.bin.abcd1234.tmp").exists()  # only the stale one
    assert f"removed what interrupted writes left in the token cache {cache}: {left.name}" in lines


def test_a_domain_too_small_is_an_error(tmp_path, tokenizer):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "big.txt").write_text("word " * 400)
    (tmp_path / "d" / "tiny.txt").write_text("two words")
    with pytest.raises(ShearError, match="'tiny' has 0 sequences"):
        build_corpus(tmp_path / "d", tokenizer, 16, 2, cache_dir=tmp_path / "c")


def _loader(corpus, workers, weights=None, seed=3):
    sampler = DomainSampler(corpus, weights or {d: 1.0 for d in corpus.domains}, seed=seed)
    return DomainBatchLoader(sampler, 4, num_workers=workers)


def test_workers_give_the_same_batches_and_resume_exactly(tmp_path, tokenizer):
    corpus = build_corpus(_jsonl_folder(tmp_path / "d"), tokenizer, 16, 2, cache_dir=tmp_path / "c")
    plain = _loader(corpus, 0)
    expected = [next(plain) for _ in range(12)]
    pooled = _loader(corpus, 2)
    got = [next(pooled) for _ in range(5)]  # the workers have read ahead of batch 5
    state = pooled.state_dict()
    resumed = _loader(corpus, 2)
    resumed.load_state_dict(state)
    got += [next(resumed) for _ in range(7)]
    for (a, da), (b, db) in zip(expected, got, strict=True):
        assert torch.equal(a, b) and da == db


def test_new_weights_apply_from_the_next_batch(tmp_path, tokenizer):
    corpus = build_corpus(_jsonl_folder(tmp_path / "d"), tokenizer, 16, 2, cache_dir=tmp_path / "c")
    ref, pooled = _loader(corpus, 0), _loader(corpus, 2)
    for _ in range(3):
        next(ref), next(pooled)
    for loader in (ref, pooled):
        loader.set_weights({"code": 0.0, "prose": 1.0})
    a, b = [next(ref) for _ in range(4)], [next(pooled) for _ in range(4)]
    assert all(d == ["prose"] * 4 for _, d in b)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b, strict=True))


def test_empty_and_missing_domains_are_errors(tmp_path, tokenizer):
    corpus = build_corpus(_jsonl_folder(tmp_path / "d"), tokenizer, 16, 2, cache_dir=tmp_path / "c")
    with pytest.raises(ShearError, match="do not match"):
        DomainSampler(corpus, {"code": 1.0})
    corpus.train["code"] = TokenRows(corpus.train["code"].file, 16, [])
    with pytest.raises(ShearError, match=r"\['code'\] have no training sequences"):
        DomainSampler(corpus, {"code": 1.0, "prose": 1.0})
