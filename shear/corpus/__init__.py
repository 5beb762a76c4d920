"""The default multi-domain corpus, built offline-reproducibly from public packages.

Command line (wired in :mod:`shear.cli`)::

    shear data default --out DIR [--max-mb-per-domain N] [--sources NAME ...]

builds the corpus into ``DIR`` (default cap 4 MB of text per domain; ``--sources`` takes
source or domain names, default all) and prints a summary; run again with the same
options it reports the cached corpus at once. The result is an ordinary data folder for
``shear prune --data DIR`` (:func:`shear.data.read_domains`):

* ``DIR/<domain>/<source>.jsonl``: one ``{"text": document}`` per line;
* ``DIR/MANIFEST.json``: the recipe, per-domain and per-source bytes and documents, each
  source's package, version, sha256, licence and files used, the sources that could not
  be had (``unavailable``, with the reason) and warnings;
* ``DIR/MANIFEST.md``: the same for people, with the licences.

Domains and sources, in the order each domain fills up to its cap:

========  ==================================================================================
books     Debian r-cran-janeaustenr (Austen's novels, R lazy-load DB); sword-text-web (World
          English Bible, SWORD zText)
wiki      PyPI gensim 4.4.0 wheel's English Wikipedia test dump (CC BY-SA); dict-foldoc
code      the running Python's standard library (no download)
latex     c++-annotations-latex (a LaTeX book); .Rnw vignettes of eight r-cran-* packages
docs      python3.11-doc (Sphinx .rst.txt sources); perl-doc (.pod)
========  ==================================================================================

Debian packages are fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x``
(no installation, no root); the wheel with ``pip download``. Downloads are cached in
``$SHEAR_CACHE/corpus/downloads`` (default ``~/.cache/shear/corpus/downloads``), so a
rebuild needs no network. The same packages give byte-identical ``.jsonl`` files (sorted
walks, no timestamps; only ``MANIFEST.json``'s ``built_at`` differs). The corpus is built
in ``DIR.tmp-<pid>`` and renamed into place, so an interrupted build never leaves half a
corpus. A source that cannot be had is logged, recorded and skipped; fewer than two
domains with text is an error.
"""

from shear.corpus.build import RECIPE_VERSION, build_default_corpus, format_manifest, select_sources
from shear.corpus.fetch import SourceUnavailable
from shear.corpus.sources import SOURCES, Source

__all__ = [
    "RECIPE_VERSION",
    "SOURCES",
    "Source",
    "SourceUnavailable",
    "build_default_corpus",
    "format_manifest",
    "select_sources",
]
