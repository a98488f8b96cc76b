"""The contamination check: no evaluated example may occur in the text any prompt or adapter trained on.

BIG-bench's unit tasks generate some questions twice, in two tasks; the splits hash task and context, so the same
question can be a train example of one task and a test example of another. `clean_split` removes such examples
before scoring (docs/evaluation-protocol.md, amendment 2) and `leaked_examples` is the guard that none is left.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from server.lab.corpus import source_texts
from server.lab.evaluate.examples import EvalExample
from server.lab.tasks import Example, task_split


def training_text(sources: Sequence[str], data_dir: Path) -> str:
    """Every training text of `sources`, one per line, with a leading newline (so a match can anchor at one)."""
    return "\n" + "\n".join(t for source in sources for t in source_texts(source, data_dir))


def contaminated(example: Example, text: str) -> bool:
    """Whether the example's context starts a training text or a line of one.

    Anchored at a line start: unanchored, "8 m expressed in units of km is" would match inside "22.8 m ...".
    """
    return "\n" + example.context.strip() in text


def leaked_examples(sources: Sequence[str], examples: list[EvalExample], data_dir: Path) -> list[str]:
    """Evaluated examples found in the training text of `sources` (must be none)."""
    text = training_text(sources, data_dir)
    return [f"{task}#{index}" for task, index, e in examples if contaminated(e, text)]


def clean_split(task: str, split: str, cap: int | None, text: str) -> tuple[list[Example], list[int]]:
    """The first `cap` examples of a task's split (all: None) that `text` does not contain, in file order, and
    the split positions of the contaminated ones skipped on the way."""
    kept: list[Example] = []
    removed: list[int] = []
    for position, example in enumerate(task_split(task, split)):
        if cap is not None and len(kept) == cap:
            break
        if contaminated(example, text):
            removed.append(position)
        else:
            kept.append(example)
    return kept, removed
