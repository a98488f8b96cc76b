"""Model identity: model cards, resolving a model folder, and the fingerprint a prompt bank is bound to.

A model folder is an ordinary Hugging Face folder (config.json + *.safetensors + tokenizer) that both
transformers and vLLM load. idp-serve adds `idp_model.json`, a model card saying what the folder is (base,
compressed, or the dequantized twin of a compressed checkpoint), how it was made and what it measured.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field
from safetensors import safe_open

CARD_FILE = "idp_model.json"
DEFAULT_BASE = "smollm2-135m-instruct"
"""Folder name of the embedded base model (`idp-serve prepare` converts it; see server/lab/convert.py)."""
DEFAULT_MODEL = f"{DEFAULT_BASE}-gptq-w3g64-dense"
"""Folder name of the model served by default: the dense twin of the default compressed variant
(`server.lab.compress.DEFAULT_SPEC`; a test holds the two names together)."""


class ModelError(ValueError):
    """A model folder is missing, unreadable or not what it claims to be."""


class ModelCard(BaseModel):
    """What a model folder is; written by `prepare` and `compress`, read by everything that picks a model."""

    name: str
    role: Literal["base", "compressed", "dequantized"]
    base: str = Field(description="Name of the uncompressed model this one derives from (itself for a base).")
    source: str = Field(description="Where the weights came from (package, GGUF file or compression recipe).")
    format: Literal["dense", "compressed-tensors"] = "dense"
    serves_on: list[Literal["cpu", "gpu"]] = Field(default_factory=lambda: ["cpu", "gpu"])
    twin: str | None = Field(None, description="Folder name of the compressed checkpoint / its dequantized copy.")
    serve_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype to serve with on CPU: vLLM's CPU 4-bit kernels take bfloat16 activations only."
    )
    method: dict[str, object] = Field(default_factory=dict)
    measured: dict[str, float | int] = Field(default_factory=dict)
    command: str | None = Field(None, description="The command that produced this folder.")


def read_card(folder: Path) -> ModelCard | None:
    """The folder's model card, or None for a plain HF folder that idp-serve did not make."""
    path = folder / CARD_FILE
    return ModelCard.model_validate_json(path.read_text()) if path.exists() else None


def write_card(folder: Path, card: ModelCard) -> None:
    (folder / CARD_FILE).write_text(card.model_dump_json(indent=2) + "\n")


def resolve(model: str | Path, models_dir: Path) -> Path:
    """Turn a model argument into a folder: an existing path, or a name under `models_dir`."""
    path = Path(model).expanduser()
    if not path.exists():
        path = models_dir / str(model)
    if not (path / "config.json").is_file():
        raise ModelError(f"model {str(model)!r}: no config.json at {path} (run `idp-serve prepare` or pass a folder)")
    return path


class Fingerprint(BaseModel):
    """Identity of a model's input space: a prompt bank trained for one model is valid only where this matches.

    The embedding rows are hashed after rounding to bfloat16, so the same model stored in float32, bfloat16
    or float16 matches, while any other model (or retrained embeddings) does not. Compression never touches
    the embedding table, so a base model and its compressed variants share the fingerprint; `weights` tells
    the variants apart (a bank used on another variant loads with a warning, not a refusal).
    """

    config_sha256: str
    embedding_sha256: str
    hidden_size: int
    vocab_size: int
    weights: str = Field(description="Name of the model folder the fingerprint was taken from.")


_IDENTITY_KEYS = (
    "model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size", "tie_word_embeddings",
)


def text_config(folder: Path) -> dict:
    """config.json, or its `text_config` for multimodal wrappers."""
    config = json.loads((folder / "config.json").read_text())
    return config.get("text_config", config)


def embedding_weight(folder: Path) -> torch.Tensor:
    """The input embedding table [vocab, hidden] in float32, read straight from the safetensors shards."""
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            key = next((k for k in f.keys() if k.endswith("embed_tokens.weight")), None)
            if key is not None:
                return f.get_tensor(key).to(torch.float32)
    raise ModelError(f"{folder}: no '*embed_tokens.weight' tensor in any *.safetensors file")


def fingerprint(folder: Path) -> Fingerprint:
    """Fingerprint a model folder from its config and its embedding table."""
    config = text_config(folder)
    identity = {k: config.get(k) for k in _IDENTITY_KEYS}
    emb = embedding_weight(folder)
    return Fingerprint(
        config_sha256=hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest(),
        embedding_sha256=hashlib.sha256(emb.to(torch.bfloat16).view(torch.int16).numpy().tobytes()).hexdigest(),
        hidden_size=int(emb.shape[1]),
        vocab_size=int(emb.shape[0]),
        weights=folder.name,
    )


def folder_bytes(folder: Path) -> int:
    """Bytes of the weight files of a model folder."""
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
