"""Scoring a model, with or without a soft prompt in front: held-out perplexity, the log-likelihood of each
answer of a multiple-choice item, and greedy answers for exact match.

Every function takes its tensors to the model's device, so the same code scores on the CPU or a GPU.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedModel

from server.core.identity import read_card, write_card
from server.lab.corpus import lee_heldout, token_blocks
from server.lab.loading import load_model
from server.lab.tasks import Example

HELDOUT_BLOCKS = 8
HELDOUT_LEN = 256


def heldout_blocks(folder: Path, data_dir: Path) -> torch.Tensor:
    """The fixed held-out evaluation text (Lee `lee.cor`) as [HELDOUT_BLOCKS, HELDOUT_LEN] token ids."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return token_blocks(tokenizer, lee_heldout(data_dir), HELDOUT_LEN, HELDOUT_BLOCKS)


@torch.no_grad()
def perplexity(model: PreTrainedModel, blocks: torch.Tensor, prompt: torch.Tensor | None = None) -> float:
    """exp(mean next-token NLL over the text tokens), optionally behind a soft prompt [m, d].

    The prompt's own positions carry no loss: only the text is scored, so numbers with and without a prompt
    are comparable.
    """
    total, count = 0.0, 0
    embed = model.get_input_embeddings()
    for row in blocks:
        ids = row.unsqueeze(0).to(model.device)
        embeds = embed(ids)
        if prompt is not None:
            embeds = torch.cat([prompt.unsqueeze(0).to(embeds.dtype), embeds], dim=1)
        logits = model(inputs_embeds=embeds).logits[0, -ids.shape[1] : -1]
        total += torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return math.exp(total / count)


def record_perplexity(folder: Path, data_dir: Path) -> float:
    """Measure a model folder's held-out perplexity and keep it in its model card (twin included)."""
    ppl = perplexity(load_model(folder), heldout_blocks(folder, data_dir))
    for path in {folder} | ({folder.parent / card.twin} if (card := read_card(folder)) and card.twin else set()):
        if (c := read_card(path)) is not None:
            c.measured["heldout_ppl"] = round(ppl, 3)
            write_card(path, c)
    return ppl


@torch.no_grad()
def choice_logprobs(
    model: PreTrainedModel, tokenizer, example: Example, prompt: torch.Tensor | None = None
) -> list[float]:
    """Sum of log-probabilities of each choice's tokens after the context (behind an optional soft prompt).

    All choices of an item go through the model as one right-padded batch; the context is tokenized once and
    each choice's tokens appended, so every choice is scored against the same context tokens.
    """
    context = tokenizer(example.context)["input_ids"]
    rows = [context + tokenizer(choice, add_special_tokens=False)["input_ids"] for choice in example.choices]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=model.device)
    embeds = model.get_input_embeddings()(ids)
    if prompt is not None:
        embeds = torch.cat([prompt.expand(len(rows), -1, -1).to(embeds.dtype), embeds], dim=1)
    # only the positions that predict choice tokens go through the LM head (a large share of a small model's compute)
    keep = width - len(context) + 1
    logprobs = model(inputs_embeds=embeds, logits_to_keep=keep).logits[:, :-1].float().log_softmax(-1)
    scores = []
    for i, row in enumerate(rows):
        targets = torch.tensor(row[len(context) :], device=model.device)
        positions = torch.arange(len(targets), device=model.device)
        scores.append(logprobs[i, positions, targets].sum().item())
    return scores


def mc_accuracy(
    model: PreTrainedModel, tokenizer, examples: list[Example], prompt: torch.Tensor | None = None
) -> float:
    """Multiple-choice accuracy by log-likelihood (the highest-scoring choice must be the right one)."""
    right = 0
    for example in examples:
        scores = choice_logprobs(model, tokenizer, example, prompt)
        right += int(max(range(len(scores)), key=scores.__getitem__) == example.answer)
    return right / len(examples)


@torch.no_grad()
def greedy(model: PreTrainedModel, tokenizer, ids: list[int], prompt: torch.Tensor | None, max_new: int) -> str:
    """Greedy continuation of `ids` behind an optional soft prompt, stopped at EOS (the tokenizer's or the
    generation config's, e.g. an instruct model's end of turn) or at the first newline."""
    embeds = model.get_input_embeddings()(torch.tensor([ids], device=model.device))
    if prompt is not None:
        embeds = torch.cat([prompt[None].to(embeds.dtype), embeds], dim=1)
    out = model(inputs_embeds=embeds, use_cache=True)
    stop = {tokenizer.eos_token_id, *np.atleast_1d(model.generation_config.eos_token_id or []).tolist()}
    new: list[int] = []
    for _ in range(max_new):
        token = int(out.logits[0, -1].argmax())
        if token in stop or "\n" in tokenizer.decode([token]):
            break
        new.append(token)
        next_ids = torch.tensor([[token]], device=model.device)
        out = model(input_ids=next_ids, past_key_values=out.past_key_values, use_cache=True)
    return tokenizer.decode(new)


def normalize(text: str) -> str:
    """An answer's first line, lower case, without surrounding spaces or a final period (BIG-bench style EM)."""
    return text.strip().split("\n")[0].strip().rstrip(".").strip().lower()
