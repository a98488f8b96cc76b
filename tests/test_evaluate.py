"""`idp-serve evaluate` and `idp-serve attention` end to end on tiny random models, plus the checks that make the
numbers trustworthy: bootstrap CIs behave, no test example is in any training data, and the in-process numbers
equal a live server's (slow).

The "compressed" model is the tiny random Llama with its layer weights perturbed (embeddings untouched, so it
shares the base's fingerprint like a real compressed variant); the banks are rows of its embedding table.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.cli import main
from server.core.banks import PromptBank, make_bank, save_bank
from server.core.config import Settings
from server.core.identity import embedding_weight, fingerprint
from server.lab.analysis import attention_deviation, distances, without_first_token
from server.lab.corpus import SOURCES, source_texts
from server.lab.evaluate.compare import Comparison, evaluate_all
from server.lab.evaluate.examples import eval_examples
from server.lab.evaluate.leaks import clean_split, leaked_examples, training_text
from server.lab.evaluate.lora import lora_method
from server.lab.evaluate.methods import Method, load_methods
from server.lab.evaluate.records import run_methods
from server.lab.evaluate.scoring import choice_logprobs, normalize
from server.lab.evaluate.statistics import bootstrap_ci
from server.lab.report import write_report
from server.lab.tasks import TASKS, task_split
from server.lab.train import TrainSpec, source_blocks

TASK_SAMPLE = ["unit_identification", "odd_one_out", "human_organs_senses:gen"]
SPEC = TrainSpec(steps=2, batch_size=2, seq_len=32)


@pytest.fixture(scope="module")
def tiny_compressed(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with noise on every non-embedding weight: a stand-in for a compressed variant."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "embed_tokens" not in name:
                weight.add_(0.02 * torch.randn(weight.shape, generator=generator))
    folder = tmp_path_factory.mktemp("tiny-compressed") / "tiny-compressed"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(folder)
    return folder


def _bank(model: Path, name: str, k: int, m: int, seed: int, layers: list[int] | None = None) -> PromptBank:
    """K random prompts from the embedding table, with the training record `evaluate` reads (spec, sources,
    calibrated selection layers)."""
    table = embedding_weight(model)
    rows = torch.randint(0, table.shape[0], (k, m), generator=torch.Generator().manual_seed(seed))
    trained = {"mode": "curated", "sources": ["howto", "units"], "spec": SPEC.model_dump(), "selection_layers": layers}
    return make_bank(name, table[rows], [f"p{i}" for i in range(k)], fingerprint(model), trained)


@pytest.fixture(scope="module")
def tiny_banks(tiny_compressed: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("banks")
    bank = save_bank(_bank(tiny_compressed, "default", k=3, m=4, seed=1, layers=[1]), root / "default")
    single = save_bank(_bank(tiny_compressed, "single", k=1, m=4, seed=2), root / "single")
    return bank, single


def test_evaluate_end_to_end(
    tiny_llama: Path, tiny_compressed: Path, tiny_banks: tuple[Path, Path], settings: Settings, tmp_path: Path
) -> None:
    """Every method on the same examples, a report with its table, plot and raw records; IDP agrees with forcing
    the prompt it chose; the LoRA adapter is cached, so a rerun loads it instead of training."""
    bank, single = tiny_banks
    comparison = Comparison(
        tiny_llama, tiny_compressed, bank, single, TASK_SAMPLE, 3, settings.data_dir, tmp_path / "lora", 1, 1e-3
    )
    result = evaluate_all(comparison, samples=200, ppl_blocks=1)
    methods = [
        "base",
        "compressed",
        "single",
        "idp",
        "idp:all-layers",
        "forced:p0",
        "forced:p1",
        "forced:p2",
        "lora-r1",
    ]
    assert list(result["methods"]) == methods
    assert len(result["records"]) == len(methods) * 9
    summary = result["methods"]
    assert summary["idp"]["trainable"] == 3 * 4 * 128 and summary["idp"]["extra_tokens"] == 4
    assert summary["lora-r1"]["trainable"] == 2 * (128 + 128 + 128 + 64) and summary["lora-r1"]["extra_tokens"] == 0
    assert summary["compressed"]["delta"] == 0 and all(np.isfinite(m["ppl"]) for m in summary.values())
    idp = next(m for m in load_methods(tiny_llama, tiny_compressed, bank, single)[1] if m.name == "idp")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    decoded = run_methods([idp], tokenizer, eval_examples(TASK_SAMPLE, 3))
    derived = [r for r in result["records"] if r["method"] == "idp"]
    keys = ("task", "example", "prompt", "correct", "scores", "output")
    assert [[r.get(k) for k in keys] for r in derived] == [[r.get(k) for k in keys] for r in decoded]
    report = write_report(result, tmp_path / "report", "idp-serve evaluate (test)")
    assert {p.name for p in report.parent.iterdir()} == {"report.md", "results.json", "accuracy.png"}
    assert "| idp |" in report.read_text() and "human_organs_senses:gen" in report.read_text()
    adapter = Path(result["lora"]["adapter"])
    trained_at = (adapter / "record.json").stat().st_mtime_ns
    base, _, _, single_bank = load_methods(tiny_llama, tiny_compressed, bank, single)
    cached, record = lora_method(tiny_compressed, base, single_bank, settings.data_dir, tmp_path / "lora", 1, 1e-3)
    assert record == result["lora"] and (adapter / "record.json").stat().st_mtime_ns == trained_at
    example = eval_examples(["odd_one_out"], 1)[0][2]
    scores = choice_logprobs(cached.model, tokenizer, example)
    first = next(r for r in result["records"] if r["method"] == "lora-r1" and r["task"] == "odd_one_out")
    assert scores == pytest.approx(first["scores"], abs=1e-5), "the cached adapter is the trained one"


def test_bootstrap_ci() -> None:
    assert bootstrap_ci([[1, 1, 1]]) == (1.0, 1.0)
    values = np.random.default_rng(0).integers(0, 2, 400)
    low, high = bootstrap_ci([values])
    assert low < values.mean() < high and high - low == pytest.approx(2 * 1.96 * 0.025, abs=0.015)
    assert bootstrap_ci([values]) == (low, high), "seeded: the same data give the same interval"
    stratified = bootstrap_ci([[1] * 10, [0] * 1000])
    assert stratified == (0.5, 0.5), "the average over tasks weighs every task equally, whatever its size"


def test_normalize_for_exact_match() -> None:
    assert normalize(" 4300.0 cK.\nmore") == normalize("4300.0 cK") == "4300.0 ck"


def test_no_test_example_in_training_data(base_model: Path, settings: Settings) -> None:
    """Every training source (the texts and the token blocks prompts and LoRA train on) is free of test items,
    once the few questions BIG-bench's unit tasks share across tasks are removed (protocol amendment 2)."""
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    text = training_text(list(SOURCES), settings.data_dir)
    examples = [(t, i, e) for t in TASKS for i, e in enumerate(clean_split(t, "test", None, text)[0])]
    assert len(examples) > 0.99 * len(eval_examples(list(TASKS), None)), "only a handful are shared"
    assert leaked_examples(list(SOURCES), examples, settings.data_dir) == []
    blocks = source_blocks(tokenizer, tuple(SOURCES), settings.data_dir, 64, heldout=False)
    documents = [d.strip() for b in blocks.values() for d in tokenizer.decode(b.flatten()).split(tokenizer.eos_token)]
    contexts = tuple(e.context.strip() for _, _, e in examples)
    assert not [d for d in documents if d.startswith(contexts)]
    planted = [("odd_one_out", 0, task_split("odd_one_out", "train")[0])]
    assert leaked_examples(["knowledge"], planted, settings.data_dir) == ["odd_one_out#0"], "the check can fail"
    assert source_texts("knowledge", settings.data_dir)


