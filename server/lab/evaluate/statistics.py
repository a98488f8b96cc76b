"""What the records say, with its uncertainty: percentile-bootstrap confidence intervals stratified by task,
paired differences against a reference method, and the accuracy of chance."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from server.lab import tasks
from server.lab.evaluate.examples import GEN_TASKS
from server.lab.tasks import task_split


def bootstrap_ci(
    groups: Sequence[Sequence[float]], samples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of group means, resampling examples within each group.

    Stratified by task so that the average over tasks keeps every task's weight; pass per-example differences
    of two methods on the same examples for a paired CI of their difference.
    """
    rng = np.random.default_rng(seed)
    means = np.zeros(samples)
    for group in groups:
        values = np.asarray(group, dtype=float)
        means += values[rng.integers(0, len(values), (samples, len(values)))].mean(axis=1)
    means /= len(groups)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def chance(task: str, limit: int | None) -> float:
    """Accuracy of a uniform random guess on the evaluated examples (0 for generative tasks)."""
    return 0.0 if task in GEN_TASKS else tasks.chance(task_split(task, "test", limit))


def summarize(
    records: list[dict], methods: Sequence[str], tasks: Sequence[str], reference: str, samples: int = 2000
) -> dict[str, dict]:
    """Per method: accuracy and CI per task, the average over tasks, and paired differences to `reference`."""

    def correct(method: str, task: str) -> list[int]:
        rows = sorted((r for r in records if r["method"] == method and r["task"] == task), key=lambda r: r["example"])
        return [r["correct"] for r in rows]

    out = {}
    for method in methods:
        per_task = {t: correct(method, t) for t in tasks}
        diffs = [[a - b for a, b in zip(per_task[t], correct(reference, t), strict=True)] for t in tasks]
        mine = [r for r in records if r["method"] == method]
        out[method] = {
            "tasks": {
                t: {
                    "acc": float(np.mean(v)),
                    "ci": bootstrap_ci([v], samples),
                    "n": len(v),
                    "delta_ci": bootstrap_ci([d], samples),
                }
                for (t, v), d in zip(per_task.items(), diffs)
            },
            "avg": float(np.mean([np.mean(v) for v in per_task.values()])),
            "avg_ci": bootstrap_ci(list(per_task.values()), samples),
            "delta": float(np.mean([np.mean(d) for d in diffs])),
            "delta_ci": bootstrap_ci(diffs, samples),
            "select_ms": 1000 * float(np.mean([r["select_s"] for r in mine])),
            "seconds": float(np.mean([r["seconds"] for r in mine])),
        }
    return out
