"""Loading model folders for offline work: float32 transformers models, compressed checkpoints dequantized."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel


def load_model(folder: Path) -> PreTrainedModel:
    """A float32 eval-mode transformers model (compressed-tensors checkpoints are dequantized on load)."""
    kwargs: dict = {"dtype": torch.float32}
    if "quantization_config" in (folder / "config.json").read_text():
        from transformers.utils.quantization_config import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
