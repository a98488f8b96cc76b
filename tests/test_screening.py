"""Task screening: the protocol's rule, pieces that resume to the same outcomes, pools from the rule alone."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from server.lab import screening
from server.lab.loading import freeze, load_model
from server.lab.screening import classify, paired_ci, screen_task


@pytest.mark.parametrize(
    ("n", "chance", "base", "compressed", "status"),
    [
        (300, 0.25, 0.60, 0.45, "damaged"),
        (300, 0.25, 0.60, 0.52, "damaged"),  # exactly 8 points
        (300, 0.25, 0.60, 0.58, "undamaged"),
        (300, 0.25, 0.60, 0.55, "unused"),  # between 3 and 8 points
        (300, 0.25, 0.34, 0.10, "unused"),  # base within 10 points of chance
        (149, 0.25, 0.90, 0.40, "unused"),  # too few dev examples
    ],
)
def test_the_rule(n, chance, base, compressed, status):
    assert classify(n, chance, base, compressed) == status


def test_paired_ci_covers_a_known_difference():
    low, high = paired_ci(np.array([1.0] * 30 + [0.0] * 70))
    assert low < 0.3 < high and high - low < 0.25


def test_a_screen_stopped_and_resumed_gives_the_uninterrupted_outcomes(tiny_llama: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(screening, "DEV_LIMIT", 12)
    model, tokenizer = freeze(load_model(tiny_llama)), AutoTokenizer.from_pretrained(tiny_llama)
    whole, pieces = tmp_path / "whole.json", tmp_path / "pieces.json"
    assert screen_task(model, tokenizer, "strategyqa", whole, "digest", deadline=float("inf"))
    assert not screen_task(model, tokenizer, "strategyqa", pieces, "digest", deadline=time.monotonic())
    assert len(json.loads(pieces.read_text())["picks"]) == 1
    assert screen_task(model, tokenizer, "strategyqa", pieces, "digest", deadline=float("inf"))
    assert json.loads(pieces.read_text()) == json.loads(whole.read_text())
    assert json.loads(whole.read_text())["n"] == 12
    screen_task(model, tokenizer, "strategyqa", pieces, "other-weights", deadline=time.monotonic())
    assert len(json.loads(pieces.read_text())["picks"]) == 1, "outcomes of other weights are void"


def test_report_applies_the_rule_and_picks_the_transfer_task(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(screening, "RUN_DIR", tmp_path)
    accuracies = {
        "si_conversion": (0.8, 0.6),
        "step_ordering": (0.8, 0.7),
        "hyperbaton": (0.7, 0.5),
        "winowhy": (0.7, 0.69),
        "strategyqa": (0.52, 0.40),
    }
    for role, column in (("base", 0), ("compressed", 1)):
        (tmp_path / role).mkdir()
        (tmp_path / role / "model.json").write_text(json.dumps({"folder": role, "weights_sha256": role}))
        for task, acc in accuracies.items():
            right = round(acc[column] * 200)
            state = {
                "task": task,
                "weights_sha256": role,
                "n": 200,
                "chance": 0.5,
                "answers": [0] * 200,
                "picks": [0] * right + [1] * (200 - right),
                "picks_norm": [0] * 200,
            }
            (tmp_path / role / f"{task}.json").write_text(json.dumps(state))
    for task, acc in (("fever", 0.55), ("novel_systems", 0.8)):  # base half only
        right = round(acc * 200)
        state = {"task": task, "weights_sha256": "base", "n": 200, "chance": 0.5, "answers": [0] * 200}
        state |= {"picks": [0] * right + [1] * (200 - right), "picks_norm": [0] * 200}
        (tmp_path / "base" / f"{task}.json").write_text(json.dumps(state))
    result = screening.report([*accuracies, "timedial", "fever", "novel_systems"])
    status = {r["task"]: r["status"] for r in result["tasks"]}
    assert status == {
        "si_conversion": "damaged",
        "step_ordering": "damaged",
        "hyperbaton": "damaged",
        "winowhy": "undamaged",
        "strategyqa": "unused",
        "timedial": "incomplete",
        "fever": "unused",  # the base model alone rules it out: its compressed half is not needed
        "novel_systems": "incomplete",  # base well above chance: the compressed half decides
    }
    # test sizes: hyperbaton 880, si_conversion 913, step_ordering 933: the smallest is held out for transfer
    assert result["transfer_task"] == "hyperbaton" and result["primary_pool"] == ["si_conversion", "step_ordering"]
    assert result["primary_pool_test_n"] == 913 + 933
    assert result["do_no_harm"] == ["winowhy"]
    assert json.loads((tmp_path / "screening.json").read_text()) == result
