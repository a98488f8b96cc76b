"""Pooled FGR, paired differences and agreement on constructed outcomes whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from server.lab.pooled import agreement, gap_recovered, paired_difference, pooled_mean, wilson

RESAMPLES = 2_000


def outcomes(**tasks: list[int]) -> dict[str, np.ndarray]:
    return {t: np.array(v, dtype=float) for t, v in tasks.items()}


# two tasks of different sizes; the base gets everything right, the compressed model half
BASE = outcomes(a=[1] * 400, b=[1] * 100)
COMPRESSED = outcomes(a=[1, 0] * 200, b=[1, 0] * 50)


def test_a_method_equal_to_base_recovers_all_and_one_equal_to_compressed_nothing():
    full = gap_recovered(BASE, COMPRESSED, BASE, RESAMPLES)
    assert full["fgr"] == 1.0 and full["ci"] == (1.0, 1.0) and full["gap"] == 0.5
    none = gap_recovered(BASE, COMPRESSED, COMPRESSED, RESAMPLES)
    assert none["fgr"] == 0.0 and none["ci"] == (0.0, 0.0)


def test_half_the_gap_recovered_on_every_example_pair_pattern():
    # the method fixes every other example the compressed model got wrong: exactly half the gap
    method = outcomes(a=[1, 1, 1, 0] * 100, b=[1, 1, 1, 0] * 25)
    result = gap_recovered(BASE, COMPRESSED, method, RESAMPLES)
    assert result["fgr"] == pytest.approx(0.5)
    low, high = result["ci"]
    assert low < 0.5 < high and high - low < 0.2
    bigger = gap_recovered(
        {t: np.tile(v, 4) for t, v in BASE.items()},
        {t: np.tile(v, 4) for t, v in COMPRESSED.items()},
        {t: np.tile(v, 4) for t, v in method.items()},
        RESAMPLES,
    )
    assert bigger["ci"][1] - bigger["ci"][0] < 0.6 * (high - low), "four times the examples: about half the width"


def test_pooling_is_the_micro_average_and_resampling_is_stratified():
    method = outcomes(a=[1] * 400, b=[0, 0, 0, 0] * 25)  # fixes all of a (400 ex), breaks all of b (100 ex)
    assert pooled_mean(method) == pytest.approx(400 / 500)
    assert gap_recovered(BASE, COMPRESSED, method, RESAMPLES)["fgr"] == pytest.approx((0.8 - 0.5) / 0.5)
    # a task where every method is right contributes the same count to every resample: no variance from it
    same = {"a": np.ones(50)}
    assert paired_difference(same, same, RESAMPLES)["ci"] == (0.0, 0.0)


def test_no_gap_means_no_fgr():
    result = gap_recovered(COMPRESSED, COMPRESSED, BASE, RESAMPLES)
    assert result["defined"] is False and result["fgr"] is None


def test_paired_difference_and_agreement():
    better = outcomes(a=[1, 1] * 200, b=[1, 0] * 50)
    diff = paired_difference(better, COMPRESSED, RESAMPLES)
    assert diff["difference"] == pytest.approx(200 / 500) and diff["ci"][0] > 0.3
    picks_base = {"a": np.zeros(10, dtype=int)}
    picks = {"a": np.array([0] * 9 + [2])}
    assert agreement(picks, picks_base, RESAMPLES)["agreement"] == pytest.approx(0.9)
    with pytest.raises(ValueError, match="same tasks"):
        paired_difference(better, {"a": better["a"]}, RESAMPLES)


def test_wilson_interval():
    low, high = wilson(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    assert wilson(0, 10)[0] == pytest.approx(0.0, abs=1e-12) and wilson(10, 10)[1] == pytest.approx(1.0)
