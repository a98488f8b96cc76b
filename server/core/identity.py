"""Model identity: model cards, resolving a model folder, and the fingerprint a prompt bank is bound to.

A model folder is an ordinary Hugging Face folder (config.json + *.safetensors + tokenizer) that both
transformers and vLLM load. idp-serve adds `idp_model.json`, a model card saying what the folder is (base,
compressed, or the dequantized twin of a compressed checkpoint), how it was made and what it measured.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field
from safetensors import safe_open

logger = logging.getLogger(__name__)

CARD_FILE = "idp_model.json"
DEFAULT_BASE = "smollm2-135m-instruct"
"""Folder name of the embedded base model (`idp-serve prepare` converts it; see server/lab/convert.py)."""
DEFAULT_MODEL = f"{DEFAULT_BASE}-gptq-w3g64-dense"
"""Folder name of the model served by default: the dense twin of the default compressed variant
(`server.lab.compress.DEFAULT_SPEC`; a test holds the two names together)."""


DEFAULT_BASE_WEIGHTS_SHA256 = "9dc5603792b70804ade932b45cc914fc9ca8c0ac635291996cc7cd521e73a94c"
"""`weights_digest` of DEFAULT_BASE as `idp-serve prepare` converts it (the same on every machine)."""
DEFAULT_WEIGHTS_SHA256 = "ce9847ca9d2853f56f15d0836a8b335176a3b04c435b4dddd702574b6fc252ff"
"""`weights_digest` of DEFAULT_MODEL: what `idp-serve prepare` must reproduce, bit for bit, on any x86-64 CPU, and
what the shipped prompt banks record (docs/default-model.md; tests/test_reproducible.py checks it)."""

CPU_KERNELS: dict[str, tuple[str, str]] = {
    "cpu-avx512": ("cpu_gemm_wna16", "AVX-512"),
}
"""Model cards' `serves_on` entries that need a vLLM CPU kernel: the op and the instruction set it needs. vLLM's CPU
platform (vllm/platforms/cpu.py, `import_kernels`) loads `_C` or `_C_AVX512` when
`torch.cpu._is_avx512_supported()`, else `_C_AVX2`, and only the AVX-512 libraries define `cpu_gemm_wna16`, the
kernel of its 4-bit compressed-tensors layers (`CPUWNA16LinearKernel`; measured: with the AVX2 library the engine
fails at its first forward with "'_C' object has no attribute 'cpu_gemm_wna16'")."""


class ModelError(ValueError):
    """A model folder is missing, unreadable or not what it claims to be."""


class ModelCard(BaseModel):
    """What a model folder is; written by `prepare` and `compress`, read by everything that picks a model."""

    name: str
    role: Literal["base", "compressed", "dequantized"]
    base: str = Field(description="Name of the uncompressed model this one derives from (itself for a base).")
    source: str = Field(description="Where the weights came from (package, GGUF file or compression recipe).")
    format: Literal["dense", "compressed-tensors"] = "dense"
    serves_on: list[Literal["cpu", "cpu-avx512", "gpu"]] = Field(
        default_factory=lambda: ["cpu", "gpu"],
        description="Where vLLM serves this folder as is: 'cpu' any CPU, 'cpu-avx512' CPUs with AVX-512 only "
        "(see CPU_KERNELS), 'gpu' CUDA GPUs.",
    )
    twin: str | None = Field(None, description="Folder name of the compressed checkpoint / its dequantized copy.")
    serve_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype to serve with on CPU: vLLM's CPU 4-bit kernels take bfloat16 activations only."
    )
    weights_sha256: str | None = Field(
        None,
        description="`weights_digest` of the served weights; a compressed checkpoint records its dense twin's "
        "(the same numbers), so a bank trained on either is valid on both.",
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
    the embedding table, so a base model and its compressed variants share those digests; `weights_sha256`
    tells them apart, down to one bit of one weight: a prompt repairs the exact weights it was trained on, so
    a bank for other weights is refused unless the operator allows it (`server.core.banks.load_bank`).
    """

    config_sha256: str
    embedding_sha256: str
    hidden_size: int
    vocab_size: int
    weights: str = Field(description="Name of the model folder the fingerprint was taken from.")
    weights_sha256: str | None = Field(
        None, description="`weights_digest` of the weights (None: unknown, e.g. a compressed checkpoint without card)."
    )


_IDENTITY_KEYS = (
    "model_type",
    "architectures",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "tie_word_embeddings",
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
        weights_sha256=verified_weights_digest(folder),
    )


