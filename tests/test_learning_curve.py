"""The learning curve: one point per kept checkpoint plus no prompt, saved as measured, resumed, plotted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from server.lab import learning_curve
from server.lab.loading import freeze, load_model
from server.lab.recipe import LiveTeacher, RecipeSpec, RunFolder, dev_kl, sampled_init, train_prompt


def test_points_per_checkpoint_resume_and_plot(tiny_llama: Path, tmp_path: Path):
    teacher = freeze(load_model(tiny_llama))
    student = freeze(load_model(tiny_llama))
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.3 * p.std() * torch.randn_like(p, generator=None))
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    blocks = torch.randint(0, len(tokenizer), (12, 16), generator=torch.Generator().manual_seed(0))
    general, dev = LiveTeacher(teacher, blocks[:8], k=16), LiveTeacher(teacher, blocks[8:], k=16)
    spec = RecipeSpec(
        num_virtual_tokens=4,
        warmup_steps=1,
        batch_size=2,
        tokens=6 * 2 * 16,
        checkpoints=(32, 192),
        eval_every=3,
        dev_blocks=4,
    )
    run = RunFolder(tmp_path)
    train_prompt(student, sampled_init(student, general.blocks, 4, 0), general, spec, run, dev=dev, progress=False)

    points = learning_curve.measure(tmp_path, student, tokenizer, dev, 4, ["strategyqa"], float("inf"), dev_limit=4)
    assert [p["tokens"] for p in points] == [0, 32, 192]
    empty = torch.zeros(0, student.config.hidden_size)
    assert points[0]["dev_kl"] == pytest.approx(dev_kl(student, empty, dev, 4, 4))
    assert points[0]["dev_kl_tokens"] == 4 * 15 and 0 <= points[1]["dev_acc"]["strategyqa"] <= 1
    written = (tmp_path / "curve.json").stat().st_mtime_ns
    assert (
        learning_curve.measure(tmp_path, student, tokenizer, dev, 4, ["strategyqa"], float("inf"), dev_limit=4)
        == points
    )
    assert (tmp_path / "curve.json").stat().st_mtime_ns == written, "measured points are not measured again"
    assert json.loads((tmp_path / "curve.json").read_text()) == points
    learning_curve.plot(points, tmp_path / "curve.png", {"strategyqa": {"base": 0.6}})
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_the_base_line_is_measured_on_the_same_dev_examples(tmp_path: Path):
    state = {"picks": [0, 1, 1, 0, 0], "answers": [0, 1, 0, 0, 1]}
    (tmp_path / "si_conversion.json").write_text(json.dumps(state))

    reference = learning_curve.base_reference(tmp_path, ["si_conversion", "unscreened"], limit=3)

    assert reference == {"si_conversion": {"base": 2 / 3}}
