"""The LoRA baseline on the prompts' recipe, on tiny models: the KD loss falls, a resumed run is the
uninterrupted run bit for bit, a run folder refuses state and weights it was not made for, the adapter
`load_lora` rebuilds scores what the run recorded as its best, and a run can start from another's best adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from server.core.identity import verified_weights_digest
from server.lab.evaluate.lora import recipe_lora_method
from server.lab.lora_recipe import (
    LoraSpec,
    choose_lr,
    grid_choice,
    load_lora,
    lora_model,
    lora_trainable,
    set_best_adapter,
    train_lora,
    trainable_parameters,
)
from server.lab.recipe import LiveTeacher, RunFolder, mean_kl
from tests.test_recipe import VOCAB, tiny


@pytest.fixture(scope="module")
def streams():
    teacher = tiny(0)
    blocks = torch.randint(0, VOCAB, (24, 16), generator=torch.Generator().manual_seed(1))
    return LiveTeacher(teacher, blocks[:20], k=16), LiveTeacher(teacher, blocks[20:], k=16)


def spec(**update) -> LoraSpec:
    base = {
        "rank": 4,
        "lr": 0.1,
        "warmup_steps": 2,
        "batch_size": 4,
        "tokens": 12 * 4 * 16,
        "eval_every": 4,
        "dev_blocks": 4,
        "patience": 100,
        "save_every": 3,
    }
    return LoraSpec(**base | update)


def student_with(lora: LoraSpec):
    """A fresh stand-in for the compressed model (get_peft_model wraps it in place) with a new adapter."""
    return lora_model(tiny(0, noise=0.5), lora)


def dev_loss(model, dev: LiveTeacher) -> float:
    return mean_kl(lora_trainable(model).logits, dev, 4, 4, torch.device("cpu"))


def test_only_q_and_v_adapters_train(streams):
    model = student_with(spec(rank=1))
    names = lora_trainable(model).params
    assert names and all(("q_proj" in n or "v_proj" in n) and "lora_" in n for n in names)
    # micro_llama: 2 layers, width 32, q 32->32, v 32->16 (2 kv heads of 8): r * (in + out) per module
    assert trainable_parameters(model) == 2 * ((32 + 32) + (32 + 16))


def test_the_kd_loss_falls(streams, tmp_path: Path):
    general, dev = streams
    lora = spec(tokens=40 * 4 * 16)
    model = student_with(lora)
    before = dev_loss(model, dev)
    state = train_lora(model, general, lora, RunFolder(tmp_path), dev=dev, progress=False)
    assert state.done == "budget" and len(RunFolder(tmp_path).log()) == 40
    assert state.best_dev < 0.9 * before, "dev KL"
    assert RunFolder(tmp_path).log()[-1]["loss"] < 0.9 * RunFolder(tmp_path).log()[0]["loss"], "training KL"


def test_a_resumed_run_is_the_uninterrupted_run(streams, tmp_path: Path):
    general, dev = streams
    whole, pieces = RunFolder(tmp_path / "whole"), RunFolder(tmp_path / "pieces")
    train_lora(student_with(spec()), general, spec(), whole, dev=dev, progress=False)
    first = train_lora(student_with(spec()), general, spec(), pieces, dev=dev, max_steps=5, progress=False)
    assert first.step == 5 and first.done is None
    # a fresh process: new objects whose adapter starts elsewhere; the saved state must win
    other = student_with(spec(seed=7))
    second = train_lora(other, general, spec(), RunFolder(pieces.folder), dev=dev, progress=False)
    assert second.step == 12 and second.done == "budget"
    a, b = load_file(whole.folder / "state.safetensors"), load_file(pieces.folder / "state.safetensors")
    assert len(a) == 1 + 8 * 4, "per adapter matrix (2 layers x q, v x A, B): value, best, two Adam moments"
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole.log() == pieces.log()
    states = [json.loads((run.folder / "state.json").read_text()) for run in (whole, pieces)]
    assert states[0] == states[1]


def test_a_run_folder_refuses_state_made_for_another_adapter(streams, tmp_path: Path):
    general, dev = streams
    run = RunFolder(tmp_path)
    run.start(spec(), {"student": "a", "method": "lora"})
    with pytest.raises(ValueError, match="another run"):
        run.start(spec(rank=1), {"student": "a", "method": "lora"})
    train_lora(student_with(spec()), general, spec(), run, dev=dev, max_steps=3, progress=False)
    with pytest.raises(ValueError, match="other parameters"):
        train_lora(student_with(spec(rank=1)), general, spec(rank=1), run, dev=dev, progress=False)


def test_the_loaded_adapter_is_the_best_dev_adapter(streams, tmp_path: Path):
    general, dev = streams
    compressed, other = tmp_path / "compressed", tmp_path / "other"
    tiny(0, noise=0.5).save_pretrained(compressed)
    tiny(1, noise=0.5).save_pretrained(other)
    run = RunFolder(tmp_path / "run")
    lora = spec(tokens=20 * 4 * 16)
    run.start(lora, {"student_weights_sha256": verified_weights_digest(compressed), "method": "lora"})
    state = train_lora(student_with(lora), general, lora, run, dev=dev, progress=False)

    model, trainable = load_lora(run.folder, compressed)
    assert trainable == trainable_parameters(student_with(lora))
    assert dev_loss(model, dev) == pytest.approx(state.best_dev, rel=1e-6)
    method, record = recipe_lora_method(run.folder, compressed)  # merged, as the evaluation runs it
    assert (method.name, method.trainable, record["best_dev"]) == ("lora-r4", trainable, state.best_dev)
    assert not hasattr(method.model, "peft_config")
    ids = dev.blocks[:2]
    torch.testing.assert_close(method.model(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="trained on weights"):
        load_lora(run.folder, other)


def test_a_run_starts_from_another_runs_best_adapter_of_the_same_rank_only(streams, tmp_path: Path):
    general, dev = streams
    run = RunFolder(tmp_path / "general")
    lora = spec()
    run.start(lora, {"method": "lora"})
    state = train_lora(student_with(lora), general, lora, run, dev=dev, progress=False)
    started = student_with(lora)  # as `--init-run general` starts the next run
    set_best_adapter(started, run.folder)
    assert dev_loss(started, dev) == pytest.approx(state.best_dev, rel=1e-6)
    with pytest.raises(ValueError, match=r"general/state.safetensors: its best adapter has \(4, \d+\) for .*\(2, "):
        set_best_adapter(student_with(spec(rank=2)), run.folder)


def test_the_learning_rate_is_chosen_on_dev_by_short_runs_that_start_the_full_run(streams, tmp_path: Path):
    general, dev = streams
    calls = []

    def fit(lora: LoraSpec, run: RunFolder, max_steps: int):
        calls.append(lora.lr)
        return train_lora(student_with(lora), general, lora, run, dev=dev, max_steps=max_steps, progress=False)

    chosen, grid = choose_lr([1e-2, 0.3], spec(), "r4", 8, fit, runs_dir=tmp_path)
    assert grid.keys() == {"0.01", "0.3"} and grid[f"{chosen:g}"] == min(grid.values()), "the lowest dev KL wins"
    assert choose_lr([1e-2, 0.3], spec(), "r4", 8, fit, runs_dir=tmp_path) == (chosen, grid), "resumed, not redone"
    assert len(calls) == 2
    for short in tmp_path.glob("r4-lr*"):
        (short / "state.safetensors").unlink()  # a commit keeps only a finished short run's result
    assert choose_lr([1e-2, 0.3], spec(), "r4", 8, fit, runs_dir=tmp_path) == (chosen, grid)
    assert len(calls) == 2
    full = RunFolder(tmp_path / "full")
    chosen_spec = spec(lr=chosen)
    train_lora(student_with(chosen_spec), general, chosen_spec, full, dev=dev, progress=False)
    assert RunFolder(tmp_path / f"r4-lr{chosen:g}").log() == full.log()[:8], "the chosen short run starts the full run"


def test_a_rate_chosen_at_the_grids_edge_is_flagged() -> None:
    kl = {"0.001": 0.8, "0.003": 0.7}
    assert grid_choice([1e-3, 3e-3], 3e-3, kl, 60)["at_edge"]
    assert not grid_choice([1e-4, 1e-3, 1e-2], 1e-3, kl, 60)["at_edge"]
    assert grid_choice([1e-4, 1e-3, 1e-2], 1e-4, kl, 60)["at_edge"]
