"""Per-example records: every method on the same examples, one record each (the prompt it chose, the scores or
the answer, whether it was right, its wall seconds), and each method's held-out perplexity."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from server.lab.evaluate.examples import GEN_MAX_TOKENS, GEN_TASKS, EvalExample, request_ids
from server.lab.evaluate.methods import Method
from server.lab.evaluate.scoring import choice_logprobs, greedy, normalize, perplexity
from server.lab.tasks import Example


def mc_record(method: Method, tokenizer, example: Example) -> dict:
    """Score every choice behind the prompt chosen from the context alone; the prediction is the best choice."""
    prompt, name, seconds = method.choose(request_ids(tokenizer, example.task, example))
    scores = choice_logprobs(method.model, tokenizer, example, prompt)
    pred = max(range(len(scores)), key=scores.__getitem__)
    return {"prompt": name, "select_s": seconds, "scores": scores, "pred": pred, "correct": int(pred == example.answer)}


def gen_record(method: Method, tokenizer, example: Example) -> dict:
    """Exact match of the greedy answer to the right choice, after `examples.shots` (the prompt is chosen from
    this request, demonstrations and question, alone). The context's trailing space is dropped: a lone space token
    is not how answers start in text, and after it the small model mostly emits a newline."""
    ids = request_ids(tokenizer, f"{example.task}:gen", example)
    prompt, name, seconds = method.choose(ids)
    output = greedy(method.model, tokenizer, ids, prompt, GEN_MAX_TOKENS)
    target = example.choices[example.answer]
    return {
        "prompt": name,
        "select_s": seconds,
        "output": output,
        "target": target,
        "correct": int(normalize(output) == normalize(target)),
    }


def run_methods(methods: Sequence[Method], tokenizer, examples: list[EvalExample]) -> list[dict]:
    """Per-example records of every method on the same examples, with wall seconds per example."""
    records = []
    for method in methods:
        for task, index, example in tqdm(examples, desc=method.name):
            start = time.perf_counter()
            record = (gen_record if task in GEN_TASKS else mc_record)(method, tokenizer, example)
            records.append(
                {
                    "method": method.name,
                    "task": task,
                    "example": index,
                    "seconds": time.perf_counter() - start,
                    **record,
                }
            )
    return records


def selected_records(method: Method, tokenizer, examples: list[EvalExample], records: list[dict]) -> list[dict]:
    """Records of a selecting method (IDP) from those of the forced prompts: select on each request, then take the
    chosen prompt's forced record. Decoding behind the chosen prompt is exactly forcing it (the end-to-end test
    checks it against decoding), so this saves a decode per example; `seconds` adds the selection pass."""
    forced = {(r["method"], r["task"], r["example"]): r for r in records}
    out = []
    for task, index, example in tqdm(examples, desc=method.name):
        _, name, seconds = method.choose(request_ids(tokenizer, task, example))
        twin = forced[f"forced:{name}", task, index]
        out.append(
            twin | {"method": method.name, "prompt": name, "select_s": seconds, "seconds": twin["seconds"] + seconds}
        )
    return out


def method_perplexity(method: Method, blocks: torch.Tensor) -> float:
    """Held-out perplexity; IDP selects per block from the block itself, as the server does for an echo request.

    Blocks have equal lengths, so the geometric mean of per-block perplexities is the overall perplexity.
    """
    logs = []
    for row in blocks:
        prompt, _, _ = method.choose(row.tolist())
        logs.append(math.log(perplexity(method.model, row[None], prompt)))
    return math.exp(sum(logs) / len(logs))
