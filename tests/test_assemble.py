"""A bank is assembled from finished recipe runs only: each prompt is its run's best dev prompt, the manifest says
where it came from, and unfinished runs or runs trained against other weights are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from server.core.banks import load_bank
from server.core.identity import fingerprint, verified_weights_digest
from server.lab.assemble import AssemblyError, assemble
from server.lab.loading import freeze, load_model
from server.lab.recipe import LiveTeacher, RecipeSpec, RunFolder, train_prompt


def make_run(runs: Path, name: str, student_dir: Path, steps: int, digest: str | None = None) -> Path:
    """A recipe run of the tiny model on random blocks, its own teacher, trained for `steps` of 4 steps."""
    student = freeze(load_model(student_dir))
    vocab = student.config.vocab_size
    blocks = torch.randint(0, vocab, (12, 8), generator=torch.Generator().manual_seed(len(name)))
    general, dev = LiveTeacher(student, blocks[:8], k=8), LiveTeacher(student, blocks[8:], k=8)
    spec = RecipeSpec(num_virtual_tokens=2, warmup_steps=1, tokens=4 * 4 * 8, eval_every=2, dev_blocks=4)
    run = RunFolder(runs / name)
    run.start(spec, {"student_weights_sha256": digest or verified_weights_digest(student_dir), "sources": ["units"]})
    init = student.get_input_embeddings().weight[:2].detach().clone()
    train_prompt(student, init, general, spec, run, dev=dev, max_steps=steps, progress=False)
    return runs / name


def test_a_bank_holds_each_runs_best_prompt_and_says_where_it_came_from(tiny_llama: Path, tmp_path: Path):
    first, second = make_run(tmp_path, "a", tiny_llama, 4), make_run(tmp_path, "bb", tiny_llama, 4)

    bank = assemble("demo", {"general": "a", "units": "bb"}, tiny_llama, runs_dir=tmp_path)

    assert bank.prompt_names == ["general", "units"]
    assert torch.equal(bank.embeddings[1], load_file(second / "state.safetensors")["best"])
    assert torch.equal(bank.embeddings[0], load_file(first / "state.safetensors")["best"])
    record = bank.manifest.trained["prompts"]["units"]
    assert record["run"] == "bb" and record["done"] == "budget" and record["steps"] == 4
    assert record["best_dev_kl"] == json.loads((second / "state.json").read_text())["best_dev"]
    assert bank.manifest.trained["sources"] == ["units"]
    assert bank.manifest.model == fingerprint(tiny_llama)


def test_a_bank_round_trips_through_its_folder(tiny_llama: Path, tmp_path: Path):
    from server.core.banks import save_bank

    make_run(tmp_path, "a", tiny_llama, 4)
    bank = assemble("demo", {"general": "a"}, tiny_llama, runs_dir=tmp_path)

    loaded = load_bank(save_bank(bank, tmp_path / "banks" / "demo"), expect=fingerprint(tiny_llama))

    assert torch.equal(loaded.embeddings, bank.embeddings)


def test_an_unfinished_run_is_refused(tiny_llama: Path, tmp_path: Path):
    make_run(tmp_path, "half", tiny_llama, 2)

    with pytest.raises(AssemblyError, match="has not finished"):
        assemble("demo", {"general": "half"}, tiny_llama, runs_dir=tmp_path)


def test_a_run_for_other_weights_is_refused(tiny_llama: Path, tmp_path: Path):
    make_run(tmp_path, "other", tiny_llama, 4, digest="0" * 64)

    with pytest.raises(AssemblyError, match="trained against weights 0000"):
        assemble("demo", {"general": "other"}, tiny_llama, runs_dir=tmp_path)


def test_a_missing_run_is_refused(tiny_llama: Path, tmp_path: Path):
    with pytest.raises(AssemblyError, match="no spec.json"):
        assemble("demo", {"general": "nowhere"}, tiny_llama, runs_dir=tmp_path)
