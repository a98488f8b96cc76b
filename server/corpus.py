"""Real offline text: the Lee news corpus shipped in gensim's test data.

`lee_background.cor` (300 news articles) is the calibration / training text; `lee.cor` (50 other articles) is
held out for perplexity. Nothing here is ever downloaded from a dataset hub.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from server.packages import extract_members

GENSIM = ("gensim", "4.4.0")


def _lee_file(data_dir: Path, name: str) -> Path:
    files = extract_members(*GENSIM, ["*/test_data/lee.cor", "*/test_data/lee_background.cor"], data_dir)
    return next(p for p in files if p.name == name)


def lee_train(data_dir: Path) -> list[str]:
    """The 300 background articles: calibration and prompt-training text."""
    return _lee_file(data_dir, "lee_background.cor").read_text(encoding="latin-1").splitlines()


def lee_heldout(data_dir: Path) -> list[str]:
    """The 50 evaluation articles, never used for calibration or training."""
    return _lee_file(data_dir, "lee.cor").read_text(encoding="latin-1").splitlines()


def token_blocks(tokenizer: PreTrainedTokenizerBase, docs: list[str], block_len: int, n_blocks: int) -> torch.Tensor:
    """Concatenate documents (EOS-separated) and cut `n_blocks` consecutive blocks of `block_len` tokens.

    Raises ValueError when the documents are too short, rather than silently returning fewer blocks.
    """
    sep = tokenizer.eos_token or "\n\n"
    ids = tokenizer(sep.join(d.strip() for d in docs if d.strip()), add_special_tokens=False)["input_ids"]
    need = block_len * n_blocks
    if len(ids) < need:
        raise ValueError(f"corpus has {len(ids)} tokens, {need} needed for {n_blocks} x {block_len}")
    return torch.tensor(ids[:need], dtype=torch.long).view(n_blocks, block_len)
