"""The routing study (server/lab/routing.py, protocol section 7): its split, its choice, its oracle losses, and what
it writes into a bank. The choice is checked on constructed scores whose right answer is known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from server.core.banks import SelectionRule, load_bank, make_bank, save_bank
from server.core.identity import Fingerprint
from server.lab.routing import (
    MAX_RUN,
    Candidate,
    MeasurementCache,
    candidates,
    choose,
    half_of,
    kd_losses,
    study,
    write_rule,
)
from tests.helpers import micro_llama

N, L, K = 400, 3, 3


def test_dev_halves_are_stable_disjoint_and_about_even():
    keys = [f"task/{i}" for i in range(2000)]
    halves = [half_of(key) for key in keys]
    assert halves == [half_of(key) for key in reversed(keys)][::-1], "a key's half does not depend on the others"
    assert set(halves) == {"A", "B"}
    assert 0.45 < halves.count("A") / len(keys) < 0.55
    assert [half_of("general/0"), half_of("unit_identification/abc")] == ["B", "A"], "pinned: the split never moves"


def test_candidates_are_every_score_centring_and_layer_set_simplest_first():
    found = candidates(6)
    layer_sets = {c.layers for c in found}
    runs = [s for s in layer_sets if s is not None]
    assert None in layer_sets and all(len(s) <= MAX_RUN and s == tuple(range(s[0], s[-1] + 1)) for s in runs)
    assert len(runs) == 6 + 5 + 4 + 3
    assert len(found) == 2 * 2 * (1 + len(runs))
    assert found[0] == Candidate("mass", False, (0,))
    assert found[-1] == Candidate("mass_no_sink", True, None)


def scores_for(oracle: np.ndarray, layer: int, noise: float = 1.0, seed: int = 0) -> np.ndarray:
    """Per-layer scores [N, L, K]: random, except that `layer` ranks the oracle prompt first."""
    rng = np.random.default_rng(seed)
    scores = rng.random((len(oracle), L, K)) * noise
    scores[np.arange(len(oracle)), layer, oracle] += 2.0
    return scores


@pytest.fixture
def oracle() -> np.ndarray:
    return np.random.default_rng(1).integers(0, K, N)


@pytest.fixture
def in_a() -> np.ndarray:
    return np.arange(N) % 2 == 0


def test_the_layer_that_routes_is_chosen(oracle, in_a):
    mass = scores_for(oracle, layer=1)
    choice = choose({"mass": mass, "mass_no_sink": np.random.default_rng(2).random((N, L, K))}, oracle, in_a)
    assert choice.candidate == Candidate("mass", False, (1,)) and choice.accuracy_a == 1.0


def test_ties_go_to_the_papers_score_then_uncentred_then_fewer_and_lower_layers(oracle, in_a):
    perfect = scores_for(oracle, layer=0, noise=0.0)
    perfect[:, 1] = perfect[:, 0]  # layers 0, 1, the run 0-1 and (with layer 2 equal too) all layers also route
    perfect[:, 2] = perfect[:, 0]
    choice = choose({"mass": perfect, "mass_no_sink": perfect.copy()}, oracle, in_a)
    assert choice.candidate == Candidate("mass", False, (0,))
    assert choice.centre is None


def test_centring_wins_when_one_prompt_draws_attention_on_every_input(oracle, in_a):
    biased = scores_for(oracle, layer=2, noise=0.5)
    biased[:, :, 0] += 3.0  # prompt 0 wins every uncentred argmax
    choice = choose({"mass": biased, "mass_no_sink": biased - 1.0}, oracle, in_a)
    assert choice.candidate == Candidate("mass", True, (2,))
    np.testing.assert_allclose(choice.centre, biased[in_a][:, 2].mean(0))
    rule = choice.rule("test")
    assert rule.layers == (2,) and len(rule.centre) == K and rule.source == "test"


def records_for(oracle: np.ndarray, mass: np.ndarray) -> list[dict]:
    losses = np.ones((len(oracle), K))
    losses[np.arange(len(oracle)), oracle] = 0.5
    return [
        {"key": f"t/{i}", "source": "general" if i % 3 else "units", "losses": losses[i].tolist(),
         "mass": mass[i].tolist(), "mass_no_sink": mass[i].tolist()}
        for i in range(len(oracle))
    ]  # fmt: skip


def test_the_report_gives_dev_b_accuracy_the_majority_baseline_and_losses():
    oracle = np.random.default_rng(3).choice(K, N, p=[0.6, 0.3, 0.1])
    records = records_for(oracle, scores_for(oracle, layer=1))
    report = study(records, ["a", "b", "c"])
    in_b = np.array([half_of(r["key"]) == "B" for r in records])
    assert report["inputs"]["dev_b"] == in_b.sum() and report["inputs"]["dev_a"] == N - in_b.sum()
    assert report["chosen"]["rule"] == "mass@1"
    assert report["chosen"]["dev_b"]["routing_accuracy"] == 1.0
    assert report["chosen"]["dev_b"]["mean_kd_loss"] == report["oracle_dev_b_mean_kd_loss"] == 0.5
    assert report["majority_baseline"]["prompt"] == "a"
    assert report["best_fixed_prompt"]["prompt"] == "a", (
        "oracle prompt has loss 0.5, others 1.0: 'a' is best on average"
    )
    assert report["best_fixed_prompt"]["chosen_minus_fixed_kd_loss_dev_b"]["mean"] == pytest.approx(
        -0.5 * (oracle[in_b] != 0).mean()
    )
    assert report["majority_baseline"]["dev_b"]["routing_accuracy"] == pytest.approx((oracle[in_b] == 0).mean())
    assert report["oracle_histogram"]["dev_b"] == {n: int((oracle[in_b] == k).sum()) for k, n in enumerate("abc")}
    assert sum(report["oracle_histogram_per_source"]["units"].values()) == report["inputs"]["per_source"]["units"]


def test_oracle_losses_equal_one_forward_per_prompt():
    teacher, student = micro_llama(64, seed=0, initializer_range=0.2), micro_llama(64, seed=1, initializer_range=0.2)
    prompts = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(0))
    ids = [5, 9, 2, 33, 7, 1, 60]
    got = kd_losses(student, teacher, prompts, ids)
    with torch.no_grad():
        target = teacher(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        for k, prompt in enumerate(prompts):
            embeds = torch.cat([prompt, student.get_input_embeddings()(torch.tensor(ids))])
            logprobs = student(inputs_embeds=embeds[None]).logits[0, 4:-1].log_softmax(-1)
            want = torch.nn.functional.kl_div(logprobs, target, log_target=True, reduction="none").sum(-1).mean()
            assert got[k] == pytest.approx(want.item(), rel=1e-4)


def test_the_measurement_cache_resumes_and_starts_over_for_other_inputs(tmp_path: Path):
    path = tmp_path / "cache.jsonl"
    cache = MeasurementCache(path, {"bank_sha256": "x"})
    cache.add({"key": "a", "losses": [1.0]})
    with path.open("a") as f:
        f.write('{"key": "b", "los')  # cut short by an interrupted run
    assert set(MeasurementCache(path, {"bank_sha256": "x"}).records) == {"a"}
    assert MeasurementCache(path, {"bank_sha256": "y"}).records == {}
    assert json.loads(path.read_text().splitlines()[0])["bank_sha256"] == "y"


def test_writing_the_rule_keeps_the_prompts_and_loads_back(tmp_path: Path):
    fp = Fingerprint(config_sha256="c", embedding_sha256="e", hidden_size=8, vocab_size=64, weights="w")
    bank = make_bank("b", torch.randn(3, 2, 8), ["x", "y", "z"], fp, trained={"sources": ["units"]})
    folder = save_bank(bank, tmp_path / "b")
    tensor = (folder / "prompts.safetensors").read_bytes()
    rule = SelectionRule(score="mass_no_sink", layers=(1,), centre=(0.1, 0.0, -0.1), source="routing study")
    report = {
        "chosen": {"dev_b": {"routing_accuracy": 0.5}},
        "majority_baseline": {"dev_b": {"routing_accuracy": 0.4}},
    }
    write_rule(folder, load_bank(folder), rule, report)
    loaded = load_bank(folder)
    assert loaded.selection_rule == rule
    assert (folder / "prompts.safetensors").read_bytes() == tensor
    assert loaded.manifest.measured["routing_dev_b_accuracy"] == 0.5
    assert loaded.manifest.trained == {"sources": ["units"]}
