"""Prompt banks: K trained soft prompts of one length for one model, stored so a server can trust them.

A bank is a folder holding `prompts.safetensors` (one float32 tensor [K, m, d]) and `bank.json`, a manifest
saying which model the prompts belong to, how they were trained and what they measured. Soft prompts are
only meaningful in the input-embedding space they were trained in, and a wrong or damaged bank degrades
answers silently instead of crashing, so `load_bank` refuses anything it cannot vouch for, naming the file
and the field at fault. Banks are read with safetensors only: a bank must never be able to run code.

Single prompts move to and from PEFT prompt-tuning adapters in `server.lab.peft_interop` (the server never needs
PEFT).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from server.core.identity import Fingerprint

FORMAT_VERSION = 1
MANIFEST_FILE = "bank.json"
TENSOR_FILE = "prompts.safetensors"
TENSOR_KEY = "prompts"

_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


Score = Literal["mass", "mass_no_sink"]
SCORES: tuple[Score, ...] = ("mass", "mass_no_sink")
"""The selection scores a rule can name, simplest first (docs/idp-algorithm.md, "Score")."""


class SelectionRule(BaseModel):
    """How a bank picks its prompt for an input; recorded in the manifest so every server selects the same way.

    - `score`: "mass" is the paper's (attention mass on each prompt's m tokens); "mass_no_sink" leaves out each
      prompt's first token, where attention sinks collect mass whatever the input is.
    - `layers`: the selection layers (None: all, the paper's "overall attention").
    - `centre`: one value per prompt subtracted from its score before the argmax (each prompt's mean score on a
      calibration set), so a prompt that draws attention on every input does not win every input.
    - `source`: free text saying how the rule was chosen (e.g. the routing study's report).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    score: Score = "mass"
    layers: tuple[int, ...] | None = Field(None, min_length=1, description="Selection layers; None for all.")
    centre: tuple[float, ...] | None = Field(None, min_length=1, description="Per-prompt score offsets, length k.")
    source: str | None = None

    @field_validator("layers")
    @classmethod
    def _sorted_layers(cls, layers: tuple[int, ...] | None) -> tuple[int, ...] | None:
        """Layers are a set: stored sorted and distinct, so equal rules compare and serialize equal."""
        if layers is None:
            return None
        if min(layers) < 0:
            raise ValueError(f"layer indices must be >= 0, got {list(layers)}")
        return tuple(sorted(set(layers)))

    @field_validator("centre")
    @classmethod
    def _finite_centre(cls, centre: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if centre is not None and not all(math.isfinite(c) for c in centre):
            raise ValueError(f"centre values must be finite, got {list(centre)}")
        return centre

    def check_fits(self, k: int, num_layers: int) -> None:
        """ValueError naming the field unless the rule fits a bank of `k` prompts on a `num_layers`-layer model."""
        if self.layers is not None and self.layers[-1] >= num_layers:
            raise ValueError(
                f"field 'selection.layers': selection layers must be a subset of 0..{num_layers - 1}, "
                f"got {list(self.layers)}"
            )
        if self.centre is not None and len(self.centre) != k:
            raise ValueError(f"field 'selection.centre' has {len(self.centre)} values but the bank has {k} prompts")


class BankError(ValueError):
    """A prompt bank (or a PEFT adapter meant to join one) is missing, damaged or for another model."""


def check_name(name: str, what: str = "bank name") -> str:
    """Return `name` if it is safe as a single folder name, else raise BankError.

    Bank names come from requests and CLI flags and become folder names under the banks directory; allowing
    only [A-Za-z0-9._-] without a leading dot rules out '..', separators and hidden/temporary folders.
    """
    if not _NAME.fullmatch(name):
        raise BankError(f"{what} {name!r}: use only letters, digits, '.', '_' and '-', not starting with '.'")
    return name


def bank_dir(banks_dir: Path, name: str) -> Path:
    """The folder of bank `name` under `banks_dir`, refusing names that could point elsewhere."""
    return Path(banks_dir) / check_name(name)


def list_banks(banks_dir: Path) -> list[str]:
    """Names of the bank folders (those with a manifest) under `banks_dir`; [] if it does not exist."""
    if not Path(banks_dir).is_dir():
        return []
    return sorted(
        p.name for p in Path(banks_dir).iterdir() if _NAME.fullmatch(p.name) and (p / MANIFEST_FILE).is_file()
    )


class BankManifest(BaseModel):
    """`bank.json`: everything needed to decide whether a bank's tensor file may be used with a model."""

    model_config = ConfigDict(extra="forbid")

    format_version: Literal[1] = FORMAT_VERSION
    name: str
    prompt_names: list[str] = Field(min_length=1)
    k: int = Field(ge=1, description="Number of prompts; equals len(prompt_names).")
    m: int = Field(ge=1, description="Soft tokens per prompt (all prompts have the same length).")
    hidden_size: int = Field(ge=1)
    dtype: Literal["float32"] = "float32"
    model: Fingerprint
    trained: dict[str, Any] = Field(default_factory=dict, description="Data, steps, seed, loss, objective...")
    measured: dict[str, float] = Field(default_factory=dict, description="E.g. perplexity with/without prompts.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description=f"sha256 of {TENSOR_FILE}.")
    selection: SelectionRule = Field(default_factory=SelectionRule, description="How the server picks a prompt.")

    @model_validator(mode="before")
    @classmethod
    def _rule_of_older_manifests(cls, data: Any) -> Any:
        """A manifest without `selection` (written before rules existed) meant the paper's mass on the layers in
        `trained.selection_layers` (all when absent); reading it that way keeps every older bank selecting exactly
        as it did."""
        if isinstance(data, dict) and "selection" not in data:
            trained = data.get("trained")
            layers = trained.get("selection_layers") if isinstance(trained, dict) else None
            data = {**data, "selection": {"layers": layers or None}}
        return data

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        return check_name(name)

    @field_validator("prompt_names")
    @classmethod
    def _unique_safe_names(cls, names: list[str]) -> list[str]:
        """Requests pick a prompt by name, so names must be unique and plain."""
        for name in names:
            check_name(name, "prompt name")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate prompt names {duplicates}")
        return names

    @model_validator(mode="after")
    def _consistent(self) -> BankManifest:
        """A manifest must agree with itself before the tensor file is checked against it."""
        if len(self.prompt_names) != self.k:
            raise ValueError(f"field 'prompt_names' has {len(self.prompt_names)} names but field 'k' is {self.k}")
        if self.hidden_size != self.model.hidden_size:
            raise ValueError(
                f"field 'hidden_size' is {self.hidden_size} but field 'model.hidden_size' is {self.model.hidden_size}"
            )
        if self.selection.centre is not None and len(self.selection.centre) != self.k:
            raise ValueError(
                f"field 'selection.centre' has {len(self.selection.centre)} values but field 'k' is {self.k}"
            )
        return self


@dataclass(frozen=True, eq=False)
class PromptBank:
    """A loaded bank: float32 embeddings [K, m, d] and the manifest that vouches for them."""

    embeddings: torch.Tensor
    manifest: BankManifest

    def __post_init__(self) -> None:
        _check_embeddings(self.embeddings, self.manifest, "prompt bank")

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def prompt_names(self) -> list[str]:
        return list(self.manifest.prompt_names)

    @property
    def k(self) -> int:
        return self.manifest.k

    @property
    def m(self) -> int:
        return self.manifest.m

    @property
    def hidden_size(self) -> int:
        return self.manifest.hidden_size

    @property
    def selection_rule(self) -> SelectionRule:
        """How this bank picks its prompt (the manifest's `selection`; see `SelectionRule`)."""
        return self.manifest.selection

    @property
    def selection_layers(self) -> list[int] | None:
        """The selection rule's layers, None for all."""
        layers = self.manifest.selection.layers
        return list(layers) if layers is not None else None

    def index(self, prompt_name: str) -> int:
        """Row of `prompt_name`; the KeyError lists the known names so a bad request is easy to fix."""
        try:
            return self.manifest.prompt_names.index(prompt_name)
        except ValueError:
            raise KeyError(f"bank {self.name!r} has no prompt {prompt_name!r}; known: {self.prompt_names}") from None


def _check_embeddings(embeddings: torch.Tensor, manifest: BankManifest, where: str) -> None:
    """Refuse a tensor that is not float32 [k, m, hidden_size] of finite values, naming the prompt at fault."""
    expected = (manifest.k, manifest.m, manifest.hidden_size)
    if embeddings.dtype != torch.float32:
        raise BankError(f"{where}: dtype is {embeddings.dtype}, manifest field 'dtype' says {manifest.dtype}")
    if tuple(embeddings.shape) != expected:
        fields = ("k", "m", "hidden_size")
        differ = [f for f, got, want in zip(fields, embeddings.shape, expected) if got != want] or ["rank"]
        raise BankError(
            f"{where}: shape {list(embeddings.shape)} does not match manifest [k, m, hidden_size] = "
            f"{list(expected)} (manifest field {', '.join(map(repr, differ))} differs)"
        )
    for name, prompt in zip(manifest.prompt_names, embeddings):
        if not torch.isfinite(prompt).all():
            raise BankError(f"{where}: prompt {name!r} contains NaN or Inf values")


def _serialize(embeddings: torch.Tensor) -> bytes:
    """The exact bytes of the tensor file; deterministic, so its sha256 can be known before writing."""
    return save_safetensors({TENSOR_KEY: embeddings.contiguous()}, metadata={"format": "pt"})


def make_bank(
    name: str,
    prompts: torch.Tensor | Sequence[torch.Tensor],
    prompt_names: Sequence[str],
    model: Fingerprint,
    trained: dict[str, Any] | None = None,
    measured: dict[str, float] | None = None,
    selection: SelectionRule | None = None,
) -> PromptBank:
    """Build a bank from K prompts [m, d] (a list or one [K, m, d] tensor) trained for `model`.

    `selection` None: the paper's rule on `trained["selection_layers"]` (all layers when absent)."""
    if not isinstance(prompts, torch.Tensor):
        lengths = [int(p.shape[0]) for p in prompts]
        if len(set(lengths)) > 1:
            raise BankError(f"bank {name!r}: prompts must have equal lengths m, got {list(zip(prompt_names, lengths))}")
        prompts = torch.stack(list(prompts)) if len(prompts) else torch.empty(0)
    embeddings = prompts.detach().to("cpu", torch.float32).contiguous()
    if embeddings.ndim != 3 or len(prompt_names) != embeddings.shape[0]:
        raise BankError(
            f"bank {name!r}: {len(prompt_names)} prompt names for prompts of shape {list(embeddings.shape)}"
        )
    manifest = _validate_manifest(
        dict(
            name=name,
            prompt_names=list(prompt_names),
            k=embeddings.shape[0],
            m=embeddings.shape[1],
            hidden_size=embeddings.shape[2],
            model=model,
            trained=trained or {},
            measured=measured or {},
            sha256=hashlib.sha256(_serialize(embeddings)).hexdigest(),
            **({"selection": selection.model_dump()} if selection is not None else {}),
        ),
        f"bank {name!r}",
    )
    return PromptBank(embeddings, manifest)


def _validate_manifest(data: dict[str, Any] | str, where: str) -> BankManifest:
    """Parse a manifest (dict or JSON text), turning pydantic's errors into one BankError naming the fields."""
    try:
        if isinstance(data, str):
            return BankManifest.model_validate_json(data)
        return BankManifest.model_validate(data)
    except ValidationError as exc:
        raise BankError(f"{where}: {'; '.join(_describe(e) for e in exc.errors())}") from None


def _describe(error: dict[str, Any]) -> str:
    """One pydantic error as "field 'a.b': problem"; our own validators' messages name their fields already."""
    problem = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
    return f"field '{'.'.join(map(str, error['loc']))}': {problem}" if error["loc"] else problem


def save_bank(bank: PromptBank, folder: Path) -> Path:
    """Write `bank` to `folder` atomically: readers see the old bank or the new one, never a mix.

    Files go to a hidden sibling folder that is then renamed into place; an existing bank is moved aside
    first (directories cannot be replaced in one rename) and deleted after.
    """
    folder = Path(folder)
    data = _serialize(bank.embeddings)
    manifest = bank.manifest.model_copy(update={"sha256": hashlib.sha256(data).hexdigest()})
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / TENSOR_FILE).write_bytes(data)
    (tmp / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def load_bank(folder: Path, expect: Fingerprint | None = None, allow_weights_mismatch: bool = False) -> PromptBank:
    """Load and verify a bank; with `expect`, also refuse a bank trained for another model or other weights.

    `allow_weights_mismatch` (the server's `allow_bank_weights_mismatch`) loads a bank trained on other weights
    of the same model (same config and embeddings) with a warning instead: for operators who know the prompts
    still help there.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise BankError(f"{folder}: no such bank folder")
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BankError(f"{manifest_path}: manifest missing")
    manifest = _validate_manifest(manifest_path.read_text(), str(manifest_path))
    if expect is not None:
        _check_model(manifest, expect, manifest_path, allow_weights_mismatch)
    embeddings = _read_tensor(folder / TENSOR_FILE, manifest)
    _check_embeddings(embeddings, manifest, str(folder / TENSOR_FILE))
    return PromptBank(embeddings, manifest)


def _check_model(
    manifest: BankManifest, expect: Fingerprint, manifest_path: Path, allow_weights_mismatch: bool
) -> None:
    """Refuse a bank for another model; refuse (or, if allowed, warn about) one trained on other weights.

    Compressed variants share the base model's config and embeddings, so only the weights digest tells them
    apart; a prompt trained on one set of weights repairs those, and on others it can do anything. A dense twin
    and its quantized checkpoint record the same digest (same numbers), so a bank serves both without a word.
    """
    have = manifest.model
    fields = ("config_sha256", "embedding_sha256", "hidden_size", "vocab_size")
    differ = [f for f in fields if getattr(have, f) != getattr(expect, f)]
    if differ:
        details = "; ".join(
            f"field 'model.{f}': bank has {getattr(have, f)}, model has {getattr(expect, f)}" for f in differ
        )
        raise BankError(f"{manifest_path}: bank is for model {have.weights!r}, not {expect.weights!r} ({details})")
    if have.weights_sha256 is not None and have.weights_sha256 == expect.weights_sha256:
        return
    retrain = manifest.trained.get("command") or f"idp-serve train --bank {manifest.name} --model {expect.weights}"
    problem = (
        f"bank was trained on weights {have.weights_sha256 or '(not recorded)'} ({have.weights!r}) but the "
        f"served model {expect.weights!r} has weights {expect.weights_sha256 or '(unknown)'}"
    )
    if not allow_weights_mismatch:
        raise BankError(
            f"{manifest_path}: {problem} (field 'model.weights_sha256'); the prompts repair the weights they were "
            f"trained on. Retrain the bank on this model (`{retrain}`, with --model {expect.weights}), serve the "
            "model it was trained on, or load it anyway with --allow-bank-weights-mismatch "
            "(IDP_ALLOW_BANK_WEIGHTS_MISMATCH=1)"
        )
    warnings.warn(f"{manifest_path}: {problem}; loaded anyway (allow_bank_weights_mismatch)", stacklevel=3)


def _read_tensor(path: Path, manifest: BankManifest) -> torch.Tensor:
    """Read the [K, m, d] tensor, refusing a file whose bytes are not the ones the manifest vouches for."""
    if not path.is_file():
        raise BankError(f"{path}: tensor file missing")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        tensors = load_safetensors(data)
    except Exception as exc:  # safetensors raises its own SafetensorError for every malformed input
        raise BankError(
            f"{path}: not a readable safetensors file, truncated or corrupt ({exc}); "
            f"sha256 {digest}, manifest says {manifest.sha256}"
        ) from None
    if digest != manifest.sha256:
        raise BankError(
            f"{path}: sha256 {digest} does not match manifest field 'sha256' {manifest.sha256} "
            "(file modified after the manifest was written)"
        )
    if set(tensors) != {TENSOR_KEY}:
        raise BankError(f"{path}: expected one tensor {TENSOR_KEY!r}, found {sorted(tensors)}")
    return tensors[TENSOR_KEY]
