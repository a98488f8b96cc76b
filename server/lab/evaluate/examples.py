"""What is evaluated: the test examples of each task, the generative tasks derived from multiple-choice ones, and
what a request holds for an example (all that the selection pass may see)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

from server.lab.tasks import Example, task_split

GEN_TASKS: dict[str, str] = {f"{task}:gen": task for task in ("general_knowledge", "human_organs_senses")}
"""Generative tasks derived from MC tasks: greedy answers scored by exact match against the right choice.

Chosen by a probe where the base model answers some items exactly (3-shot) and the compressed model fewer;
zero-shot, SmolLM2-135M matched none on any task, which would make the comparison empty.
"""
GEN_MAX_TOKENS = 16
GEN_SHOTS = 3

EvalExample = tuple[str, int, Example]
"""(task name as evaluated, index in its test split, the example)."""


@functools.cache
def shots(task: str) -> str:
    """The few-shot demonstrations of a generative task: its first GEN_SHOTS train examples, answered."""
    return "".join(e.rendered() + "\n\n" for e in task_split(task, "train", GEN_SHOTS))


def request_ids(tokenizer, task: str, example: Example) -> list[int]:
    """What a request holds for an example, all that selection may see: the context (multiple choice), or
    the demonstrations and the question (generative tasks, see `records.gen_record`)."""
    if task in GEN_TASKS:
        return tokenizer(shots(example.task) + example.context.rstrip())["input_ids"]
    return tokenizer(example.context)["input_ids"]


def eval_examples(tasks: Sequence[str], limit: int | None) -> list[EvalExample]:
    """(task, index, example) of the test split of each task (MC names or GEN_TASKS names), `limit` per task."""
    return [(task, i, e) for task in tasks for i, e in enumerate(task_split(GEN_TASKS.get(task, task), "test", limit))]
