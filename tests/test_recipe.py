"""The recipe on tiny models: the KD loss falls, a run stopped and resumed is the uninterrupted run bit for bit
(also one that ran ahead of its teacher cache and waited), the data of a step is a function of the step, and a
run folder refuses another run's spec."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from server.lab.loading import freeze
from server.lab.recipe import LiveTeacher, RecipeSpec, RunFolder, dev_kl, sampled_init, stream_index, train_prompt
from server.lab.teacher_cache import CacheError, TeacherTargets
from tests.helpers import micro_llama

VOCAB = 64


def tiny(seed: int, noise: float = 0.0) -> LlamaForCausalLM:
    """A random tiny Llama with peaked next-token distributions; `noise` perturbs every weight (a stand-in for
    compression)."""
    model = micro_llama(VOCAB, seed, initializer_range=0.3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * p.std() * torch.randn_like(p))
    return freeze(model)


@pytest.fixture(scope="module")
def setup():
    teacher, student = tiny(0), tiny(0, noise=0.5)
    blocks = torch.randint(0, VOCAB, (24, 16), generator=torch.Generator().manual_seed(1))
    return teacher, student, LiveTeacher(teacher, blocks[:20], k=16), LiveTeacher(teacher, blocks[20:], k=16)


def spec(**update) -> RecipeSpec:
    base = {
        "num_virtual_tokens": 4,
        "lr": 2e-2,
        "warmup_steps": 2,
        "batch_size": 4,
        "tokens": 12 * 4 * 16,
        "eval_every": 4,
        "dev_blocks": 4,
        "patience": 100,
        "checkpoints": (64, 320),
        "save_every": 3,
    }
    return RecipeSpec(**base | update)


def test_the_kd_loss_falls(setup, tmp_path: Path):
    teacher, student, general, dev = setup
    init = sampled_init(student, general.blocks, 8, seed=0)
    run = RunFolder(tmp_path)
    state = train_prompt(
        student, init, general, spec(tokens=40 * 4 * 16, lr=0.1, num_virtual_tokens=8), run, dev=dev, progress=False
    )
    assert state.done == "budget" and len(run.log()) == 40
    final = load_file(tmp_path / "state.safetensors")["prompt"]
    assert dev_kl(student, final, general, 20, 4) < 0.85 * dev_kl(student, init, general, 20, 4), "training KL"
    assert dev_kl(student, run.best_prompt(), dev, 4, 4) == pytest.approx(state.best_dev, rel=1e-5)
    assert state.best_dev < 0.9 * dev_kl(student, init, dev, 4, 4), "dev KL"


def test_a_resumed_run_is_the_uninterrupted_run(setup, tmp_path: Path):
    teacher, student, general, dev = setup
    init = sampled_init(student, general.blocks, 4, seed=0)
    whole, pieces = RunFolder(tmp_path / "whole"), RunFolder(tmp_path / "pieces")
    train_prompt(student, init, general, spec(), whole, dev=dev, progress=False)
    first = train_prompt(student, init, general, spec(), pieces, dev=dev, max_steps=5, progress=False)
    assert first.step == 5 and first.done is None
    # a fresh process: new objects, the same files
    second = train_prompt(
        tiny(0, noise=0.5), torch.zeros_like(init), general, spec(), RunFolder(pieces.folder), dev=dev, progress=False
    )
    assert second.step == 12 and second.done == "budget"
    a, b = load_file(whole.folder / "state.safetensors"), load_file(pieces.folder / "state.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole.log() == pieces.log()
    for tokens in (64, 320):
        name = f"checkpoints/prompt-{tokens}.safetensors"
        assert torch.equal(load_file(whole.folder / name)["prompt"], load_file(pieces.folder / name)["prompt"])
    states = [json.loads((run.folder / "state.json").read_text()) for run in (whole, pieces)]
    assert states[0] == states[1]


@dataclass
class CacheBuiltSoFar:
    """A teacher cache whose builder, running beside training, has written the targets of the first `ready`
    blocks only."""

    live: LiveTeacher
    ready: int

    @property
    def blocks(self) -> torch.Tensor:
        return self.live.blocks

    def targets(self, index: torch.Tensor) -> TeacherTargets:
        if int(index.max()) >= self.ready:
            raise CacheError(f"block {int(index.max())} is not cached yet")
        return self.live.targets(index)


@pytest.mark.parametrize("ready", [0, 8])
def test_a_run_ahead_of_its_teacher_cache_waits_and_resumes_exactly(setup, tmp_path: Path, ready: int):
    teacher, student, general, dev = setup
    init = sampled_init(student, general.blocks, 4, seed=0)
    whole, waiting = RunFolder(tmp_path / "whole"), RunFolder(tmp_path / "waiting")
    train_prompt(student, init, general, spec(), whole, dev=dev, progress=False)
    paused = train_prompt(student, init, CacheBuiltSoFar(general, ready), spec(), waiting, dev=dev, progress=False)
    assert paused.step == ready // 4 and paused.done is None
    resumed = train_prompt(student, init, general, spec(), RunFolder(waiting.folder), dev=dev, progress=False)
    assert resumed.done == "budget"
    a, b = load_file(whole.folder / "state.safetensors"), load_file(waiting.folder / "state.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_data_of_a_step_is_a_function_of_the_step():
    first_epoch = torch.cat([stream_index(s, 4, 12, seed=0) for s in range(3)])
    assert first_epoch.tolist() == list(range(12)), "epoch one reads the blocks in their (cache) order"
    second_epoch = torch.cat([stream_index(s, 4, 12, seed=0) for s in range(3, 6)])
    assert sorted(second_epoch.tolist()) == list(range(12)) and second_epoch.tolist() != list(range(12))
    assert torch.equal(stream_index(4, 4, 12, seed=0), stream_index(4, 4, 12, seed=0))


def test_mixing_takes_domain_blocks_into_every_batch(setup, tmp_path: Path):
    teacher, student, general, dev = setup
    domain = LiveTeacher(teacher, torch.full((8, 16), 3), k=16)
    init = sampled_init(student, general.blocks, 4, seed=0)
    state = train_prompt(
        student,
        init,
        general,
        spec(domain_per_batch=2),
        RunFolder(tmp_path),
        domain=domain,
        max_steps=2,
        progress=False,
    )
    assert state.step == 2


def test_a_run_folder_refuses_another_runs_spec(tmp_path: Path):
    run = RunFolder(tmp_path)
    run.start(spec(), {"student": "a"})
    run.start(spec(), {"student": "a"})
    with pytest.raises(ValueError, match="another run"):
        run.start(spec(lr=1e-3), {"student": "a"})
    with pytest.raises(ValueError, match="another run"):
        run.start(spec(), {"student": "b"})