def verified_weights_digest(folder: Path) -> str | None:
    """The folder's weights digest, recomputed for a dense folder (about a second for 135M float32 weights) and
    checked against its card, so weights edited after the card was written are caught at load.

    A compressed-tensors checkpoint cannot be hashed without decompressing it, so its card's digest (its dense
    twin's, taken when it was made) is trusted; without a card it is None.
    """
    card = read_card(folder)
    if card is not None and card.format != "dense":
        return card.weights_sha256
    if _is_compressed(folder):
        return None
    digest = weights_digest(folder)
    if card is not None and card.weights_sha256 is not None and card.weights_sha256 != digest:
        raise ModelError(
            f"{folder}: weights digest {digest} does not match {CARD_FILE} field 'weights_sha256' "
            f"{card.weights_sha256} (weights changed after the folder was made; make it again)"
        )
    return digest


def _is_compressed(folder: Path) -> bool:
    return "quantization_config" in json.loads((folder / "config.json").read_text())


def tensors_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over the values of named tensors, the same whatever order or dtype they are stored in.

    Tensors are taken in sorted name order; each contributes its shape and its values upcast to float32
    (exact for bfloat16 and float16, so a bf16 copy of bf16 values matches while a float32 model rounded to
    bf16 is, rightly, other weights). Names order the tensors but are not hashed, so a checkpoint that
    prefixes every name the same way digests the same. Integer tensors (none in a dense folder) hash as int64.
    """
    digest = hashlib.sha256()
    for _, tensor in sorted(tensors, key=lambda item: item[0]):
        values = tensor.detach().to("cpu")
        values = values.to(torch.float32) if values.is_floating_point() else values.to(torch.int64)
        digest.update(json.dumps(list(values.shape)).encode())
        digest.update(values.contiguous().numpy().tobytes())
    return digest.hexdigest()


def served_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a dense model folder, as stored (a tied `lm_head.weight` copy, if saved, is skipped)."""
    tied = bool(text_config(folder).get("tie_word_embeddings"))
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():
                if not (tied and key.endswith("lm_head.weight")):
                    yield key, f.get_tensor(key)


def weights_digest(folder: Path) -> str:
    """The weights digest of a dense model folder (see `tensors_digest`); about a second for 135M float32."""
    return tensors_digest(served_tensors(folder))


def servable(folder: Path, gpu: bool | None = None, avx512: bool | None = None) -> Path:
    """The folder vLLM serves for `folder` here: itself, or on a CPU lacking its kernel, its dense twin.

    `gpu` defaults to whether torch sees CUDA (then vLLM is its CUDA build and serves every format); `avx512` to
    what vLLM itself asks, `torch.cpu._is_avx512_supported()` (the hardware, which no environment variable
    changes). A folder without card, or one whose card says 'cpu', is served as is; on a CPU, a checkpoint whose
    kernel is missing falls back to its dense twin (same weights, so the same banks; logged), and without a twin
    it is refused with the kernel's name and the way out.
    """
    card = read_card(folder)
    if gpu is None:
        gpu = torch.cuda.is_available()
    if card is None or "cpu" in card.serves_on or (gpu and "gpu" in card.serves_on):
        return folder
    if avx512 is None:
        avx512 = torch.cpu._is_avx512_supported()
    needs = [entry for entry in card.serves_on if entry in CPU_KERNELS]
    if avx512 and needs:
        return folder
    twin = folder.parent / card.twin if card.twin else None
    twin_card = read_card(twin) if twin is not None else None
    if twin_card is not None and "cpu" in twin_card.serves_on:
        logger.warning(
            "%s: no vLLM CPU kernel for this %s checkpoint on this CPU; serving its dense twin %s (the same weights)",
            folder,
            card.format,
            twin,
        )
        return twin
    missing = ", ".join(f"{CPU_KERNELS[e][0]} (needs {CPU_KERNELS[e][1]})" for e in needs) or "none exists"
    raise ModelError(
        f"model {folder}: vLLM's CPU build has no kernel for this {card.format} checkpoint on this CPU (kernel: "
        f"{missing}) and its dense twin is not there; serve on a GPU node, or make the twin with `idp-serve "
        f"compress` ({card.command or 'the command in its card'}) and serve {card.twin or 'it'}"
    )


def folder_bytes(folder: Path) -> int:
    """Bytes of the weight files of a model folder."""
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
