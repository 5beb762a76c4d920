"""MediaWiki XML dumps (``pages-articles*.xml[.bz2]``) to plain-text articles.

The markup is stripped minimally and robustly rather than rendered: comments, ``<ref>``
footnotes, ``<math>``, templates ``{{...}}`` and tables ``{|...|}`` go (innermost first, so
nesting is handled); ``[[File:...]]``-style links go; ``[[target|label]]`` becomes
``label``, ``[[target]]`` becomes ``target``; ``[url label]`` becomes ``label``; bold and
italic quotes and the remaining HTML tags are dropped; ``== Heading ==`` becomes
``Heading``. What is left is readable prose with lists and headings as lines.
"""

from __future__ import annotations

import bz2
import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref\b[^>]*/>|<ref\b[^>]*>.*?</ref\s*>", re.S | re.I)
_DROP_ELEMENTS = re.compile(
    r"<(math|gallery|timeline|score|syntaxhighlight|source|imagemap)\b[^>]*>.*?</\1\s*>", re.S | re.I
)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|(?:(?!\{\||\|\}).)*\|\}", re.S)
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXTERNAL = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]")
_QUOTES = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(=+)[ \t]*(.*?)[ \t]*\1[ \t]*$", re.M)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANK_LINES = re.compile(r"\n{3,}")
# Namespaced links that are not running text: media, categories, interlanguage links.
_DROP_LINK = re.compile(r"^\s*:?\s*(file|image|media|category|[a-z]{2,3}(-[a-z]+)?)\s*:", re.I)


def _sub_innermost(pattern: re.Pattern[str], repl, text: str, max_rounds: int = 50) -> str:
    """Apply ``pattern`` until nothing matches: each round removes one level of nesting."""
    for _ in range(max_rounds):
        new = pattern.sub(repl, text)
        if new == text:
            break
        text = new
    return text


def _link(match: re.Match[str]) -> str:
    inner = match.group(1)
    if _DROP_LINK.match(inner):
        return ""
    return inner.rsplit("|", 1)[-1] if "|" in inner else inner.lstrip(":")


def wikitext_to_text(wikitext: str) -> str:
    """Strip wiki markup to plain text (see the module docstring for what goes).

    Args:
        wikitext: an article's source.

    Returns:
        The plain text.
    """
    text = _COMMENT.sub("", wikitext)
    text = _REF.sub("", text)
    text = _DROP_ELEMENTS.sub("", text)
    text = _sub_innermost(_TEMPLATE, "", text)
    text = _sub_innermost(_TABLE, "", text)
    text = _sub_innermost(_LINK, _link, text)
    text = _EXTERNAL.sub(r"\1", text)
    text = _QUOTES.sub("", text)
    text = _HEADING.sub(r"\2", text)
    text = html.unescape(_TAG.sub("", text))
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def iter_articles(path: str | Path) -> Iterator[tuple[str, str]]:
    """Yield the articles of a MediaWiki XML dump (``.bz2`` or plain), in file order.

    Only main-namespace pages (``<ns>0</ns>``) that are not redirects are kept.

    Args:
        path: the dump.

    Yields:
        ``(title, wikitext)``.
    """
    path = Path(path)
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rb") as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if _local(elem.tag) != "page":
                continue
            title, ns, text, redirect = "", "0", "", False
            for child in elem.iter():
                name = _local(child.tag)
                if name == "title":
                    title = child.text or ""
                elif name == "ns":
                    ns = (child.text or "0").strip()
                elif name == "redirect":
                    redirect = True
                elif name == "text":
                    text = child.text or ""
            elem.clear()  # keep memory flat on a large dump
            if ns != "0" or redirect or text.lstrip()[:9].upper() == "#REDIRECT":
                continue
            yield title, text


def iter_article_texts(path: str | Path) -> Iterator[str]:
    """Yield each article of a dump as plain text: the title, a blank line, the body.

    Args:
        path: the dump (``.bz2`` or plain XML).

    Yields:
        One plain-text document per article (articles that strip to nothing are skipped).
    """
    for title, wikitext in iter_articles(path):
        body = wikitext_to_text(wikitext)
        if body:
            yield f"{title}\n\n{body}"
