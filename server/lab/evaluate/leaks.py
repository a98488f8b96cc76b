"""The contamination check: no evaluated example may occur in the text any prompt or adapter trained on."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from server.lab.corpus import source_texts
from server.lab.evaluate.examples import EvalExample


def leaked_examples(sources: Sequence[str], examples: list[EvalExample], data_dir: Path) -> list[str]:
    """Evaluated examples whose context starts a training text or a line of one, in `sources` (must be none).

    Anchored at a line start: unanchored, "8 m expressed in units of km is" would match inside "22.8 m ...".
    """
    text = "\n" + "\n".join(t for source in sources for t in source_texts(source, data_dir))
    return [f"{task}#{index}" for task, index, e in examples if "\n" + e.context.strip() in text]