def test_attention_one_row_per_layer(
    tiny_llama: Path, tiny_compressed: Path, tiny_banks: tuple[Path, Path], settings: Settings
) -> None:
    """One row per layer; the base model against itself deviates by exactly 0; distances lie in [0, 1]."""
    base, methods, _, _ = load_methods(tiny_llama, tiny_compressed, *tiny_banks)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    inputs = [tokenizer(e.context)["input_ids"] for _, _, e in eval_examples(["odd_one_out"], 2)]
    rows = attention_deviation(base, [Method("self", base), *methods[:3]], inputs)
    assert [r["layer"] for r in rows] == [0, 1]
    assert all(r["self/tv"] == pytest.approx(0, abs=1e-6) and r["self/js"] == pytest.approx(0, abs=1e-3) for r in rows)
    assert all(r["self/tv_nosink"] == pytest.approx(0, abs=1e-6) for r in rows)
    assert all(0 < r["compressed/tv"] <= 1 and 0 < r["idp/on_prompt"] < 1 for r in rows)
    assert "compressed/on_prompt" not in rows[0]


def test_attention_sink_moved_onto_the_prompt_is_not_deviation_without_the_first_token() -> None:
    """The base row parks 0.6 on token 0; behind a prompt that mass went to the prompt, so after dropping the
    prompt columns the row is renormalised differently. Among the other tokens both attend alike: *_nosink is 0."""
    base = torch.tensor([[1.0, 0, 0], [0.6, 0.4, 0], [0.6, 0.2, 0.2]])[None, None]
    prompted = torch.tensor([[1.0, 0, 0], [0.2, 0.8, 0], [0.2, 0.4, 0.4]])[None, None]
    tv, _ = distances(prompted, base)
    tv_nosink, js_nosink = distances(without_first_token(prompted), without_first_token(base))
    assert tv.item() > 0.2
    assert tv_nosink.item() == pytest.approx(0, abs=1e-6) and js_nosink.item() == pytest.approx(0, abs=1e-3)


