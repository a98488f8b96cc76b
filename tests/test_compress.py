"""Compression: every method runs on a real library, its output loads in transformers and vLLM, and it hurts
the model the way compression should (which is what the prompt banks then repair)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from server.cli import main
from server.core.config import Settings
from server.core.identity import DEFAULT_WEIGHTS_SHA256, ModelError, fingerprint, read_card, servable, weights_digest
from server.lab.compress import CompressionSpec, compress
from server.lab.loading import load_model
from tests.vllm_generate import generate

TINY_CALIBRATION = {"calibration_samples": 4, "calibration_len": 64}
SPECS = [
    CompressionSpec(method="gptq", bits=4, group_size=64, **TINY_CALIBRATION),
    CompressionSpec(method="gptq", bits=3, group_size=64, **TINY_CALIBRATION),
    CompressionSpec(method="sparsegpt", sparsity=0.5, **TINY_CALIBRATION),
    CompressionSpec(method="sparsegpt", structure="2:4", **TINY_CALIBRATION),
    CompressionSpec(method="wanda", sparsity=0.5, **TINY_CALIBRATION),
    CompressionSpec(method="wanda", structure="2:4", **TINY_CALIBRATION),
]


@pytest.fixture(scope="module")
def tiny_variants(tiny_llama: Path, settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("variants")
    return {spec.slug: compress(tiny_llama, spec, out, settings.data_dir, "test") for spec in SPECS}


def _linear_weights(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(next(folder.glob("*.safetensors")), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if ".layers." in k and k.endswith("proj.weight")}


def test_every_method_loads_in_transformers_and_generates(tiny_variants: dict[str, Path], tiny_llama: Path) -> None:
    ids = AutoTokenizer.from_pretrained(tiny_llama)("The capital of France is", return_tensors="pt").input_ids
    for slug, folder in tiny_variants.items():
        model = load_model(folder)
        out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert out.shape == (1, ids.shape[1] + 4), slug


@pytest.mark.slow
def test_every_method_loads_in_vllm_and_generates(tiny_variants: dict[str, Path]) -> None:
    """Each variant is served as this CPU allows: the 4-bit checkpoint itself with AVX-512 (vLLM's cpu_gemm_wna16),
    its dense twin without; the others (3-bit: no CPU kernel; pruned: dense) always run dense."""
    avx512 = torch.cpu._is_avx512_supported()
    served = {slug: servable(folder, gpu=False) for slug, folder in tiny_variants.items()}
    four_bit = tiny_variants["gptq-w4g64"]
    assert served["gptq-w4g64"] == (four_bit if avx512 else four_bit.parent / read_card(four_bit).twin)
    models = [(folder, read_card(folder).serve_dtype) for folder in served.values()]
    texts = generate("The capital of France is", 6, models)
    assert set(texts) == {str(folder) for folder, _ in models}
    assert all(len(text) > 0 for text in texts.values())


_WITHOUT_AVX512 = """
import sys, torch
# an AVX2-only CPU as vLLM's CPU platform sees it (it loads _C_AVX2 when AVX-512 is missing; AMX and AVX-512
# BF16/VNNI, which pick other kernels, go with it)
for probe in ("avx512", "avx512_bf16", "amx_tile", "amx_fp16", "avx512_vnni", "vnni"):
    setattr(torch.cpu, f"_is_{probe}_supported", lambda: False)
from vllm import LLM, SamplingParams
try:
    llm = LLM(sys.argv[1], dtype=sys.argv[2], enforce_eager=True, distributed_executor_backend="uni", max_model_len=256)
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=4, temperature=0))
    print(flush=True)
    print("SERVED", out[0].outputs[0].text)
except Exception as exc:
    print(flush=True)
    print("FAILED", repr(exc)[:500])
