"""The default corpus's sources: what to fetch for each, and how to turn it into documents.

Each :class:`Source` names its domain, how it is obtained (a Debian package, a PyPI wheel,
or the running Python's standard library) and an ``extract`` function that walks the
unpacked files and yields ``(document, origin)`` pairs in a fixed order, ``origin`` being
the file (relative to the unpacked root) the document came from. Within a domain, the
sources share its byte cap in the order of :data:`SOURCES`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from shear.corpus import dictd, latex, mediawiki, pod, rdata, sphinx, stdlib, sword
from shear.corpus.fetch import SourceUnavailable
from shear.corpus.files import read_text, squeeze_blank_lines

#: ``(document text, origin file)``.
Doc = tuple[str, str]

ENWIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
R_VIGNETTE_PACKAGES = (
    "r-cran-hsaur3", "r-cran-sandwich", "r-cran-zoo", "r-cran-strucchange",
    "r-cran-coin", "r-cran-partykit", "r-cran-pscl", "r-cran-lme4",
)  # fmt: skip


@dataclass(frozen=True)
class Source:
    """One source of the default corpus.

    Attributes:
        name: identifier, also the output file name (``<domain>/<name>.jsonl``).
        domain: the domain it feeds.
        kind: ``"deb"``, ``"wheel"`` or ``"stdlib"``.
        packages: Debian package names, or one pinned wheel requirement.
        extract: unpacked root folder -> documents in a fixed order.
        members: for wheels, the archive files to extract.
        licence_note: added to the recorded licence (e.g. the licence of the text itself
            where the package's licence covers only its code).
        description: one line for the manifest.
    """

    name: str
    domain: str
    kind: str
    packages: tuple[str, ...]
    extract: Callable[[Path], Iterator[Doc]]
    members: tuple[str, ...] = ()
    licence_note: str = ""
    description: str = ""


def _find_one(root: Path, pattern: str) -> Path:
    found = sorted(p for p in root.glob(pattern) if p.is_file() and not p.is_symlink())
    if not found:
        raise SourceUnavailable(f"no file matching {pattern} in the package")
    return found[0]


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _files(root: Path, files: list[Path]) -> Iterator[Doc]:
    if not files:
        raise SourceUnavailable("none of the expected files are in the package")
    for path in files:
        yield read_text(path), _rel(path, root)


_NOVEL_CHAPTER = re.compile(r"^\s*chapter\s+(?:\d+|[ivxlcdm]+)\b\.?\s*$", re.I)


def split_novel(lines: list[str | None]) -> list[str]:
    """Split a novel given as lines into chapters (front matter joins the first chapter).

    Args:
        lines: the text's lines (None, R's NA, counts as an empty line).

    Returns:
        One text per chapter (the whole text when no ``CHAPTER n`` line is found).
    """
    chunks: list[list[str]] = [[]]
    seen = False
    for line in lines:
        line = line or ""
        if _NOVEL_CHAPTER.match(line):
            if seen:
                chunks.append([])
            seen = True
        chunks[-1].append(line)
    return [squeeze_blank_lines("\n".join(chunk)) for chunk in chunks]


def _janeaustenr(root: Path) -> Iterator[Doc]:
    rdb = _find_one(root, "**/janeaustenr/data/Rdata.rdb")
    for name, value in rdata.read_lazyload_db(rdb).items():
        if isinstance(value, rdata.RValue) and value.sexptype == rdata.STRSXP:
            for chapter in split_novel(value.data):
                yield chapter, f"{_rel(rdb, root)}#{name}"


def _web_bible(root: Path) -> Iterator[Doc]:
    modules = sorted({p.parent for p in root.glob("**/modules/texts/ztext/*/*.bzs")})
    if not modules:
        raise SourceUnavailable("no zText module (modules/texts/ztext/*/*.bzs) in the package")
    for module in modules:
        for testament, _, osis in sword.read_ztext_blocks(module):
            yield sword.osis_to_text(osis), f"{_rel(module, root)}/{testament}.bzz"


def _enwiki(root: Path) -> Iterator[Doc]:
    dump = root / ENWIKI_MEMBER
    for text in mediawiki.iter_article_texts(dump):
        yield text, ENWIKI_MEMBER


def _foldoc(root: Path) -> Iterator[Doc]:
    path = _find_one(root, "**/foldoc.dict.dz")
    for entry in dictd.iter_entries(path):
        yield entry, _rel(path, root)


def _stdlib(root: Path) -> Iterator[Doc]:
    yield from _files(root, stdlib.stdlib_files(root))


def _cplusplus(root: Path) -> Iterator[Doc]:
    path = _find_one(root, "**/cplusplus.latex.gz")
    for chapter in latex.latex_chapters(path):
        yield chapter, _rel(path, root)


def _r_vignettes(root: Path) -> Iterator[Doc]:
    files = latex.rnw_files(root)
    if not files:
        raise SourceUnavailable("no .Rnw files in the packages")
    for path in files:
        yield latex.rnw_text(path), _rel(path, root)


def _python_docs(root: Path) -> Iterator[Doc]:
    yield from _files(root, sphinx.rst_sources(root))


def _perl_docs(root: Path) -> Iterator[Doc]:
    yield from _files(root, pod.pod_files(root))


#: Every source, in the order domains fill from them.
SOURCES: tuple[Source, ...] = (
    Source("janeaustenr", "books", "deb", ("r-cran-janeaustenr",), _janeaustenr,
           description="Jane Austen's six novels (R lazy-load DB), one document per chapter"),
    Source("web-bible", "books", "deb", ("sword-text-web",), _web_bible,
           description="World English Bible (SWORD zText, OSIS stripped), one document per book"),
    Source("enwiki", "wiki", "wheel", ("gensim==4.4.0",), _enwiki, members=(ENWIKI_MEMBER,),
           licence_note="the Wikipedia text: CC BY-SA 3.0 (Wikipedia contributors)",
           description="English Wikipedia articles (gensim test dump), one document per article"),
    Source("foldoc", "wiki", "deb", ("dict-foldoc",), _foldoc,
           licence_note="the FOLDOC text: GFDL-1.1+ (Denis Howe)",
           description="Free On-line Dictionary of Computing, one document per entry"),
    Source("python-stdlib", "code", "stdlib", (), _stdlib,
           description="the running Python's standard library .py files (no tests)"),
    Source("cplusplus-annotations", "latex", "deb", ("c++-annotations-latex",), _cplusplus,
           description="the C++ Annotations book in LaTeX, one document per chapter"),
    Source("r-vignettes", "latex", "deb", R_VIGNETTE_PACKAGES, _r_vignettes,
           description="Sweave (.Rnw) vignettes of eight R packages, one document per file"),
    Source("python-docs", "docs", "deb", ("python3.11-doc",), _python_docs,
           licence_note="the Python documentation: PSF-2.0",
           description="Python 3.11 documentation sources (.rst.txt), one document per page"),
    Source("perl-docs", "docs", "deb", ("perl-doc",), _perl_docs,
           description="Perl documentation (.pod), one document per file"),
)  # fmt: skip
