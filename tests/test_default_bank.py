"""The shipped banks: they belong to the embedded default model, say how they were made, and repair it on text
they never trained on.

The repair is measured here, on the prepared model, not read from a manifest: whatever bank is shipped for
whatever default model, IDP over it (with the selection rule its manifest names, as the server selects) must
lower that model's perplexity on held-out text, and so must the single prompt.
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
from server.core.selection import bank_selector, load_selection_model
from server.lab.corpus import SOURCES, domain_blocks
from server.lab.general_text import general_blocks
from server.lab.loading import load_model
from server.online.settings import REPO_BANKS

BLOCKS_PER_SOURCE = 6
SEQ_LEN = 128


@pytest.fixture(scope="module")
def default_bank(served_model: Path) -> PromptBank:
    return load_bank(REPO_BANKS / "default", expect=fingerprint(served_model))


@pytest.fixture(scope="module")
def single_bank(served_model: Path) -> PromptBank:
    return load_bank(REPO_BANKS / "single", expect=fingerprint(served_model))


@pytest.fixture(scope="module")
def heldout(default_bank: PromptBank, served_model: Path, settings: Settings) -> torch.Tensor:
    """Blocks [N, SEQ_LEN] no prompt trained on: the general held-out slice and the dev split of each domain."""
    tokenizer = AutoTokenizer.from_pretrained(served_model)
    general = general_blocks(tokenizer, settings.data_dir, "heldout", SEQ_LEN)[:BLOCKS_PER_SOURCE]
    domains = [
        domain_blocks(tokenizer, (source,), settings.data_dir, SEQ_LEN, heldout=True)[:BLOCKS_PER_SOURCE]
        for source in default_bank.manifest.trained["sources"]
    ]
    return torch.cat([general, *domains])


@torch.no_grad()
def _nll(model, prompt: torch.Tensor | None, ids: torch.Tensor) -> float:
    """Summed next-token NLL of the text tokens of one block, behind an optional soft prompt [m, d]; the prompt's
    own positions carry no loss, so sums with and without a prompt compare."""
    embeds = model.get_input_embeddings()(ids[None])
    if prompt is not None:
        embeds = torch.cat([prompt[None].to(embeds.dtype), embeds], dim=1)
    logits = model(inputs_embeds=embeds).logits[0, -len(ids) : -1]
    return torch.nn.functional.cross_entropy(logits.float(), ids[1:], reduction="sum").item()


def test_shipped_banks_are_for_the_default_model_and_say_where_each_prompt_came_from(
    default_bank: PromptBank, single_bank: PromptBank, served_model: Path
) -> None:
    for bank in (default_bank, single_bank):
        assert bank.manifest.model.weights == served_model.name and bank.manifest.trained["mode"] == "recipe"
        assert set(bank.manifest.trained["prompts"]) == set(bank.prompt_names)
        assert all(record["done"] in ("budget", "early stop") for record in bank.manifest.trained["prompts"].values())
    assert default_bank.k >= 2 and single_bank.k == 1
    assert set(default_bank.manifest.trained["sources"]) <= set(SOURCES)
    assert set(single_bank.manifest.trained["sources"]) == set(default_bank.manifest.trained["sources"])
    assert default_bank.manifest.selection.source, "the default bank's selection rule says how it was chosen"


def test_default_bank_is_refused_by_another_model(tiny_llama: Path) -> None:
    with pytest.raises(BankError, match="bank.json"):
        load_bank(REPO_BANKS / "default", expect=fingerprint(tiny_llama))


@pytest.mark.slow
def test_idp_and_the_single_prompt_lower_the_served_models_heldout_perplexity(
    default_bank: PromptBank, single_bank: PromptBank, served_model: Path, heldout: torch.Tensor
) -> None:
    """Each held-out block decoded behind the prompt the serving selector picks for it (the manifest's rule),
    and behind the single prompt, against no prompt."""
    torch.set_num_threads(1)
    model = load_model(served_model)
    chosen = [s.index for s in bank_selector(load_selection_model(served_model), default_bank).select(heldout.tolist())]
    tokens = heldout.shape[0] * (heldout.shape[1] - 1)
    plain = math.exp(sum(_nll(model, None, ids) for ids in heldout) / tokens)
    idp = math.exp(sum(_nll(model, default_bank.embeddings[k], ids) for k, ids in zip(chosen, heldout)) / tokens)
    single = math.exp(sum(_nll(model, single_bank.embeddings[0], ids) for ids in heldout) / tokens)
    assert idp < plain, f"held-out perplexity with IDP {idp:.2f}, without a prompt {plain:.2f}"
    assert single < plain, f"held-out perplexity with the single prompt {single:.2f}, without a prompt {plain:.2f}"