"""


@pytest.mark.slow
def test_vllm_without_avx512_lacks_the_4bit_kernel_and_serves_the_twin(tiny_variants: dict[str, Path]) -> None:
    """vLLM's AVX2 branch, taken here by telling it the CPU has no AVX-512 (ATEN_CPU_CAPABILITY cannot: vLLM asks
    the hardware through torch.cpu): the 4-bit checkpoint fails for want of cpu_gemm_wna16, the folder `servable`
    picks runs."""
    four_bit = tiny_variants["gptq-w4g64"]
    fallback = servable(four_bit, gpu=False, avx512=False)
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    outcome = {}
    for folder in (four_bit, fallback):
        proc = subprocess.run(
            [sys.executable, "-c", _WITHOUT_AVX512, str(folder), read_card(folder).serve_dtype],
            capture_output=True,
            text=True,
            env=os.environ | env,
            check=False,
        )
        outcome[folder] = next(
            (line for line in proc.stdout.splitlines() if line.startswith(("SERVED", "FAILED"))), proc.stderr[-2000:]
        )
    assert outcome[four_bit].startswith("FAILED") and "cpu_gemm_wna16" in outcome[four_bit], outcome[four_bit]
    assert outcome[fallback].startswith("SERVED"), outcome[fallback]


def test_quantized_checkpoint_is_kept_for_gpu_with_a_dense_twin_for_cpu(tiny_variants: dict[str, Path]) -> None:
    twin = tiny_variants["gptq-w3g64"]
    card = read_card(twin)
    assert card.role == "dequantized" and card.serves_on == ["cpu", "gpu"]
    real = read_card(twin.parent / card.twin)
    assert real.format == "compressed-tensors" and real.serves_on == ["gpu"]
    config = json.loads((twin.parent / card.twin / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 3
    # the twin holds exactly the quantized values: at most 2**3 levels per group of 64 weights
    w = _linear_weights(twin)["model.layers.0.mlp.down_proj.weight"]
    assert max(g.unique().numel() for g in w.view(-1, 64)[:64]) <= 8


def test_twins_share_one_weights_digest_so_a_bank_serves_both(tiny_variants: dict[str, Path]) -> None:
    """The checkpoint records its twin's digest (same numbers), recomputed here from the twin's tensors."""
    for slug in ("gptq-w3g64", "gptq-w4g64"):
        folder = tiny_variants[slug]
        other = folder.parent / read_card(folder).twin
        real, dense = (other, folder) if read_card(folder).role == "dequantized" else (folder, other)
        assert fingerprint(real).weights_sha256 == fingerprint(dense).weights_sha256 == weights_digest(dense), slug


def test_4bit_checkpoint_claims_only_avx512_cpus_and_has_a_dense_twin(tiny_variants: dict[str, Path]) -> None:
    folder = tiny_variants["gptq-w4g64"]
    card = read_card(folder)
    assert card.format == "compressed-tensors" and card.serves_on == ["cpu-avx512", "gpu"] and card.twin
    twin = folder.parent / card.twin
    assert servable(folder, gpu=False, avx512=True) == folder
    assert servable(folder, gpu=True, avx512=False) == folder
    assert servable(folder, gpu=False, avx512=False) == twin


def test_a_checkpoint_without_its_cpu_kernel_or_twin_is_refused_naming_the_kernel(
    tiny_variants: dict[str, Path], tmp_path: Path
) -> None:
    alone = shutil.copytree(tiny_variants["gptq-w4g64"], tmp_path / "w4-alone")
    with pytest.raises(ModelError, match=r"w4-alone.*cpu_gemm_wna16 \(needs AVX-512\).*GPU") as info:
        servable(alone, gpu=False, avx512=False)
    assert read_card(alone).twin in str(info.value)


@pytest.mark.parametrize("slug", ["sparsegpt-50pct", "wanda-50pct"])
def test_unstructured_pruning_leaves_the_asked_sparsity(tiny_variants: dict[str, Path], slug: str) -> None:
    for name, w in _linear_weights(tiny_variants[slug]).items():
        assert (w == 0).float().mean().item() >= 0.5 - 1e-3, name


@pytest.mark.parametrize("slug", ["sparsegpt-2of4", "wanda-2of4"])
def test_2of4_pruning_keeps_two_of_every_four(tiny_variants: dict[str, Path], slug: str) -> None:
    for name, w in _linear_weights(tiny_variants[slug]).items():
        nonzero_per_group = (w.reshape(-1, 4) != 0).sum(dim=1)
        assert int(nonzero_per_group.max()) <= 2, name


def _continuation_perplexity(model_dir: Path, prompt: str, continuation: str) -> float:
    """Perplexity of `continuation` after `prompt` under the model in `model_dir`."""
    model, tokenizer = load_model(model_dir), AutoTokenizer.from_pretrained(model_dir)
    context = tokenizer(prompt)["input_ids"]
    tail = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = model(torch.tensor([context + tail])).logits[0, len(context) - 1 : -1].log_softmax(-1)
    return math.exp(-logprobs[torch.arange(len(tail)), torch.tensor(tail)].mean().item())


@pytest.mark.slow
def test_default_variant_loses_perplexity_and_still_speaks(base_model: Path, served_model: Path) -> None:
    """The default variant is clearly damaged (held-out perplexity) yet still writes language in vLLM.

    These are THE default weights (the digest the repo records, so every machine tests the same model).
    "Language" is judged by the uncompressed model: its perplexity of the compressed model's greedy continuation
    must stay far below that of random tokens (about 2.8 million for 16 random tokens; docs/default-model.md has
    what this model writes and its value). The 3-bit model no longer knows that Paris is France's capital, so a
    fact check would be wrong here.
    """
    base, served = read_card(base_model), read_card(served_model)
    assert fingerprint(served_model).weights_sha256 == DEFAULT_WEIGHTS_SHA256
    assert served.measured["heldout_ppl"] > 1.2 * base.measured["heldout_ppl"]
    prompt = "Once upon a time, there was a"
    text = generate(prompt, 16, [(served_model, served.serve_dtype)])[str(served_model)]
    assert len(re.findall(r"[A-Za-z]{2,}", text)) >= 4, text
    assert _continuation_perplexity(base_model, prompt, text) < 1000, text


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["compress", "--method", "awq"], "awq"),
        (["compress", "--method", "gptq", "--bits", "9"], "bits"),
        (["compress", "--method", "gptq", "--bits", "4", "--model", "/no/such/model"], "/no/such/model"),
        (["compress", "--method", "gptq", "--bits", "4", "--group-size", "100"], "group_size 100"),
        (["compress", "--method", "wanda", "--bits", "4"], "bits"),
    ],
)
def test_bad_compress_arguments_fail_clearly(argv: list[str], named: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    message = str(exit_info.value.code) + capsys.readouterr().err
    assert exit_info.value.code != 0 and named in message
