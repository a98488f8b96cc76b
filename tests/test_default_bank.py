"""The shipped default bank: it belongs to the embedded default model and repairs it on held-out text."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from server.core.banks import BankError, load_bank
from server.core.identity import fingerprint
from server.core.selection import CachedSelector, load_selection_model
from server.online.settings import REPO_BANKS
from server.lab.train import source_blocks

SOURCES = ("news", "howto", "units", "knowledge")


@pytest.fixture(scope="module")
def default_bank(served_model: Path):
    return load_bank(REPO_BANKS / "default", expect=fingerprint(served_model))


def test_default_bank_is_for_the_default_model(default_bank, served_model: Path) -> None:
    assert default_bank.manifest.model.weights == served_model.name
    assert default_bank.k >= 2 and default_bank.manifest.trained["command"].startswith("idp-serve train")


def test_default_bank_is_refused_by_another_model(tiny_llama: Path) -> None:
    with pytest.raises(BankError, match="bank.json"):
        load_bank(REPO_BANKS / "default", expect=fingerprint(tiny_llama))


@pytest.mark.parametrize("source", SOURCES)
def test_idp_over_the_bank_lowers_heldout_perplexity(default_bank, source: str) -> None:
    measured = default_bank.manifest.measured
    assert measured[f"ppl/{source}/idp"] < measured[f"ppl/{source}/none"]


def test_manifest_records_the_single_prompt_and_every_bank_prompt(default_bank) -> None:
    measured = default_bank.manifest.measured
    for source in SOURCES:
        for name in ("none", "single", "idp", *default_bank.prompt_names):
            assert f"ppl/{source}/{name}" in measured


def test_idp_with_the_calibrated_layer_beats_the_single_prompt_on_average(default_bank) -> None:
    measured = default_bank.manifest.measured

    def geomean(name: str) -> float:
        return math.exp(sum(math.log(measured[f"ppl/{s}/{name}"]) for s in SOURCES) / len(SOURCES))

    assert default_bank.selection_layers is not None
    assert geomean("idp") < geomean("single") < geomean("none")


@pytest.mark.slow
def test_recorded_selection_shares_reproduce(default_bank, served_model: Path, settings) -> None:
    """Re-run the selection on the held-out blocks the manifest was measured on: the same prompts come out."""
    tokenizer = AutoTokenizer.from_pretrained(served_model)
    spec = default_bank.manifest.trained["spec"]
    heldout = source_blocks(tokenizer, SOURCES, settings.data_dir, spec["seq_len"], heldout=True, limit=8)
    selector = CachedSelector(load_selection_model(served_model), default_bank.embeddings,
                              default_bank.selection_layers)
    for source, blocks in heldout.items():
        chosen = [s.index for s in selector.select(blocks.tolist())]
        for k, name in enumerate(default_bank.prompt_names):
            recorded = default_bank.manifest.measured[f"share/{source}/idp/{name}"]
            assert chosen.count(k) / len(chosen) == pytest.approx(recorded, abs=1e-3), (source, name)
