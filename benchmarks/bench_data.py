"""pytest-benchmark of the data pipeline and dynamic batch loading (issue 6), plus the helpers
that ``report_data.py`` shares.

What is timed, on a real multi-domain corpus tokenised with the default model's tokenizer
(SmolLM2-135M, vocabulary 49152), batches of 4 x 256 tokens:

* ``test_pipeline_batch``: one batch from :class:`~shear.data.DomainBatchLoader` in steady
  state (read-ahead running), with ``num_workers`` 0 and 2;
* ``test_dynamic_update``: what one dynamic-batch-loading update costs the data side:
  :func:`shear.dynamic.update_weights` + ``loader.set_weights`` (drops the read-ahead and
  shuts the workers down) + the next batch (workers start again, re-planned with the new
  weights). The held-out evaluation that produces the losses is timed apart;
* ``test_train_step``: the consumer, one forward+backward of the default model on such a
  batch (no optimiser step, so the step is at its shortest: the ratios are conservative);
* ``test_eval_per_update``: the held-out evaluation each update runs (``eval_sequences``
  sequences of 256 tokens per domain, batch 4, no gradients). Not pipeline overhead;
* ``test_token_cache``: tokenising the corpus into an empty cache, and loading it from a
  warm one.

Data: ``SHEAR_BENCH_DATA`` (a data folder), else the default corpus
(:func:`shear.corpus.build_default_corpus`, capped at ``SHEAR_BENCH_CAP`` bytes per domain,
default 1 MB; it builds from whatever sources are reachable).
The token cache is a fresh temporary folder.

Run (about 2-3 minutes on a 2-core CPU, most of it the model's forward and backward passes):
    python -m pytest benchmarks/bench_data.py --benchmark-only \
        --benchmark-columns=median,iqr,rounds --benchmark-group-by=group

Side-by-side numbers, ratios and the targets: ``python benchmarks/report_data.py``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from shear.data import Corpus, DomainBatchLoader, DomainSampler, build_corpus, read_domains
from shear.dynamic import update_weights
from shear.evaluation import domain_losses

#: The shape the issue's consumer runs at: batch 4 x 256 tokens (environment.md: ~140 tokens/s).
BATCH, SEQ_LEN = 4, 256
#: Held-out sequences per domain (TrainConfig.eval_sequences).
EVAL_SEQUENCES = 4
#: Steps between dynamic updates: pruning (PruneConfig) and continued pre-training (TrainConfig).
INTERVALS = {"pruning": 50, "continued pre-training": 400}
#: Text per domain when the benchmark builds its own corpus.
DEFAULT_CAP = 1_000_000
WORKERS = (0, 2)


# --- data ------------------------------------------------------------------------------------


def build_data(folder: Path, max_bytes_per_domain: int = DEFAULT_CAP) -> tuple[Path, str]:
    """A small real multi-domain data folder under ``folder``.

    The default corpus is preferred (five domains of public text; downloads are cached
    under the shear cache, so later runs need no network). Should it be missing or fail
    (no network on first use, an older checkout), the machine-text corpus stands in:
    three domains that every Debian + CPython machine has.

    Returns:
        ``(path, description)``.
    """
    from shear.corpus import build_default_corpus

    manifest = build_default_corpus(
        folder / "default", max_bytes_per_domain=max_bytes_per_domain, min_bytes_per_domain=0, log=_quiet
    )
    return Path(manifest["path"]), f"default corpus ({max_bytes_per_domain / 1e6:g} MB cap per domain)"


def _quiet(_: str) -> None:
    """A log sink that drops progress lines."""


@contextlib.contextmanager
def datasets_cache(folder: Path) -> Iterator[None]:
    """Point ``datasets``' cache at ``folder`` for the block.

    ``load_dataset`` keeps an Arrow copy of every file it reads; with a warm copy the
    "first tokenisation" would skip the reading, so that timing runs on an empty cache.
    ``datasets`` reads ``config.HF_DATASETS_CACHE`` at call time, so patching it suffices.
    """
    import datasets

    old = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = Path(folder)
    try:
        yield
    finally:
        datasets.config.HF_DATASETS_CACHE = old


def text_bytes(data: Path) -> int:
    """UTF-8 bytes of the documents that get tokenised (blank documents are skipped, as there)."""
    return sum(len(doc.encode()) for docs in read_domains(data).values() for doc in docs)


def make_corpus(data: Path, tokenizer: Any, cache_dir: Path) -> Corpus:
    """The corpus at the benchmark shape, tokens cached in ``cache_dir``."""
    return build_corpus(data, tokenizer, SEQ_LEN, EVAL_SEQUENCES, cache_dir=cache_dir)


# --- loader and dynamic update ------------------------------------------------------------------


def uniform(corpus: Corpus) -> dict[str, float]:
    """Equal domain weights."""
    return {d: 1.0 / len(corpus.domains) for d in corpus.domains}


def make_loader(corpus: Corpus, num_workers: int, seed: int = 0) -> DomainBatchLoader:
    """The trainer's loader (run_loop): uniform weights, ``BATCH`` samples a step, no pinning (CPU)."""
    return DomainBatchLoader(DomainSampler(corpus, uniform(corpus), seed=seed), BATCH, num_workers)


