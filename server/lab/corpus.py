"""Real offline text: the Lee news corpus shipped in gensim's test data.

`lee_background.cor` (300 news articles) is the calibration / training text; `lee.cor` (50 other articles) is
held out for perplexity. Nothing here is ever downloaded from a dataset hub.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from server.lab.packages import extract_members

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


def token_blocks(
    tokenizer: PreTrainedTokenizerBase, docs: list[str], block_len: int, n_blocks: int | None = None
) -> torch.Tensor:
    """Concatenate documents (EOS-separated) and cut consecutive blocks of `block_len` tokens.

    `n_blocks=None` takes every full block; a number asks for exactly that many and raises ValueError when
    the documents are too short, rather than silently returning fewer.
    """
    sep = tokenizer.eos_token or "\n\n"
    ids = tokenizer(sep.join(d.strip() for d in docs if d.strip()), add_special_tokens=False)["input_ids"]
    count = len(ids) // block_len if n_blocks is None else n_blocks
    if count == 0 or len(ids) < block_len * count:
        raise ValueError(f"corpus has {len(ids)} tokens, {block_len * max(count, 1)} needed for {count} x {block_len}")
    return torch.tensor(ids[: block_len * count], dtype=torch.long).view(count, block_len)


# Training domains of the default bank: each prompt of a curated bank specialises in one of them.
SOURCES: dict[str, tuple[str, ...]] = {
    "news": (),
    "howto": ("step_inference", "goal_inference"),
    "units": ("unit_identification", "physical_intuition"),
    "knowledge": (
        "general_knowledge",
        "human_organs_senses",
        "odd_one_out",
        "phrase_relatedness",
        "similarities_abstraction",
        "riddle_sense",
        "emoji_movie",
        "anachronisms",
    ),
    # The recipe bank's domains (docs/evaluation-protocol.md section 3), written 2026-12-02 from the dev-split
    # screening, before any of their training: one domain per damaged task of the primary pool. The transfer
    # task (goal_inference) is in none of them, nor is any do-no-harm task.
    "unit-names": ("unit_identification",),
    "si-units": ("si_conversion",),
    "unit-systems": ("different_systems",),
    "social-bias": ("bbq_race_disambig",),
    "facts": ("knowledge_conflicts",),
}


def source_texts(name: str, data_dir: Path, heldout: bool = False) -> list[str]:
    """Texts of a training domain: Lee news articles, or task examples rendered with their right answer.

    Task domains train on their tasks' train split and hold out the dev split; test splits never appear.
    """
    from server.lab.tasks import task_split

    if name not in SOURCES:
        raise ValueError(f"unknown data source {name!r}; known: {', '.join(SOURCES)}")
    if name == "news":
        return lee_heldout(data_dir) if heldout else lee_train(data_dir)
    split = "dev" if heldout else "train"
    return [e.rendered() for task in SOURCES[name] for e in task_split(task, split)]


def domain_blocks(
    tokenizer: PreTrainedTokenizerBase,
    sources: tuple[str, ...],
    data_dir: Path,
    seq_len: int,
    heldout: bool = False,
    seed: int = 0,
) -> torch.Tensor:
    """Token blocks [N, seq_len] of the union of training domains, in a seeded shuffled order (the order a
    teacher cache and `recipe` training read them in)."""
    texts = [t for name in sources for t in source_texts(name, data_dir, heldout=heldout)]
    blocks = token_blocks(tokenizer, texts, seq_len)
    return blocks[torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))]
