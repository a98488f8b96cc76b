"""Compression recipes over llm-compressor: GPTQ 2-8 bit weight quantization, SparseGPT and Wanda 50% pruning.

Outputs are compressed-tensors checkpoints, the format vLLM loads natively. vLLM's CPU build runs only 4-bit
weight-only kernels (`CPUWNA16`: uint4 / uint4b8), and only in its AVX-512 extensions (see
`server.core.identity.CPU_KERNELS`), so every GPTQ checkpoint also gets a dequantized dense twin with exactly the
compressed weights (same numerics) for CPU serving, tests and the transformers-side selection pass; the real
checkpoint is kept for GPU nodes (and AVX-512 CPUs at 4 bits). Each folder's model card says which is which and
records the weights digest both share, so a prompt bank trained on one is valid on the other.

The compression itself runs in a child process with a fixed numeric environment (`REPRODUCIBLE_ENV`: one
thread, the CPU kernels of torch, MKL and oneDNN pinned to one instruction set) on a fixed calibration order,
so the same recipe gives the same weights bit for bit on any x86-64 CPU, whatever the caller's thread settings;
docs/default-model.md has the measurements behind each setting.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field, model_validator

from server.core.identity import (
    DEFAULT_BASE,
    DEFAULT_BASE_WEIGHTS_SHA256,
    DEFAULT_MODEL,
    DEFAULT_WEIGHTS_SHA256,
    ModelCard,
    ModelError,
    folder_bytes,
    read_card,
    weights_digest,
    write_card,
)
from server.lab.convert import save_clean
from server.lab.corpus import lee_train, token_blocks

Method = Literal["gptq", "sparsegpt", "wanda"]
CPU_QUANT_BITS = frozenset({4})


class CompressionSpec(BaseModel):
    """One compression recipe; its `slug` names the output folder so each variant is made once."""

    method: Method
    bits: int | None = Field(None, ge=2, le=8, description="GPTQ weight bits.")
    group_size: int = Field(64, ge=1, description="GPTQ quantization group; must divide every layer's input width.")
    sparsity: float = Field(0.5, gt=0.0, lt=1.0, description="Fraction of weights pruned (unstructured).")
    structure: Literal["unstructured", "2:4"] = "unstructured"
    calibration_samples: int = Field(16, ge=1)
    calibration_len: int = Field(512, ge=16)

    @model_validator(mode="after")
    def _check_method_fields(self) -> CompressionSpec:
        if self.method == "gptq" and self.bits is None:
            raise ValueError("gptq needs bits (2-8)")
        if self.method != "gptq" and self.bits is not None:
            raise ValueError(f"bits applies to gptq only, not {self.method}")
        return self

    @property
    def slug(self) -> str:
        if self.method == "gptq":
            return f"gptq-w{self.bits}g{self.group_size}"
        shape = "2of4" if self.structure == "2:4" else f"{round(self.sparsity * 100)}pct"
        return f"{self.method}-{shape}"

    @property
    def needs_dense_twin(self) -> bool:
        """Every quantized checkpoint gets a dequantized copy: vLLM's CPU build has kernels for 4 bits on AVX-512
        CPUs only, so the copy is what an AVX2 CPU serves (and, at other widths, every CPU)."""
        return self.method == "gptq"

    @property
    def cpu_kernel_bits(self) -> bool:
        """Whether vLLM's CPU build has a kernel for this checkpoint's format (on AVX-512 CPUs)."""
        return self.method == "gptq" and self.bits in CPU_QUANT_BITS


def recipe(spec: CompressionSpec) -> object:
    """The llm-compressor modifier for a spec (imported lazily: llm-compressor is heavy)."""
    if spec.method == "gptq":
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from llmcompressor.modifiers.quantization import GPTQModifier

        weights = QuantizationArgs(
            num_bits=spec.bits, type="int", symmetric=True, strategy="group", group_size=spec.group_size
        )
        scheme = QuantizationScheme(targets=["Linear"], weights=weights)
        return GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    mask = "2:4" if spec.structure == "2:4" else "0:0"
    sparsity = 0.5 if spec.structure == "2:4" else spec.sparsity
    if spec.method == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        return SparseGPTModifier(sparsity=sparsity, mask_structure=mask, targets=["Linear"], ignore=["lm_head"])
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    return WandaPruningModifier(sparsity=sparsity, mask_structure=mask, targets=["Linear"], ignore=["lm_head"])


def check_group_size(base: Path, spec: CompressionSpec) -> None:
    """Refuse a group size that does not divide the model's linear input widths (llm-compressor fails late)."""
    if spec.method != "gptq":
        return
    from server.core.identity import text_config

    config = text_config(base)
    for key in ("hidden_size", "intermediate_size"):
        width = config.get(key)
        if width and width % spec.group_size:
            raise ValueError(f"group_size {spec.group_size} does not divide {key}={width} of {base.name}")


