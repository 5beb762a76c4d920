"""Multi-domain training data: read, tokenise once (cached), pack, split, and sample by domain weights.

* :mod:`shear.data.sources`: domain folders (.txt, .jsonl, .parquet) or a saved Hugging
  Face dataset with a domain column, read with ``datasets``;
* :mod:`shear.data.token_cache`: per-domain token streams, memory-mapped;
* :mod:`shear.data.corpus`: fixed-length sequences and the held-out split;
* :mod:`shear.data.sampler`: the domain-weighted, resumable, rank-sliced batch plan;
* :mod:`shear.data.loader`: DataLoader workers that read the planned batches.
"""

from shear.data.corpus import Corpus, TokenRows, build_corpus, pack, read_domains
from shear.data.loader import DomainBatchLoader
from shear.data.sampler import DomainSampler
from shear.data.sources import DataSpec, find_sources, read_domain
from shear.data.token_cache import TokenFile, tokenize_domains

__all__ = [
    "Corpus",
    "DataSpec",
    "DomainBatchLoader",
    "DomainSampler",
    "TokenFile",
    "TokenRows",
    "build_corpus",
    "find_sources",
    "pack",
    "read_domain",
    "read_domains",
    "tokenize_domains",
]