def test_attention_command(
    tiny_llama: Path, tiny_compressed: Path, tiny_banks: tuple[Path, Path], tmp_path: Path, settings: Settings
) -> None:
    out = tmp_path / "attention"
    main(
        [
            "attention",
            "--base",
            str(tiny_llama),
            "--model",
            str(tiny_compressed),
            "--bank",
            str(tiny_banks[0]),
            "--single",
            str(tiny_banks[1]),
            "--tasks",
            "odd_one_out",
            "--limit",
            "2",
            "--lora-rank",
            "0",
            "--home",
            str(tmp_path / "home"),
            "--data-dir",
            str(settings.data_dir),
            "--out",
            str(out),
        ]
    )
    table = [line for line in (out / "attention.md").read_text().splitlines() if line[:3] in ("| 0", "| 1")]
    assert len(table) == 2 and (out / "attention.png").is_file()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU that torch sees")
def test_scores_on_the_gpu_equal_the_cpus(
    tiny_llama: Path, tiny_compressed: Path, tiny_banks: tuple[Path, Path]
) -> None:
    """`--device cuda`: every method scores each choice as on the CPU (float32 kernels), choosing the same prompts."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    examples = eval_examples(["odd_one_out", "human_organs_senses:gen"], 2)
    on_cpu = run_methods(load_methods(tiny_llama, tiny_compressed, *tiny_banks)[1], tokenizer, examples)
    on_gpu = run_methods(load_methods(tiny_llama, tiny_compressed, *tiny_banks, "cuda")[1], tokenizer, examples)
    for cpu, gpu in zip(on_cpu, on_gpu, strict=True):
        assert (gpu["prompt"], gpu.get("output")) == (cpu["prompt"], cpu.get("output"))
        assert gpu.get("scores", []) == pytest.approx(cpu.get("scores", []), abs=1e-3)


@pytest.mark.slow
def test_in_process_matches_live_server(
    tiny_compressed: Path, tiny_banks: tuple[Path, Path], settings: Settings, tmp_path: Path
) -> None:
    """The fast path's scores, choices and chosen prompts equal the served ones (echo logprobs, forced prompts)."""
    from server.core.banks import load_bank
    from server.lab.evaluate.server_check import check_server
    from tests.helpers import start_server

    bank, single = (load_bank(p) for p in tiny_banks)
    _, methods, _, _ = load_methods(tiny_compressed, tiny_compressed, *tiny_banks)
    examples = eval_examples(["unit_identification", "odd_one_out"], 2)
    records = run_methods(methods, AutoTokenizer.from_pretrained(tiny_compressed), examples)
    with start_server(tiny_compressed, tmp_path, [bank, single]) as live:
        check = check_server(
            live.url,
            tiny_compressed.name,
            AutoTokenizer.from_pretrained(tiny_compressed),
            records,
            examples,
            bank,
            single,
        )
    served = [m for m in methods if m.name != "idp:all-layers"]
    assert check["records"] == len(served) * 4 == check["same_prediction"] == check["same_prompt"]
    assert check["max_abs_score_diff"] < 1e-2
