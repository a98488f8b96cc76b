"""Prompt training: it repairs the compressed model on held-out text, is reproducible, and resumes exactly."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from server.cli import main
from server.core.banks import load_bank
from server.core.config import Settings
from server.core.identity import fingerprint
from server.lab.loading import freeze, load_model
from server.lab.train import (
    BankPlan,
    Checkpoint,
    Models,
    TrainSpec,
    capacity_route,
    mean_loss,
    source_blocks,
    train_prompts,
)


def _tiny_setup(tiny_llama: Path, settings: Settings) -> tuple[Models, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    blocks = source_blocks(tokenizer, ("news",), settings.data_dir, seq_len=16, heldout=False, limit=32)["news"]
    return Models(freeze(load_model(tiny_llama))), blocks


def test_training_is_seeded_and_resumes_exactly(tiny_llama: Path, settings: Settings, tmp_path: Path) -> None:
    models, blocks = _tiny_setup(tiny_llama, settings)
    init = models.student.get_input_embeddings().weight[:4].detach().clone()[None]
    spec = TrainSpec(objective="lm", num_virtual_tokens=4, steps=6, batch_size=2, seq_len=16, checkpoint_every=3)
    straight, _ = train_prompts(models, init, blocks, spec, Checkpoint(tmp_path / "a"))
    again, _ = train_prompts(models, init, blocks, spec, Checkpoint(tmp_path / "b"))
    assert torch.equal(straight, again)
    train_prompts(models, init, blocks, spec.model_copy(update={"steps": 3}), Checkpoint(tmp_path / "c"))
    resumed, _ = train_prompts(models, init, blocks, spec, Checkpoint(tmp_path / "c"))
    torch.testing.assert_close(resumed, straight, rtol=0, atol=1e-6)


def test_train_command_trains_on_the_device_asked_and_records_it(
    tiny_llama: Path, settings: Settings, tmp_path: Path
) -> None:
    """`idp-serve train --device cpu` on the tiny model: a bank bound to it, its recipe and compute recorded."""
    args = ["--model", str(tiny_llama), "--objective", "lm", "--sources", "news", "-m", "4", "--steps", "2"]
    args += ["--seq-len", "16", "--batch-size", "2", "--heldout-blocks", "2", "--device", "cpu"]
    main(["train", "--mode", "single", "--bank", "probe", "--banks-dir", str(tmp_path / "banks"), *args,
          "--home", str(tmp_path / "home"), "--data-dir", str(settings.data_dir)])  # fmt: skip
    bank = load_bank(tmp_path / "banks" / "probe", expect=fingerprint(tiny_llama))
    trained = bank.manifest.trained
    assert trained["compute"] == {"device": "cpu", "dtype": "float32"}
    assert TrainSpec(**trained["spec"]) == TrainSpec(
        objective="lm", num_virtual_tokens=4, steps=2, seq_len=16, batch_size=2
    )
    assert bank.embeddings.shape == (1, 4, 128) and bank.embeddings.dtype == torch.float32


def test_bfloat16_models_train_float32_prompts_that_follow_the_float32_run(
    tiny_llama: Path, settings: Settings, tmp_path: Path
) -> None:
    """Half-precision frozen models (`--model-dtype bfloat16`): the prompts and Adam stay float32, the loss is
    taken in float32, and training follows the float32 run closely."""
    models, blocks = _tiny_setup(tiny_llama, settings)
    half = Models(freeze(load_model(tiny_llama, "cpu", torch.bfloat16)))
    init = models.student.get_input_embeddings().weight[:4].detach().clone()[None]
    spec = TrainSpec(objective="lm", num_virtual_tokens=4, steps=4, batch_size=2, seq_len=16)
    full, full_losses = train_prompts(models, init, blocks, spec, Checkpoint(tmp_path / "fp32"))
    prompts, losses = train_prompts(half, init, blocks, spec, Checkpoint(tmp_path / "bf16"))
    assert prompts.dtype == torch.float32
    assert losses == pytest.approx(full_losses, rel=2e-2)
    torch.testing.assert_close(prompts, full, rtol=0, atol=spec.lr * spec.steps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU that torch sees")
def test_training_on_the_gpu_follows_the_cpu_run(tiny_llama: Path, settings: Settings, tmp_path: Path) -> None:
    """Same data order (CPU generator), same init: the GPU's prompts and losses match the CPU's within float32
    kernel differences."""
    models, blocks = _tiny_setup(tiny_llama, settings)
    gpu = Models(freeze(load_model(tiny_llama, "cuda")))
    init = models.student.get_input_embeddings().weight[:4].detach().clone()[None]
    spec = TrainSpec(objective="lm", num_virtual_tokens=4, steps=4, batch_size=2, seq_len=16)
    on_cpu, cpu_losses = train_prompts(models, init, blocks, spec, Checkpoint(tmp_path / "cpu"))
    on_gpu, gpu_losses = train_prompts(gpu, init.cuda(), blocks, spec, Checkpoint(tmp_path / "gpu"))
    assert gpu_losses == pytest.approx(cpu_losses, rel=1e-4)
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=1e-4)


def test_capacity_route_sends_each_example_to_its_best_prompt_until_full() -> None:
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.4, 0.6]])
    assert capacity_route(scores, capacity=2.0).tolist() == [0, 0, 0, 1]
    # with capacity 1.0 a prompt takes at most 2 of 4: the weakest preference for prompt 0 moves to prompt 1
    assert capacity_route(scores, capacity=1.0).tolist() == [0, 0, 1, 1]


@pytest.mark.slow
def test_a_trained_prompt_lowers_the_compressed_models_heldout_perplexity(
    served_model: Path, settings: Settings, tmp_path: Path
) -> None:
    """A real, small run on the real compressed model: 12 LM steps of one 8-token prompt on news text."""
    main(
        [
            "train",
            "--mode",
            "single",
            "--model",
            str(served_model),
            "--objective",
            "lm",
            "--bank",
            "probe",
            "--banks-dir",
            str(tmp_path / "banks"),
            "--sources",
            "news",
            "-m",
            "8",
            "--steps",
            "12",
            "--lr",
            "1e-2",
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--home",
            str(tmp_path / "home"),
            "--data-dir",
            str(settings.data_dir),
        ]
    )
    bank = load_bank(tmp_path / "banks" / "probe", expect=fingerprint(served_model))
    losses = bank.manifest.trained["losses"]["general"]
    assert losses["last"] < losses["first"]
    models = Models(freeze(load_model(served_model)))
    tokenizer = AutoTokenizer.from_pretrained(served_model)
    heldout = source_blocks(tokenizer, ("news",), settings.data_dir, seq_len=64, heldout=True, limit=8)["news"]
    without = math.exp(mean_loss(models, None, heldout, "lm"))
    with_prompt = math.exp(mean_loss(models, bank.embeddings[0], heldout, "lm"))
    assert with_prompt < without
    assert bank.manifest.measured["ppl/news/general"] < bank.manifest.measured["ppl/news/none"]


def test_unknown_source_is_refused_by_name(tiny_llama: Path, settings: Settings) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    with pytest.raises(ValueError, match="poetry"):
        source_blocks(tokenizer, ("poetry",), settings.data_dir, seq_len=16, heldout=False)


def test_bank_plan_defaults_to_the_four_domains() -> None:
    assert BankPlan(mode="curated").sources == ("news", "howto", "units", "knowledge")
