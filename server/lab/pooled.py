"""Pooled metrics over an evaluation pool, with the stratified paired bootstrap of docs/evaluation-protocol.md.

Every method is scored on the same examples, so comparisons are paired: a bootstrap resample draws, within each
task, that task's examples with replacement (same count), and keeps each drawn example's outcome for every
method together. Pooled accuracy is the micro-average (every example weighs the same). The fraction of the gap
recovered, FGR = (method - compressed) / (base - compressed), is computed on the pooled accuracies of each
resample; its 95% interval is the percentile interval over 10,000 resamples, seed 0.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

Outcomes = Mapping[str, np.ndarray]
"""Per task, a 0/1 (or real-valued) outcome per test example, in the same example order for every method."""

RESAMPLES = 10_000
SEED = 0
CHUNK = 500


def _resampled_sums(
    tasks: list[str], sizes: dict[str, int], methods: list[Outcomes], resamples: int, seed: int
) -> Iterator[np.ndarray]:
    """Chunks [methods, chunk] of pooled outcome sums over stratified paired resamples."""
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, CHUNK):
        count = min(CHUNK, resamples - start)
        sums = np.zeros((len(methods), count))
        for task in tasks:
            index = rng.integers(0, sizes[task], (count, sizes[task]))
            for i, outcomes in enumerate(methods):
                sums[i] += np.asarray(outcomes[task], dtype=float)[index].sum(axis=1)
        yield sums


def resampled_means(methods: list[Outcomes], resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """Pooled means [methods, resamples] over stratified paired bootstrap resamples."""
    tasks = sorted(methods[0])
    sizes = {t: len(methods[0][t]) for t in tasks}
    for outcomes in methods:
        if sorted(outcomes) != tasks or any(len(outcomes[t]) != sizes[t] for t in tasks):
            raise ValueError("paired outcomes must cover the same tasks with the same number of examples")
    total = sum(sizes.values())
    return np.concatenate(list(_resampled_sums(tasks, sizes, methods, resamples, seed)), axis=1) / total


def pooled_mean(outcomes: Outcomes) -> float:
    """The micro-average over every example of every task."""
    return float(sum(np.sum(v) for v in outcomes.values()) / sum(len(v) for v in outcomes.values()))


def _interval(values: np.ndarray) -> tuple[float, float]:
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def paired_difference(a: Outcomes, b: Outcomes, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """Pooled mean of a minus b, with its stratified paired bootstrap 95% interval."""
    means = resampled_means([a, b], resamples, seed)
    return {"difference": pooled_mean(a) - pooled_mean(b), "ci": _interval(means[0] - means[1])}


def gap_recovered(
    base: Outcomes, compressed: Outcomes, method: Outcomes, resamples: int = RESAMPLES, seed: int = SEED
) -> dict:
    """FGR of `method` with its 95% interval; `defined` is False (FGR None) when the pooled gap's own interval
    contains 0, where a ratio over it means nothing."""
    means = resampled_means([base, compressed, method], resamples, seed)
    gap = pooled_mean(base) - pooled_mean(compressed)
    gaps = means[0] - means[1]
    gap_ci = _interval(gaps)
    out = {"gap": gap, "gap_ci": gap_ci, "defined": gap_ci[0] > 0, "fgr": None, "ci": None}
    if out["defined"]:
        out["fgr"] = (pooled_mean(method) - pooled_mean(compressed)) / gap
        out["ci"] = _interval((means[2] - means[1]) / gaps)
    return out


def agreement(method_picks: Outcomes, base_picks: Outcomes, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """Share of examples where the method picks the base model's choice (1 - flips), with its interval."""
    same = {t: (np.asarray(method_picks[t]) == np.asarray(base_picks[t])).astype(float) for t in base_picks}
    return {"agreement": pooled_mean(same), "ci": _interval(resampled_means([same], resamples, seed)[0])}


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a proportion (per-task accuracy)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(centre - half), float(centre + half)


def mean_interval(outcomes: Outcomes, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """Pooled mean (micro-average) with its stratified bootstrap 95% interval."""
    return {"mean": pooled_mean(outcomes), "ci": _interval(resampled_means([outcomes], resamples, seed)[0])}


def ratio_interval(
    numerators: np.ndarray, denominators: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED
) -> tuple[float, float]:
    """95% interval of sum(numerators) / sum(denominators) over documents resampled with replacement.

    Per-token means over text (KL, log-perplexity) are ratios of per-document sums: tokens of one document are
    not independent, so the document is the unit resampled, and long documents keep their weight.
    """
    num, den = np.asarray(numerators, dtype=float), np.asarray(denominators, dtype=float)
    rng = np.random.default_rng(seed)
    ratios = np.concatenate(
        [
            num[index].sum(axis=1) / den[index].sum(axis=1)
            for start in range(0, resamples, CHUNK)
            for index in [rng.integers(0, len(num), (min(CHUNK, resamples - start), len(num)))]
        ]
    )
    return _interval(ratios)
