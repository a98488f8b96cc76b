"""Training domains as token blocks: a fixed shuffled order, and dev text apart from train text."""

from __future__ import annotations

import torch

from server.core.config import Settings
from server.lab.corpus import domain_blocks, source_texts, token_blocks
from tests import helpers


def test_domain_blocks_are_the_domain_text_in_a_seeded_order(settings: Settings):
    tokenizer = helpers.tiny_tokenizer()
    blocks = domain_blocks(tokenizer, ("units",), settings.data_dir, 64)
    plain = token_blocks(tokenizer, source_texts("units", settings.data_dir), 64)
    assert torch.equal(blocks, domain_blocks(tokenizer, ("units",), settings.data_dir, 64))
    assert not torch.equal(blocks, plain)
    assert sorted(map(tuple, blocks.tolist())) == sorted(map(tuple, plain.tolist()))
    both = domain_blocks(tokenizer, ("units", "howto"), settings.data_dir, 64)
    assert len(both) >= len(blocks) + len(token_blocks(tokenizer, source_texts("howto", settings.data_dir), 64)) - 1


def test_dev_text_is_not_training_text(settings: Settings):
    for source in ("howto", "units", "knowledge"):
        assert not set(source_texts(source, settings.data_dir)) & set(source_texts(source, settings.data_dir, True))