def settle(loader: DomainBatchLoader, batches: int = 4, wait_s: float = 0.3) -> None:
    """Bring a loader to the state the trainer leaves it in before an update: iterating, read-ahead full.

    In training an update follows a training step and an evaluation (seconds), so the
    workers have long filled their prefetch queue; the short wait gives them that time.
    """
    for _ in range(batches):
        next(loader)
    if loader.num_workers:
        time.sleep(wait_s)


def synthetic_losses(corpus: Corpus) -> tuple[dict[str, float], dict[str, float]]:
    """``(losses, reference)`` with a different positive gap per domain, so every update moves the weights.

    Their values do not change the cost: the update is a softmax over a handful of domains.
    """
    ref = {d: 2.0 for d in corpus.domains}
    return {d: 2.0 + 0.1 * (i + 1) for i, d in enumerate(corpus.domains)}, ref


def dynamic_update(
    loader: DomainBatchLoader, losses: dict[str, float], reference: dict[str, float]
) -> tuple[float, float, float]:
    """One update as run_loop runs it after the evaluation, then the next batch; seconds of each part.

    Returns:
        ``(update_weights, set_weights, next batch)`` in seconds. ``set_weights`` includes
        shutting the old workers down; the next batch includes starting the new ones.
    """
    t0 = time.perf_counter()
    new = update_weights(loader.weights, losses, reference, "paper")
    t1 = time.perf_counter()
    loader.set_weights(new)
    t2 = time.perf_counter()
    next(loader)
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def reset(loader: DomainBatchLoader, corpus: Corpus) -> None:
    """Back to uniform weights and a settled read-ahead, so every timed update starts alike.

    (Repeated paper-rule updates with fixed gaps would keep sharpening the weights.)
    """
    loader.set_weights(uniform(corpus))
    settle(loader)


# --- the consumer -------------------------------------------------------------------------------


def load_model() -> tuple[torch.nn.Module, Any]:
    """The default model (fp32, CPU) in training mode, and its tokenizer."""
    from shear.loading import load_source

    model, tokenizer = load_source("default")
    return model.train(), tokenizer


def train_step(model: torch.nn.Module, ids: torch.Tensor) -> None:
    """Forward + backward with the LM loss; gradients dropped first, as ``zero_grad(set_to_none=True)``."""
    for p in model.parameters():
        p.grad = None
    model(ids, labels=ids, use_cache=False).loss.backward()


def eval_per_update(model: torch.nn.Module, corpus: Corpus) -> dict[str, float]:
    """The held-out evaluation an update runs (RunContext.evaluate: batch 4, no gradients, fp32 on CPU)."""
    return domain_losses(model, corpus.eval, batch_size=BATCH)


