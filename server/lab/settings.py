"""Settings of the lab's commands (`idp-serve prepare | compress | train | evaluate | attention`): the one place
their defaults live.

Each command is a pydantic-settings model, as `serve` is (`server.online.settings.ServeSettings`): the same
sources and precedence (flags > `IDP_*` environment > defaults), and its `--help` is generated from the fields.
A recipe an artefact records (`TrainSpec` and `BankPlan` in a bank manifest, `CompressionSpec` in a model card)
is mixed in whole, so each of its defaults is written once, where the artefact records it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import CliImplicitFlag, SettingsConfigDict

from server.core.config import Settings
from server.core.identity import DEFAULT_BASE, DEFAULT_MODEL
from server.lab.compress import CompressionSpec
from server.lab.train import BankPlan, TrainSpec


class OnDevice(BaseModel):
    """Where an offline command runs its models."""

    device: str = Field(
        "auto", description="torch device: auto (the GPU when torch sees one, else cpu), cpu, cuda, cuda:1, ..."
    )


class PrepareSettings(Settings):
    """Convert the embedded default model and make its default compressed variant (no network but PyPI)."""


class CompressSettings(Settings, CompressionSpec):
    """Compress a model with llm-compressor (GPTQ, SparseGPT, Wanda) into a compressed-tensors folder."""

    model: str = Field(DEFAULT_BASE, description="The model to compress: a folder, or a name under models_dir.")
    measure: CliImplicitFlag[bool] = Field(True, description="Measure the held-out perplexity into the model card.")

    def spec(self) -> CompressionSpec:
        return CompressionSpec.model_validate(self.model_dump(include=set(CompressionSpec.model_fields)))


class TrainSettings(Settings, OnDevice, TrainSpec, BankPlan):
    """Train a prompt bank (or a single prompt) against a frozen compressed model."""

    model_config = SettingsConfigDict(cli_shortcuts={"num-virtual-tokens": "m"})

    mode: Literal["single", "curated", "joint"] = Field(
        "curated",
        description="single: one prompt on all sources; curated: one per source; joint: K prompts "
        "routed by IDP's selection while they train.",
    )
    model: str = Field(DEFAULT_MODEL, description="The compressed model the prompts repair (folder or name).")
    teacher: str = Field(DEFAULT_BASE, description="The uncompressed model distilled from (objective kd).")
    bank: str = Field("default", description="Bank name: its folder under banks_dir.")
    banks_dir: Path = Field(Path("prompt_banks"), description="Where the bank folder is written.")
    single: Path | None = Field(None, description="A single-prompt bank to measure beside this one.")
    model_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="dtype the frozen student and teacher compute in; prompts, optimizer and losses stay "
        "float32. bfloat16 halves their memory on a GPU; float32 is the measured default and what CPUs want.",
    )

    def spec(self) -> TrainSpec:
        return TrainSpec.model_validate(self.model_dump(include=set(TrainSpec.model_fields)))

    def plan(self) -> BankPlan:
        return BankPlan.model_validate(self.model_dump(include=set(BankPlan.model_fields)))


class EvalInputs(Settings, OnDevice):
    """What `evaluate` and `attention` both compare: the models, the banks and the test examples."""

    model: str = Field(DEFAULT_MODEL, description="The compressed model (folder or name).")
    base: str = Field(DEFAULT_BASE, description="The uncompressed model (and the LoRA's KD teacher).")
    bank: Path = Field(Path("prompt_banks/default"), description="The IDP bank folder.")
    single: Path | None = Field(Path("prompt_banks/single"), description="The single-prompt bank folder.")
    tasks: list[str] | None = Field(None, description="Comma-separated task names (default: all).")
    limit: int | None = Field(40, ge=1, description="Test examples per task (null: all).")
    lora_rank: int = Field(1, ge=0, description="LoRA rank on q/v (0: no LoRA).")
    lora_lr: float = Field(
        1e-3, gt=0, description="LoRA learning rate (steps, batches and objective are the single prompt's)."
    )


class EvaluateSettings(EvalInputs):
    """Compare base, compressed, single prompt, IDP, forced prompts and LoRA on the same test examples."""

    tasks: list[str] | None = Field(
        None, description="Comma-separated tasks: multiple-choice names and the *:gen generative ones (default: all)."
    )
    bootstrap: int = Field(2000, ge=1, description="Bootstrap resamples for the 95% CIs.")
    server_url: str | None = Field(None, description="Also re-score a sample through this live server.")
    server_limit: int = Field(3, ge=0, description="Examples per task re-scored through server_url.")
    out: Path = Field(Path("reports/evaluate"), description="Report folder.")


class EvaluatePoolSettings(Settings, OnDevice):
    """The protocol's evaluation (docs/evaluation-protocol.md section 8) on the screened pools: every method on the
    same examples, resumable (--max-seconds) and splittable (--tasks); the report once every piece is scored."""

    screening: Path = Field(
        Path("bench/runs/screening/screening.json"), description="The screening result naming the pools."
    )
    model: str = Field(DEFAULT_MODEL, description="The compressed model (folder or name).")
    base: str = Field(DEFAULT_BASE, description="The uncompressed model (the reference and KL teacher).")
    bank: Path = Field(Path("prompt_banks/default"), description="The IDP bank folder (each prompt is also forced).")
    single: Path = Field(Path("prompt_banks/single"), description="The compute-matched single-prompt bank folder.")
    lora: list[Path] = Field([], description="LoRA run folders (server.lab.lora_recipe) on the compressed model.")
    split: Literal["test", "dev"] = Field(
        "test", description="Evaluated split: test for the one protocol run, dev for smoke runs."
    )
    cap: int = Field(400, ge=1, description="Examples per task (first in file order; raised for a 1,000 pool).")
    dev_cap: int = Field(100, ge=1, description="Dev examples per pool task that choose the dev-chosen forced prompt.")
    general_tokens: int = Field(20_000, ge=1, description="Held-out general tokens for KL and perplexity (at least).")
    general_block: int = Field(256, ge=16, description="Tokens per scored block of a held-out document.")
    tasks: list[str] | None = Field(
        None, description="Score only these units: task names and/or 'general' (default: all); for two processes."
    )
    max_seconds: float | None = Field(None, gt=0, description="Stop scoring after this long; a rerun continues.")
    report_only: CliImplicitFlag[bool] = Field(False, description="Score nothing; write the report if complete.")
    write: CliImplicitFlag[bool] = Field(
        False, description="Record IDP's and the single prompt's results in the banks' manifests (`measured`)."
    )
    bootstrap: int = Field(10_000, ge=100, description="Bootstrap resamples (the protocol fixes 10,000).")
    out: Path = Field(Path("bench/runs/evaluation"), description="Shards and the report go here.")


class AttentionSettings(EvalInputs):
    """Per-layer attention deviation of each repair from the base model (analysis)."""

    tasks: list[str] | None = Field(
        None, description="Comma-separated tasks whose test contexts are the inputs (default: all multiple-choice)."
    )
    limit: int | None = Field(5, ge=1, description="Test examples per task (null: all).")
    out: Path = Field(Path("reports/attention"), description="Report folder.")


LAB_COMMANDS: dict[str, type[Settings]] = {
    "prepare": PrepareSettings,
    "compress": CompressSettings,
    "train": TrainSettings,
    "evaluate": EvaluateSettings,
    "evaluate-pool": EvaluatePoolSettings,
    "attention": AttentionSettings,
}
"""The settings model of each lab subcommand of `idp-serve`."""
