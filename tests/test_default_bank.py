"""The shipped default bank: it belongs to the embedded default model and repairs it on held-out text.

The repair is measured here, on the prepared model, not read from the bank's manifest: whatever bank is shipped
for whatever default model, IDP over it must lower that model's perplexity on text the bank never trained on.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from server.core.banks import BankError, PromptBank, load_bank
from server.core.config import Settings
from server.core.identity import fingerprint
from server.core.selection import CachedSelector, load_selection_model
from server.lab.loading import load_model
from server.lab.train import BankPlan, source_blocks
from server.online.settings import REPO_BANKS

HELDOUT_BLOCKS = BankPlan(mode="curated").heldout_blocks
"""Held-out blocks per source: as many as training measured its manifest's figures on."""


@pytest.fixture(scope="module")
def default_bank(served_model: Path) -> PromptBank:
    return load_bank(REPO_BANKS / "default", expect=fingerprint(served_model))


@pytest.fixture(scope="module")
def heldout(default_bank: PromptBank, served_model: Path, settings: Settings) -> dict[str, torch.Tensor]:
    """Token blocks [N, seq_len] per source the bank was trained on, from those sources' held-out split."""
    trained = default_bank.manifest.trained
    tokenizer = AutoTokenizer.from_pretrained(served_model)
    return source_blocks(
        tokenizer,
        tuple(trained["sources"]),
        settings.data_dir,
        trained["spec"]["seq_len"],
        heldout=True,
        limit=HELDOUT_BLOCKS,
    )


@torch.no_grad()
def _nll(model, prompt: torch.Tensor | None, ids: torch.Tensor) -> float:
    """Summed next-token NLL of the text tokens of one block, behind an optional soft prompt [m, d]; the prompt's
    own positions carry no loss, so sums with and without a prompt compare."""
    embeds = model.get_input_embeddings()(ids[None])
    if prompt is not None:
        embeds = torch.cat([prompt[None].to(embeds.dtype), embeds], dim=1)
    logits = model(inputs_embeds=embeds).logits[0, -len(ids) : -1]
    return torch.nn.functional.cross_entropy(logits.float(), ids[1:], reduction="sum").item()


def test_default_bank_is_for_the_default_model(default_bank: PromptBank, served_model: Path) -> None:
    assert default_bank.manifest.model.weights == served_model.name
    assert default_bank.k >= 2 and default_bank.manifest.trained["command"].startswith("idp-serve train")


def test_default_bank_is_refused_by_another_model(tiny_llama: Path) -> None:
    with pytest.raises(BankError, match="bank.json"):
        load_bank(REPO_BANKS / "default", expect=fingerprint(tiny_llama))


@pytest.mark.slow
def test_idp_over_the_default_bank_lowers_the_served_models_heldout_perplexity(
    default_bank: PromptBank, served_model: Path, heldout: dict[str, torch.Tensor]
) -> None:
    """Each held-out block decoded behind the prompt the serving selector picks for it, against no prompt."""
    torch.set_num_threads(1)
    model = load_model(served_model)
    selector = CachedSelector(
        load_selection_model(served_model), default_bank.embeddings, default_bank.selection_layers
    )
    blocks = torch.cat(list(heldout.values()))
    chosen = [s.index for s in selector.select(blocks.tolist())]
    tokens = blocks.shape[0] * (blocks.shape[1] - 1)
    plain = math.exp(sum(_nll(model, None, ids) for ids in blocks) / tokens)
    idp = math.exp(sum(_nll(model, default_bank.embeddings[k], ids) for k, ids in zip(chosen, blocks)) / tokens)
    assert idp < plain, f"held-out perplexity with IDP {idp:.2f}, without a prompt {plain:.2f}"


@pytest.mark.slow
def test_recorded_selection_shares_reproduce(
    default_bank: PromptBank, served_model: Path, heldout: dict[str, torch.Tensor]
) -> None:
    """The selection shares the manifest records (and docs/banks.md quotes) are what the serving selector picks
    today on the same held-out blocks: the record is still true of the shipped bank on the prepared model, and
    training's measurement and serving's selection agree."""
    selector = CachedSelector(
        load_selection_model(served_model), default_bank.embeddings, default_bank.selection_layers
    )
    for source, blocks in heldout.items():
        chosen = [s.index for s in selector.select(blocks.tolist())]
        for k, name in enumerate(default_bank.prompt_names):
            recorded = default_bank.manifest.measured[f"share/{source}/idp/{name}"]
            assert chosen.count(k) / len(chosen) == pytest.approx(recorded, abs=1e-3), (source, name)