def timeit(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# --- pytest-benchmark ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Model, tokenizer, data folder and corpus, built once for the module."""
    root = tmp_path_factory.mktemp("bench_data")
    model, tokenizer = load_model()
    if os.environ.get("SHEAR_BENCH_DATA"):
        data, what = Path(os.environ["SHEAR_BENCH_DATA"]), "SHEAR_BENCH_DATA"
    else:
        data, what = build_data(root, int(os.environ.get("SHEAR_BENCH_CAP", DEFAULT_CAP)))
    with datasets_cache(root / "hf"):  # keep the user's datasets cache out of it
        corpus = make_corpus(data, tokenizer, root / "tokens")
    return {
        "model": model,
        "tokenizer": tokenizer,
        "data": data,
        "what": what,
        "corpus": corpus,
        "root": root,
    }


def _info(benchmark: Any, world: dict[str, Any], **extra: Any) -> None:
    benchmark.extra_info.update(
        data=world["what"], domains=len(world["corpus"].domains), batch=BATCH, seq_len=SEQ_LEN, **extra
    )


@pytest.mark.parametrize("num_workers", WORKERS)
def test_pipeline_batch(benchmark: Any, world: dict[str, Any], num_workers: int) -> None:
    """One batch in steady state; extra_info: tokens/s at the median."""
    loader = make_loader(world["corpus"], num_workers)
    settle(loader, batches=8)
    benchmark.group = "data pipeline: one batch of 4 x 256"
    benchmark.pedantic(next, args=(loader,), rounds=300, warmup_rounds=10)
    if benchmark.stats is not None:
        _info(
            benchmark,
            world,
            num_workers=num_workers,
            tokens_per_s=BATCH * SEQ_LEN / benchmark.stats.stats.median,
        )


@pytest.mark.parametrize("num_workers", WORKERS)
def test_dynamic_update(benchmark: Any, world: dict[str, Any], num_workers: int) -> None:
    """update_weights + set_weights + the next batch (the restart), from a settled loader.

    extra_info: the cost amortised per step at each dynamic interval (seconds); the report
    turns it into % of a training step.
    """
    corpus = world["corpus"]
    loader = make_loader(corpus, num_workers)
    losses, reference = synthetic_losses(corpus)
    benchmark.group = "dynamic update: update_weights + set_weights + next batch"
    benchmark.pedantic(
        dynamic_update,
        args=(loader, losses, reference),
        setup=lambda: reset(loader, corpus),
        rounds=8,
        warmup_rounds=1,
    )
    if benchmark.stats is not None:
        med = benchmark.stats.stats.median
        per_step = {f"per_step_s_interval_{n}": med / n for n in INTERVALS.values()}
        _info(benchmark, world, num_workers=num_workers, **per_step)


def test_train_step(benchmark: Any, world: dict[str, Any]) -> None:
    """The consumer: forward + backward of the default model on one real batch."""
    ids, _ = next(make_loader(world["corpus"], 0))
    benchmark.group = "consumer: default model fwd+bwd, 4 x 256"
    benchmark.pedantic(train_step, args=(world["model"], ids), rounds=3, warmup_rounds=1)
    if benchmark.stats is not None:
        _info(benchmark, world, tokens_per_s=BATCH * SEQ_LEN / benchmark.stats.stats.median)


def test_eval_per_update(benchmark: Any, world: dict[str, Any]) -> None:
    """The held-out evaluation behind each update (not pipeline overhead; shown for honesty)."""
    corpus = world["corpus"]
    benchmark.group = "held-out evaluation per update"
    benchmark.pedantic(eval_per_update, args=(world["model"], corpus), rounds=3, warmup_rounds=1)
    if benchmark.stats is not None:
        _info(benchmark, world, eval_sequences=EVAL_SEQUENCES)


@pytest.mark.parametrize("cache", ["first", "hit"])
def test_token_cache(benchmark: Any, world: dict[str, Any], cache: str) -> None:
    """``first``: tokenise into an empty token cache (and an empty ``datasets`` cache); ``hit``: reload."""
    root, data, tokenizer = world["root"], world["data"], world["tokenizer"]
    runs = iter(range(1_000))
    benchmark.group = "token cache: build_corpus"
    if cache == "first":

        def fresh() -> tuple[tuple, dict]:
            # a new token cache and datasets cache every round: nothing is reused
            n = next(runs)
            return (root / f"first-{n}" / "tokens", root / f"first-{n}" / "hf"), {}

        def first(tokens: Path, hf: Path) -> None:
            with datasets_cache(hf):
                make_corpus(data, tokenizer, tokens)

        benchmark.pedantic(first, setup=fresh, rounds=2)
        if benchmark.stats is not None:
            with datasets_cache(root / "hf"):
                mb = text_bytes(data) / 1e6
            _info(benchmark, world, text_mb=mb, mb_per_s=mb / benchmark.stats.stats.median)
    else:
        benchmark.pedantic(make_corpus, args=(data, tokenizer, root / "tokens"), rounds=5, warmup_rounds=1)
        if benchmark.stats is not None:
            _info(benchmark, world)
