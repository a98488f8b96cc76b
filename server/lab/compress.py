"""Compression recipes over llm-compressor: GPTQ 2-8 bit weight quantization, SparseGPT and Wanda 50% pruning.

Outputs are compressed-tensors checkpoints, the format vLLM loads natively. vLLM's CPU build runs only 4-bit
weight-only kernels (`CPUWNA16`: uint4 / uint4b8), so for any other bit width we also write a dequantized dense
twin with exactly the compressed weights (same numerics) for CPU serving, tests and the transformers-side
selection pass, and keep the real checkpoint for GPU nodes. Each folder's model card says which is which.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field, model_validator

from server.lab.corpus import lee_train, token_blocks
from server.core.identity import ModelCard, ModelError, folder_bytes, read_card, write_card
from server.lab.convert import save_clean

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
        """Quantized formats vLLM's CPU build has no kernel for get a dequantized copy."""
        return self.method == "gptq" and self.bits not in CPU_QUANT_BITS


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
    """Compress `base` per `spec` into `models_dir/<base>-<slug>`; return the folder vLLM serves on CPU.

    Idempotent: an existing finished variant (it has a model card) is returned as is.
    """
    if not (base / "config.json").is_file():
        raise ModelError(f"model path {base}: no config.json there")
    check_group_size(base, spec)
    name = f"{base.name}-{spec.slug}"
    out = models_dir / name
    twin = models_dir / f"{name}-dense"
    served = twin if spec.needs_dense_twin else out
    if read_card(served) is not None:
        return served
    seconds = _run_oneshot(base, spec, out, data_dir)
    base_card = read_card(base)
    card = ModelCard(
        name=name,
        role="compressed",
        base=base_card.base if base_card else base.name,
        source=f"llm-compressor oneshot on {base.name}",
        format="compressed-tensors" if spec.method == "gptq" else "dense",
        serves_on=["gpu"] if spec.needs_dense_twin else ["cpu", "gpu"],
        twin=twin.name if spec.needs_dense_twin else None,
        serve_dtype="bfloat16" if spec.method == "gptq" and not spec.needs_dense_twin else "float32",
        method=spec.model_dump() | {"seconds": round(seconds, 1)},
        measured={"bytes": folder_bytes(out)},
        command=command,
    )
    if spec.needs_dense_twin:
        _write_dense_twin(out, twin)
        twin_card = card.model_copy(
            update={"name": twin.name, "role": "dequantized", "format": "dense", "serves_on": ["cpu", "gpu"],
                    "twin": name, "serve_dtype": "float32", "measured": {"bytes": folder_bytes(twin)}}
        )
        write_card(twin, twin_card)
    write_card(out, card)
    return served


def _calibration(base: Path, spec: CompressionSpec, data_dir: Path, tokenizer) -> object:
    from datasets import Dataset

    ids = token_blocks(tokenizer, lee_train(data_dir), spec.calibration_len, spec.calibration_samples)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})


def _run_oneshot(base: Path, spec: CompressionSpec, out: Path, data_dir: Path) -> float:
    """Run llm-compressor on float32 weights (these CPUs have no fast bf16) and save compressed."""
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    """Folder name of the variant vLLM's CPU build serves: the dense twin where one is needed."""
    return f"{base}-{spec.slug}" + ("-dense" if spec.needs_dense_twin else "")
