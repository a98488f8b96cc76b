"""Prompt banks to and from PEFT prompt-tuning adapters: prompts trained with PEFT can join a bank, and a bank's
prompts can be checked against PEFT itself. Offline only: the server reads banks, never adapters."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from server.core.banks import BankError, PromptBank, make_bank
from server.core.identity import Fingerprint, text_config

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_TENSOR_KEY = "prompt_embeddings"


def export_peft(bank: PromptBank, prompt_name: str, folder: Path, base_model_name_or_path: str | None = None) -> Path:
    """Write one prompt as a PEFT prompt-tuning adapter that `PeftModel.from_pretrained` loads.

    If `base_model_name_or_path` is a local model folder, the layer and head counts are copied from its
    config; otherwise they stay null and PEFT fills them from the model it attaches the adapter to.
    """
    from peft import PromptTuningConfig  # peft imports in seconds; serving banks does not need it

    row = bank.embeddings[bank.index(prompt_name)]
    model_dir = Path(base_model_name_or_path) if base_model_name_or_path else None
    shape = text_config(model_dir) if model_dir and (model_dir / "config.json").is_file() else {}
    config = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=bank.m,
        token_dim=bank.hidden_size,
        num_transformer_submodules=1,
        num_attention_heads=shape.get("num_attention_heads"),
        num_layers=shape.get("num_hidden_layers"),
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,
    )
    folder = Path(folder)
    config.save_pretrained(str(folder))
    (folder / PEFT_WEIGHTS_FILE).write_bytes(
        save_safetensors({PEFT_TENSOR_KEY: row.clone().contiguous()}, metadata={"format": "pt"})
    )
    return folder


def import_peft(
    folders: Sequence[Path],
    names: Sequence[str],
    bank_name: str,
    fingerprint: Fingerprint,
    trained: dict[str, Any] | None = None,
    measured: dict[str, float] | None = None,
) -> PromptBank:
    """Build a bank from PEFT prompt-tuning adapters (one prompt each) trained for the `fingerprint` model."""
    if len(folders) != len(names):
        raise BankError(f"bank {bank_name!r}: {len(folders)} adapter folders but {len(names)} names")
    prompts = [_read_peft_prompt(Path(f), fingerprint.hidden_size) for f in folders]
    lengths = {str(Path(f) / PEFT_WEIGHTS_FILE): int(p.shape[0]) for f, p in zip(folders, prompts)}
    if len(set(lengths.values())) > 1:
        raise BankError(f"bank {bank_name!r}: adapters have unequal num_virtual_tokens (m): {lengths}")
    source = {"source": "peft", "adapters": [str(f) for f in folders]}
    return make_bank(bank_name, prompts, names, fingerprint, {**source, **(trained or {})}, measured)


def _read_peft_prompt(folder: Path, hidden_size: int) -> torch.Tensor:
    """One adapter's prompt [m, d], validated by PEFT's own config classes and against the model's width."""
    from peft import PeftConfig, PromptTuningConfig

    config_path = folder / PEFT_CONFIG_FILE
    if not config_path.is_file():
        raise BankError(f"{config_path}: adapter config missing")
    try:
        raw = json.loads(config_path.read_text())
        config = PeftConfig.from_peft_type(**raw)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise BankError(f"{config_path}: not a valid PEFT adapter config ({type(exc).__name__}: {exc})") from None
    if not isinstance(config, PromptTuningConfig):
        raise BankError(f"{config_path}: field 'peft_type' is {raw['peft_type']}, only PROMPT_TUNING can join a bank")
    if config.num_transformer_submodules not in (None, 1):
        raise BankError(
            f"{config_path}: field 'num_transformer_submodules' is {config.num_transformer_submodules}, "
            "only decoder-only (1) prompts can join a bank"
        )
    if config.token_dim != hidden_size:
        raise BankError(
            f"{config_path}: field 'token_dim' is {config.token_dim}, the model's hidden size is {hidden_size}"
        )
    return _read_peft_tensor(folder / PEFT_WEIGHTS_FILE, (config.num_virtual_tokens, config.token_dim))


def _read_peft_tensor(path: Path, shape: tuple[int, int]) -> torch.Tensor:
    """The adapter's `prompt_embeddings`, refusing a file that is unreadable or disagrees with its config."""
    if not path.is_file():
        raise BankError(f"{path}: adapter weights missing")
    try:
        tensors = load_safetensors(path.read_bytes())
    except Exception as exc:  # safetensors raises its own SafetensorError for every malformed input
        raise BankError(f"{path}: not a readable safetensors file ({exc})") from None
    if PEFT_TENSOR_KEY not in tensors:
        raise BankError(f"{path}: no tensor {PEFT_TENSOR_KEY!r}, found {sorted(tensors)}")
    prompt = tensors[PEFT_TENSOR_KEY]
    if tuple(prompt.shape) != shape:
        raise BankError(
            f"{path}: '{PEFT_TENSOR_KEY}' has shape {list(prompt.shape)}, adapter config "
            f"(num_virtual_tokens, token_dim) says {list(shape)}"
        )
    return prompt.to(torch.float32)
