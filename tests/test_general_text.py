"""General text from package files: what the wheels hold, the markup stripper, and a held-out slice that stays out.

These read the real archives (pip downloads `evals` and `gensim` once into the data dir, never installs them).
"""

from __future__ import annotations

import hashlib

import pytest

from server.core.config import Settings
from server.lab import general_text
from server.lab.general_text import Document, split_of, strip_wikitext

HELDOUT_IDS_SHA256 = "fd7cb363104053ac20227f2f16e96651c5fa7f584a9c13a86f4b2667be42b40b"
"""Digest of the sorted held-out document ids when the split was fixed (2026-12-01): it must never move, or
text trained on before could land in the held-out slice."""


@pytest.fixture(scope="module")
def docs(settings: Settings) -> list[Document]:
    return general_text.documents(settings.data_dir)


def test_strip_wikitext_keeps_prose_and_link_labels_and_drops_markup():
    wikitext = (
        "{{Infobox person|name={{nowrap|A. B.}}|born=1900}}\n"
        "'''Ada''' was a [[mathematics|mathematician]] from [[London]].<ref name=x>Some source</ref>"
        " She wrote notes.<ref name=y/><!-- hidden -->\n"
        "[[File:Ada.jpg|thumb|A portrait with a [[hat]]]]\n"
        "== Life ==\n"
        "* a list item\n"
        "{| class=wikitable\n| cell\n|}\n"
        "See [http://example.org the site] &amp; more.\n"
        "== References ==\n"
        "Everything after here is a reference list."
    )
    expected = "Ada was a mathematician from London. She wrote notes.\nLife\nSee the site & more."
    assert strip_wikitext(wikitext) == expected


def test_the_wheels_hold_the_passages_and_articles(docs: list[Document]):
    by_source = {s: [d for d in docs if d.doc_id.startswith(f"{s}/")] for s in general_text.SOURCES}
    assert len(by_source["owt"]) == len(by_source["wikipedia"]) == 1000
    assert len(by_source["enwiki"]) >= 100
    assert all(d.text for d in docs) and sum(len(d.text) > 100 for d in docs) > 0.95 * len(docs)
    articles = [d.text for d in by_source["enwiki"]]
    assert not any("<ref" in a or "'''" in a or "[[Category:" in a for a in articles)
    assert sum("{{" in a for a in articles) <= 2, "templates left in the stripped articles"
    assert "Anarchism is a political philosophy" in next(d.text for d in by_source["enwiki"] if d.doc_id == "enwiki/12")


def test_the_split_is_by_document_disjoint_and_stable(docs: list[Document]):
    ids = [d.doc_id for d in docs]
    assert len(ids) == len(set(ids))
    parts = {s: {d.doc_id for d in docs if d.split == s} for s in ("train", "dev", "heldout")}
    assert parts["train"].isdisjoint(parts["dev"]) and parts["train"].isdisjoint(parts["heldout"])
    assert parts["dev"].isdisjoint(parts["heldout"])
    assert set().union(*parts.values()) == set(ids)
    assert hashlib.sha256("\n".join(sorted(parts["heldout"])).encode()).hexdigest() == HELDOUT_IDS_SHA256
    assert split_of("owt/0") == split_of("owt/0")


def test_no_training_text_is_held_out(settings: Settings):
    train = set(general_text.texts(settings.data_dir, "train"))
    heldout = general_text.texts(settings.data_dir, "heldout")
    assert not train.intersection(heldout)
    assert sum(len(t) for t in heldout) >= 100_000, "the held-out slice must hold >= 20k tokens (~4 chars each)"