def compress(base: Path, spec: CompressionSpec, models_dir: Path, data_dir: Path, command: str) -> Path:
    """Compress `base` per `spec` into `models_dir/<base>-<slug>`; return the folder vLLM serves on a CPU.

    That is the dense twin, except for 4-bit checkpoints, which vLLM serves as they are on AVX-512 CPUs (an AVX2
    CPU serves their twin: `server.core.identity.cpu_servable`). Idempotent: an existing finished variant (it has
    a model card) is returned as is.
    """
    if not (base / "config.json").is_file():
        raise ModelError(f"model path {base}: no config.json there")
    check_group_size(base, spec)
    name = f"{base.name}-{spec.slug}"
    out = models_dir / name
    twin = models_dir / f"{name}-dense"
    served = twin if spec.needs_dense_twin and not spec.cpu_kernel_bits else out
    if _finished(served, spec):
        return served
    seconds = _run_oneshot(base, spec, out, data_dir)
    base_card = read_card(base)
    if spec.needs_dense_twin:
        _write_dense_twin(out, twin)
    digest = weights_digest(twin if spec.needs_dense_twin else out)
    card = ModelCard(
        name=name,
        role="compressed",
        base=base_card.base if base_card else base.name,
        source=f"llm-compressor oneshot on {base.name}",
        format="compressed-tensors" if spec.method == "gptq" else "dense",
        serves_on=_serves_on(spec),
        twin=twin.name if spec.needs_dense_twin else None,
        serve_dtype="bfloat16" if spec.cpu_kernel_bits else "float32",
        weights_sha256=digest,
        method=spec.model_dump() | {"seconds": round(seconds, 1), "environment": REPRODUCIBLE_ENV},
        measured={"bytes": folder_bytes(out)},
        command=command,
    )
    if spec.needs_dense_twin:
        twin_card = card.model_copy(
            update={
                "name": twin.name,
                "role": "dequantized",
                "format": "dense",
                "serves_on": ["cpu", "gpu"],
                "twin": name,
                "serve_dtype": "float32",
                "measured": {"bytes": folder_bytes(twin)},
            }
        )
        write_card(twin, twin_card)
    write_card(out, card)
    return served


def _finished(served: Path, spec: CompressionSpec) -> bool:
    """Whether `served` was made by this recipe in today's reproducible way (a folder from before weights digests
    or from another numeric environment is made again, so `prepare` upgrades an old default model)."""
    card = read_card(served)
    if card is None or card.weights_sha256 is None:
        return False
    return card.method.get("environment") == REPRODUCIBLE_ENV and all(
        card.method.get(key) == value for key, value in spec.model_dump().items()
    )


def _serves_on(spec: CompressionSpec) -> list[str]:
    """Where vLLM can serve the checkpoint itself: a quantized one on GPUs, and on AVX-512 CPUs where it has a
    CPU kernel; a dense (pruned) one anywhere."""
    if spec.method != "gptq":
        return ["cpu", "gpu"]
    return ["cpu-avx512", "gpu"] if spec.cpu_kernel_bits else ["gpu"]


def _calibration(base: Path, spec: CompressionSpec, data_dir: Path, tokenizer) -> object:
    from datasets import Dataset

    ids = token_blocks(tokenizer, lee_train(data_dir), spec.calibration_len, spec.calibration_samples)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})


REPRODUCIBLE_ENV: dict[str, str] = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MKL_CBWR": "COMPATIBLE",
    "ATEN_CPU_CAPABILITY": "default",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
}
"""The numeric environment of every compression: one thread, and the kernels torch (ATen), MKL (BLAS/LAPACK) and
oneDNN run pinned to code paths every x86-64 CPU has, so reductions happen in the same order everywhere."""

_NUMERIC_ENV_PREFIXES = ("OMP_", "MKL_", "KMP_", "GOMP_", "ATEN_", "ONEDNN_", "DNNL_", "TORCH_")


def numeric_env(overrides: dict[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without anything that steers numeric kernels, plus `REPRODUCIBLE_ENV`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_NUMERIC_ENV_PREFIXES)}
    return env | REPRODUCIBLE_ENV | (overrides or {})


