"""Loading model folders for offline work: transformers models on a chosen device, compressed checkpoints
dequantized, weights frozen where only prompts (or adapters) train."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from server.core.device import resolve_device


def torch_device(setting: str) -> torch.device:
    """The device of an offline run (see `server.core.device.resolve_device`), refused before anything loads."""
    return torch.device(resolve_device(setting))


def load_model(folder: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """An eval-mode transformers model on `device` (compressed-tensors checkpoints are dequantized on load).

    float32 unless asked: it is what the selection pass and the served CPU model compute in, so offline numbers
    match the server's."""
    kwargs: dict = {"dtype": dtype}
    if "quantization_config" in (folder / "config.json").read_text():
        from transformers.utils.quantization_config import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs).to(device).eval()


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Eval mode, no gradients for any weight: only prompts (or a LoRA added afterwards) train."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
