"""General English text at scale, read offline out of PyPI wheels, with a held-out slice no training ever sees.

Three sources, each a package file read (never installed) through `packages.extract_members`:
- `owt` and `wikipedia`: the OpenWebText and Wikipedia passages of OpenAI's evals registry
  (`evals==3.0.1.post1`, `registry/data/schelling_point/{owt,wikipedia}_5.jsonl`, MIT): 1,000 passages each,
  the passage in field "0" (the other fields are permutations of it, not text);
- `enwiki`: the shortened Wikipedia XML dump in gensim's test data (`gensim==4.4.0`, LGPL-2.1 data file), its
  articles with wiki markup stripped (redirects dropped).

Documents are split by a stable hash of their id (source and index or page id, never their text), so the split
does not move when the markup stripper improves: 85% train, 5% dev (early stopping, choices), 10% held-out
(final KL and perplexity only).
"""

from __future__ import annotations

import bz2
import hashlib
import html
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from server.lab.corpus import token_blocks
from server.lab.packages import extract_members

EVALS = ("evals", "3.0.1.post1")
GENSIM = ("gensim", "4.4.0")
EVALS_FILES = {"owt": "owt_5.jsonl", "wikipedia": "wikipedia_5.jsonl"}
ENWIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
SUBDIR = "general"
"""Cache folder under the data dir: apart from corpus.py's gensim cache, whose member list differs."""

GeneralSplit = Literal["train", "dev", "heldout"]
SOURCES: tuple[str, ...] = ("owt", "wikipedia", "enwiki")


@dataclass(frozen=True)
class Document:
    """One passage or article; `doc_id` (e.g. ``owt/17``, ``enwiki/12``) decides its split."""

    doc_id: str
    text: str

    @property
    def split(self) -> GeneralSplit:
        return split_of(self.doc_id)


def split_of(doc_id: str) -> GeneralSplit:
    """train 85% / dev 5% / held-out 10%, by sha256 of the document id."""
    bucket = int(hashlib.sha256(f"general\0{doc_id}".encode()).hexdigest(), 16) % 20
    return "heldout" if bucket < 2 else "dev" if bucket == 2 else "train"


def evals_passages(data_dir: Path, name: str) -> list[Document]:
    """The 1,000 passages of one schelling_point file (`owt` or `wikipedia`), field "0" of each line."""
    patterns = [f"evals/registry/data/schelling_point/{f}" for f in EVALS_FILES.values()]
    files = extract_members(*EVALS, patterns, data_dir / SUBDIR)
    path = next(p for p in files if p.name == EVALS_FILES[name])
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [Document(f"{name}/{i}", row["0"].strip()) for i, row in enumerate(rows)]


def enwiki_articles(data_dir: Path) -> list[Document]:
    """Main-namespace articles of gensim's shortened enwiki dump as plain text (redirects and stubs dropped)."""
    (path,) = extract_members(*GENSIM, [f"*/test_data/{ENWIKI_FILE}"], data_dir / SUBDIR)
    docs = []
    with bz2.open(path, "rb") as stream:
        for _, elem in ET.iterparse(stream):
            if _local(elem.tag) != "page":
                continue
            raw = elem.findtext("{*}revision/{*}text") or ""
            redirect = elem.find("{*}redirect") is not None or raw.lstrip().upper().startswith("#REDIRECT")
            if elem.findtext("{*}ns") == "0" and not redirect:
                text = strip_wikitext(raw)
                if len(text) >= 200:
                    docs.append(Document(f"enwiki/{elem.findtext('{*}id')}", text))
            elem.clear()
    return docs


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def documents(data_dir: Path, split: GeneralSplit | None = None) -> list[Document]:
    """Every general document (owt, wikipedia, enwiki, in that order), or those of one split."""
    docs = evals_passages(data_dir, "owt") + evals_passages(data_dir, "wikipedia") + enwiki_articles(data_dir)
    return docs if split is None else [d for d in docs if d.split == split]


def texts(data_dir: Path, split: GeneralSplit) -> list[str]:
    """The texts of one split, ready for `corpus.token_blocks`."""
    return [d.text for d in documents(data_dir, split)]


# ----- wiki markup -------------------------------------------------------------------------------------------

_TAIL_SECTIONS = re.compile(
    r"^==+\s*(References|Notes|External links|See also|Further reading|Bibliography|"
    r"Sources|Citations|Footnotes)\s*==+\s*$",
    re.MULTILINE | re.IGNORECASE,
)
_DROP_LINK = re.compile(r"^\s*(File|Image|Category|Media|[a-z]{2,3}(-[a-z]+)?):", re.IGNORECASE)


def strip_wikitext(wikitext: str) -> str:
    """MediaWiki markup to plain prose: keep link labels and text, drop templates, tables, refs, files, lists.

    A small stripper for one known dump, not a MediaWiki parser: nested constructs are removed innermost
    first until nothing changes, which handles the nesting this dump uses (templates in templates, links in
    file captions). Sections after "References" / "See also" etc. are cut: they are lists, not prose.
    """
    text = re.sub(r"<!--.*?-->", "", wikitext, flags=re.DOTALL)
    text = re.sub(r"<ref[^>]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.DOTALL)
    text = re.sub(r"<(math|gallery|timeline|score|syntaxhighlight|source|pre)[^>]*>.*?</\1>", "", text, flags=re.DOTALL)
    if (tail := _TAIL_SECTIONS.search(text)) is not None:
        text = text[: tail.start()]
    text = _remove_innermost(text, re.compile(r"\{\{[^{}]*\}\}"))
    text = _remove_innermost(text, re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.DOTALL))
    text = _replace_links(text)
    text = re.sub(r"\[(?:https?:)?//[^\s\]]+\s+([^\]]+)\]", r"\1", text)
    text = re.sub(r"\[(?:https?:)?//[^\]]*\]", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = html.unescape(text).replace("\xa0", " ")
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if heading := re.fullmatch(r"(=+)\s*(.*?)\s*\1", line):
            line = heading.group(2)
        elif line[:1] in {"*", "#", ":", ";", "|", "!", "{", "}"} or line.startswith("[["):
            continue  # list items, table rows and leftovers: not running prose
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)
        line = re.sub(r"[ \t]{2,}", " ", line).strip()
        if line:
            lines.append(line)
    return "\n".join(lines)


def _remove_innermost(text: str, pattern: re.Pattern[str]) -> str:
    while True:
        new = pattern.sub("", text)
        if new == text:
            return new
        text = new


def _replace_links(text: str) -> str:
    """[[target|label]] -> label, [[target]] -> target; file, category and interlanguage links vanish."""

    def label(match: re.Match[str]) -> str:
        inner = match.group(1)
        if _DROP_LINK.match(inner):
            return ""
        return inner.rsplit("|", 1)[-1] if "|" in inner else inner

    pattern = re.compile(r"\[\[([^\[\]]*)\]\]")
    while True:
        new = pattern.sub(label, text)
        if new == text:
            return new
        text = new


def general_blocks(
    tokenizer: PreTrainedTokenizerBase, data_dir: Path, split: GeneralSplit, seq_len: int, seed: int = 0
) -> torch.Tensor:
    """Every full block [N, seq_len] of a split's text, in a seeded shuffled order.

    Training reads blocks in this order (epoch one is a prefix of it), so a teacher cache built in the same
    order serves the first N training tokens as soon as its first shards exist.
    """
    blocks = token_blocks(tokenizer, texts(data_dir, split), seq_len)
    return blocks[torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))]
