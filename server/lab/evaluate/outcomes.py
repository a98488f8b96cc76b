"""Per-example outcomes of the pooled evaluation, and the shard files that keep them across runs.

One forward of the model body per method and example scores every choice of the example (one right-padded
batch); the LM head then runs only where a number is needed: the positions that predict choice tokens, and for
the right answer's row every position, whose distribution gives that method's token KL to the base model over
context + answer (the label-free oracle picks the bank prompt with the lowest). IDP is never scored separately:
the prompt it selects in front of the same input is the same computation as forcing that prompt, so its outcome
is the forced prompt's, looked up (docs/evaluation-protocol.md, amendment 2).

Outcomes are written to one JSON shard per (unit, task) as they come; a shard records what it was measured on
(model, bank and adapter weights digests, the examples), and a run that finds a shard measured on anything else
refuses to continue it rather than mixing outcomes of two models.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from time import monotonic

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from server.core.selection import CachedSelector
from server.lab.tasks import Example

SAVE_EVERY = 10
"""Examples between shard writes: a killed run loses at most this many."""


@dataclass(frozen=True, eq=False)
class Scorer:
    """One method scored directly: a model, and the soft prompt [m, d] in front of every input (or none)."""

    name: str
    model: PreTrainedModel
    prompt: torch.Tensor | None = None
    trainable: int = 0


@dataclass(frozen=True, eq=False)
class ScoringSet:
    """What one example is scored with: the base model (the KL reference), the other directly scored methods,
    and IDP's selector over the bank's prompts, named `prompt_names` (forced as `forced:<name>`)."""

    base: Scorer | None
    scorers: Sequence[Scorer]
    selector: CachedSelector | None
    prompt_names: Sequence[str]


@torch.no_grad()
def _hidden(model: PreTrainedModel, ids: torch.Tensor, prompt: torch.Tensor | None) -> torch.Tensor:
    """Final hidden states [B, T, d] at the text positions of `ids` [B, T], behind an optional prompt."""
    embeds = model.get_input_embeddings()(ids.to(model.device))
    if prompt is not None:
        embeds = torch.cat([prompt.expand(len(ids), -1, -1).to(embeds.dtype), embeds], dim=1)
    return model.base_model(inputs_embeds=embeds).last_hidden_state[:, -ids.shape[1] :]


@torch.no_grad()
def _logprobs(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    return model.get_output_embeddings()(hidden).float().log_softmax(-1)


def score_choices(
    scorer: Scorer, context: list[int], choices: list[list[int]], answer: int | None
) -> tuple[list[float], torch.Tensor | None]:
    """Sum of log-probabilities of each choice's tokens after `context`, and (with `answer`) the next-token
    log-probabilities [len(context + answer) - 1, V] over the right answer's row, from one batched forward."""
    rows = [context + c for c in choices]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    hidden = _hidden(scorer.model, ids, scorer.prompt)
    first = len(context) - 1
    logprobs = _logprobs(scorer.model, hidden[:, first : width - 1])
    device = logprobs.device
    scores = [
        float(logprobs[i, torch.arange(len(c), device=device), torch.tensor(c, dtype=torch.long, device=device)].sum())
        for i, c in enumerate(choices)
    ]
    if answer is None:
        return scores, None
    return scores, _logprobs(scorer.model, hidden[answer, : len(rows[answer]) - 1])


