"""Real benchmark tasks (BIG-bench JSON tasks, vendored from the `bigbench` sdist), split once and for all.

Each example is a multiple-choice item scored by log-likelihood: a context (BIG-bench's own prefixes) and
the choices as continuations. Splits are fixed by a hash of the task and the example's input, so every
command (training banks, LoRA, evaluation) sees the same train / dev / test examples on any machine, and
nothing trains on a test example.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

TASK_DIR = Path(__file__).parent / "data" / "bigbench"
Split = Literal["train", "dev", "test"]

# task name -> path under bigbench/benchmark_tasks; chosen where SmolLM2-135M is clearly above chance
TASKS: dict[str, str] = {
    "unit_identification": "unit_conversion/unit_identification",
    "step_inference": "goal_step_wikihow/step_inference",
    "goal_inference": "goal_step_wikihow/goal_inference",
    "general_knowledge": "general_knowledge",
    "phrase_relatedness": "phrase_relatedness",
    "similarities_abstraction": "similarities_abstraction",
    "physical_intuition": "physical_intuition",
    "human_organs_senses": "human_organs_senses",
    "odd_one_out": "odd_one_out",
    "riddle_sense": "riddle_sense",
    "emoji_movie": "emoji_movie",
    "anachronisms": "anachronisms",
}

# More tasks, vendored to be screened on their dev splits (docs/evaluation-protocol.md) before any of them
# enters an evaluation pool; the default `evaluate` keeps to TASKS. Each has >= 1,500 examples (>= 150 dev).
CANDIDATES: dict[str, str] = {
    "si_conversion": "unit_conversion/si_conversion",
    "different_systems": "unit_conversion/different_systems",
    "chained_conversion": "unit_conversion/chained_conversion",
    "novel_systems": "unit_conversion/novel_systems",
    "step_ordering": "goal_step_wikihow/step_ordering",
    "fever": "fact_checker/fever",
    "question_selection": "question_selection",
    "timedial": "timedial",
    "social_iqa": "social_iqa",
    "winowhy": "winowhy",
    "strategyqa": "strategyqa",
    "epistemic_reasoning": "epistemic_reasoning",
    "logical_fallacy_detection": "logical_fallacy_detection",
    "bbq_race_disambig": "bbq_lite_json/race_ethnicity_disambig",
    "hyperbaton": "hyperbaton",
    "sentiment_en": "multiemo/all_sentence_en",
    "knowledge_conflicts": "contextual_parametric_knowledge_conflicts",
}
ALL_TASKS: dict[str, str] = TASKS | CANDIDATES


@dataclass(frozen=True)
class Example:
    """One multiple-choice item: score `context + choice` for each choice; `answer` indexes the right one."""

    task: str
    context: str
    choices: tuple[str, ...]
    answer: int

    def rendered(self) -> str:
        """The item with its right answer, as training text."""
        return self.context + self.choices[self.answer]


def load_task(name: str) -> list[Example]:
    """All examples of a task, in file order."""
    if name not in ALL_TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(ALL_TASKS)}")
    raw = json.loads((TASK_DIR / ALL_TASKS[name] / "task.json").read_text(encoding="utf-8"))
    prefix = raw.get("task_prefix", "")
    q, a = raw.get("example_input_prefix", "\nQ: "), raw.get("example_output_prefix", "\nA: ")
    examples = []
    for item in raw["examples"]:
        scores = item.get("target_scores")
        if not scores or max(scores.values()) <= 0:
            continue
        choices = tuple(scores)
        answer = max(range(len(choices)), key=lambda i: scores[choices[i]])
        examples.append(Example(name, f"{prefix}{q}{item['input']}{a}".lstrip("\n"), choices, answer))
    return examples


def split_of(example: Example) -> Split:
    """train 60% / dev 10% / test 30%, by a stable hash of task and context."""
    bucket = int(hashlib.sha256(f"{example.task}\0{example.context}".encode()).hexdigest(), 16) % 10
    return "train" if bucket < 6 else "dev" if bucket < 7 else "test"


def task_split(name: str, split: Split, limit: int | None = None) -> list[Example]:
    """The examples of one split of a task (at most `limit`, taken in file order)."""
    chosen = [e for e in load_task(name) if split_of(e) == split]
    return chosen[:limit] if limit is not None else chosen


def chance(examples: list[Example]) -> float:
    """Expected accuracy of a uniform random pick: the mean of 1 / (number of choices)."""
    return sum(1 / len(e.choices) for e in examples) / len(examples)
