"""Offline evaluation: held-out perplexity, with or without a soft prompt in front of the text.

Perplexity is computed on float32 weights (fast on these CPUs) from the same folder vLLM serves.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from server.corpus import lee_heldout, token_blocks

HELDOUT_BLOCKS = 8
HELDOUT_LEN = 256


def load_model(folder: Path) -> PreTrainedModel:
    """A float32 eval-mode transformers model (compressed-tensors checkpoints are dequantized on load)."""
    kwargs: dict = {"dtype": torch.float32}
    if "quantization_config" in (folder / "config.json").read_text():
        from transformers.utils.quantization_config import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()


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
        ids = row.unsqueeze(0)
        embeds = embed(ids)
        if prompt is not None:
            embeds = torch.cat([prompt.unsqueeze(0).to(embeds.dtype), embeds], dim=1)
        logits = model(inputs_embeds=embeds).logits[0, -ids.shape[1]:-1]
        total += torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return math.exp(total / count)


def record_perplexity(folder: Path, data_dir: Path) -> float:
    """Measure a model folder's held-out perplexity and keep it in its model card (twin included)."""
    from server.models import read_card, write_card

    ppl = perplexity(load_model(folder), heldout_blocks(folder, data_dir))
    for path in {folder} | ({folder.parent / card.twin} if (card := read_card(folder)) and card.twin else set()):
        if (c := read_card(path)) is not None:
            c.measured["heldout_ppl"] = round(ppl, 3)
            write_card(path, c)
    return ppl


@torch.no_grad()
def choice_logprobs(model: PreTrainedModel, tokenizer, example, prompt: torch.Tensor | None = None) -> list[float]:
    """Sum of log-probabilities of each choice's tokens after the context (behind an optional soft prompt).

    All choices of an item go through the model as one right-padded batch; the context is tokenized once and
    each choice's tokens appended, so every choice is scored against the same context tokens.
    """
    context = tokenizer(example.context)["input_ids"]
    rows = [context + tokenizer(choice, add_special_tokens=False)["input_ids"] for choice in example.choices]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    embeds = model.get_input_embeddings()(ids)
    m = 0 if prompt is None else prompt.shape[0]
    if prompt is not None:
        embeds = torch.cat([prompt.expand(len(rows), -1, -1), embeds], dim=1)
    logprobs = model(inputs_embeds=embeds).logits[:, m:-1].log_softmax(-1)
    scores = []
    for i, row in enumerate(rows):
        targets = torch.tensor(row[len(context):])
        positions = torch.arange(len(context) - 1, len(row) - 1)
        scores.append(logprobs[i, positions, targets].sum().item())
    return scores


def mc_accuracy(model: PreTrainedModel, tokenizer, examples, prompt: torch.Tensor | None = None) -> float:
    """Multiple-choice accuracy by log-likelihood (the highest-scoring choice must be the right one)."""
    right = 0
    for example in examples:
        scores = choice_logprobs(model, tokenizer, example, prompt)
        right += int(max(range(len(scores)), key=scores.__getitem__) == example.answer)
    return right / len(examples)