def kl_sum(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Sum over positions of KL(reference || other), both [T, V] log-probabilities."""
    return float((reference.exp() * (reference - other)).sum())


def choice_ids(tokenizer, example: Example) -> tuple[list[int], list[list[int]]]:
    """The context's token ids (what selection sees) and each choice's, appended to it as scored."""
    context = tokenizer(example.context)["input_ids"]
    return context, [tokenizer(c, add_special_tokens=False)["input_ids"] for c in example.choices]


def _picks(scores: list[float], example: Example) -> tuple[int, int]:
    """The chosen answer by log-likelihood and by log-likelihood per UTF-8 byte (lm-evaluation-harness acc_norm)."""
    norm = [s / max(1, len(c.encode("utf-8"))) for s, c in zip(scores, example.choices, strict=True)]
    return int(np.argmax(scores)), int(np.argmax(norm))


def example_record(scoring: ScoringSet, tokenizer, index: int, example: Example) -> dict:
    """Every method's pick on one example; with a base model, each method's mean token KL to it over context +
    right answer; with a selector, the prompt IDP selects from the context alone and IDP's (looked-up) outcome."""
    context, choices = choice_ids(tokenizer, example)
    record: dict = {"index": index, "answer": example.answer, "picks": {}, "picks_norm": {}}
    reference = None
    if scoring.base is not None:
        scores, reference = score_choices(scoring.base, context, choices, example.answer)
        record["picks"]["base"], record["picks_norm"]["base"] = _picks(scores, example)
        record["kl"] = {}
    for scorer in scoring.scorers:
        scores, logprobs = score_choices(scorer, context, choices, example.answer if reference is not None else None)
        record["picks"][scorer.name], record["picks_norm"][scorer.name] = _picks(scores, example)
        if reference is not None and logprobs is not None:
            record["kl"][scorer.name] = kl_sum(reference, logprobs) / len(reference)
    if scoring.selector is not None:
        _select_into(record, scoring, context)
    return record


def _select_into(record: dict, scoring: ScoringSet, ids: list[int]) -> None:
    """IDP's selection on `ids`, and its outcome copied from the selected prompt's forced outcome."""
    assert scoring.selector is not None
    chosen = scoring.selector.select([ids])[0]
    name = scoring.prompt_names[chosen.index]
    record["selected"], record["select_s"] = name, chosen.seconds
    for field in ("picks", "picks_norm", "kl", "nll"):
        if field in record:
            record[field]["idp"] = record[field][f"forced:{name}"]


@torch.no_grad()
def text_record(scoring: ScoringSet, doc: str, ids: list[int]) -> dict:
    """One block of held-out general text: per method the summed next-token NLL and KL(base || method) over its
    predicted tokens (IDP selects from the block itself, as the server does for an echo request)."""
    assert scoring.base is not None, "general text is measured against the base model"
    row = torch.tensor([ids])
    targets = row[0, 1:]
    record: dict = {"doc": doc, "tokens": len(ids) - 1, "nll": {}, "kl": {}}
    reference = None
    for scorer in [scoring.base, *scoring.scorers]:
        logprobs = _logprobs(scorer.model, _hidden(scorer.model, row, scorer.prompt)[0, :-1])
        positions = torch.arange(len(targets), device=logprobs.device)
        record["nll"][scorer.name] = -float(logprobs[positions, targets.to(logprobs.device)].sum())
        reference = logprobs if reference is None else reference
        record["kl"][scorer.name] = kl_sum(reference, logprobs)
    if scoring.selector is not None:
        _select_into(record, scoring, ids)
    return record


class Deadline:
    """When a run stops scoring (`--max-seconds`), shared by every shard it fills."""

    def __init__(self, seconds: float) -> None:
        self.end = monotonic() + seconds

    def passed(self) -> bool:
        return monotonic() > self.end


class Shard:
    """The outcomes of one unit (a task's evaluated split, its dev choice pass, or the general text), in order.

    `header` says what the outcomes were measured on; an existing file with another header is refused (a
    ValueError naming the file and the field), so a resumed or merged run never mixes two models or banks.
    """

    def __init__(self, path: Path, header: dict) -> None:
        self.path, self.header = path, header
        self.records: list[dict] = []
        if path.exists():
            data = json.loads(path.read_text())
            check_header(path, data["header"], header)
            self.records = data["records"]

    def save(self) -> None:
        """Write atomically: a run killed mid-write leaves the previous complete file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"header": self.header, "records": self.records}))
        os.replace(tmp, self.path)

    def fill(self, count: int, record: Callable[[int], dict], deadline: Deadline) -> bool:
        """Append records up to `count` (saving every SAVE_EVERY) until done or past `deadline`; return whether
        the shard is complete."""
        done = len(self.records)
        for i in tqdm(range(done, count), desc=self.path.stem, initial=done, total=count):
            if deadline.passed():
                break
            self.records.append(record(i))
            if (i + 1) % SAVE_EVERY == 0:
                self.save()
        self.save()
        return len(self.records) >= count


def check_header(path: Path, found: dict, expected: dict) -> None:
    """Refuse a shard measured on other inputs than these (models, banks, adapters, examples)."""
    for key in sorted(set(found) | set(expected)):
        if found.get(key) != expected.get(key):
            raise ValueError(
                f"{path}: measured with {key} = {found.get(key)!r}, this run has {expected.get(key)!r}; outcomes "
                "of different inputs cannot be merged: run with the inputs it was measured on, or another --out"
            )