def _run_oneshot(
    base: Path, spec: CompressionSpec, out: Path, data_dir: Path, env: dict[str, str] | None = None
) -> float:
    """Compress in a child process started with `numeric_env(env)` (those variables are read once, when torch and
    MKL load, so only a fresh process honours them); return the seconds the compression took."""
    args = [sys.executable, "-m", "server.lab.compress", str(base), spec.model_dump_json(), str(out), str(data_dir)]
    result = subprocess.run(args, env=numeric_env(env), stdout=subprocess.PIPE, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"compressing {base} with {spec.slug} failed in its child process "
            f"(exit status {result.returncode}; its log is above)"
        )
    return float(json.loads(result.stdout.strip().splitlines()[-1])["seconds"])


def _oneshot(base: Path, spec: CompressionSpec, out: Path, data_dir: Path) -> float:
    """Run llm-compressor on float32 weights (these CPUs have no fast bf16) and save compressed.

    The calibration blocks are consecutive corpus blocks in order: llm-compressor would otherwise shuffle them
    (unseeded), and the order changes how the GPTQ Hessians' float32 sums round.
    """
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    dataset = _calibration(base, spec, data_dir, tokenizer)
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe(spec),
        max_seq_length=spec.calibration_len,
        num_calibration_samples=spec.calibration_samples,
        shuffle_calibration_samples=False,
    )
    seconds = time.perf_counter() - start
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, save_compressed=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return seconds


def _write_dense_twin(compressed: Path, twin: Path) -> None:
    """Decompress a compressed-tensors checkpoint through transformers and save it as a plain dense folder."""
    from transformers import AutoTokenizer

    from server.lab.loading import load_model

    model = load_model(compressed)
    save_clean(model.state_dict(), model.config, AutoTokenizer.from_pretrained(compressed), twin)


DEFAULT_SPEC = CompressionSpec(method="gptq", bits=3, group_size=64)
"""The embedded default variant (chosen by measurement; see README, 'Compressed variants')."""


def served_name(base: str, spec: CompressionSpec) -> str:
    """Folder name of the variant `compress` returns for CPU serving: the dense twin where one is needed."""
    return f"{base}-{spec.slug}" + ("-dense" if spec.needs_dense_twin and not spec.cpu_kernel_bits else "")


class DefaultModelMismatch(ModelError):
    """`prepare` made a default model whose weights are not the ones the shipped banks were trained on."""


def verify_default(served: Path) -> str:
    """Check the default model `prepare` made against the weights digest recorded in the repo; return the digest.

    A mismatch means this machine's compression did not reproduce the recorded one (a changed pin, a modified
    base model, or a numeric path docs/default-model.md did not foresee); the shipped banks would then repair a
    model they never saw, so the server refuses them (see `server.core.banks.load_bank`) and this says why.
    """
    base_digest = read_card(served.parent / DEFAULT_BASE)
    card = read_card(served)
    if card is None or served.name != DEFAULT_MODEL:
        raise ModelError(f"{served}: not the default model {DEFAULT_MODEL!r} made by `idp-serve prepare`")
    if card.weights_sha256 == DEFAULT_WEIGHTS_SHA256:
        return card.weights_sha256
    base_note = ""
    if base_digest is not None and base_digest.weights_sha256 not in (None, DEFAULT_BASE_WEIGHTS_SHA256):
        base_note = (
            f" The base model differs too: {DEFAULT_BASE} has weights {base_digest.weights_sha256}, "
            f"expected {DEFAULT_BASE_WEIGHTS_SHA256}."
        )
    raise DefaultModelMismatch(
        f"the default model {served} has weights {card.weights_sha256}, but the repo records "
        f"{DEFAULT_WEIGHTS_SHA256} for it (server/core/identity.py DEFAULT_WEIGHTS_SHA256), the weights the shipped "
        f"prompt banks were trained on.{base_note} The server will refuse the shipped banks on this model. To "
        "use this model, retrain the banks on it (the commands are in prompt_banks/*/bank.json, field "
        "trained.command) or serve with --allow-bank-weights-mismatch to use them anyway; docs/default-model.md "
        "says how to find which numeric setting differs."
    )


def _main(argv: list[str]) -> None:
    """Child-process entry of `_run_oneshot`: base, spec (JSON), out folder, data dir; prints the seconds."""
    base, spec, out, data_dir = argv
    seconds = _oneshot(Path(base), CompressionSpec.model_validate_json(spec), Path(out), Path(data_dir))
    print(json.dumps({"seconds": seconds}))


if __name__ == "__main__":
    _main(sys.argv[1:])
