"""The bank registry: loading the banks directory into one verified set, its metrics following the set, and the
refusal of an explicitly configured banks directory that holds no bank. A tiny random model built here stands
in for the served one (no prepared model, no engine).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from prometheus_client import REGISTRY

from server import cli
from server.core.banks import BankError, PromptBank, make_bank, save_bank
from server.core.identity import fingerprint
from server.online.app import create_app
from server.online.bank_registry import BankLoader
from server.online.settings import ServeSettings
from tests.helpers import micro_llama


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("registry") / "tiny-registry-model"
    micro_llama(64, seed=0).save_pretrained(folder)
    return folder


def bank(model: Path, name: str, prompts: list[str], seed: int) -> PromptBank:
    rows = torch.randn(len(prompts), 3, 32, generator=torch.Generator().manual_seed(seed))
    return make_bank(name, rows, prompts, fingerprint(model))


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def series_of(bank_name: str) -> set[str]:
    """Names of the samples labelled with this bank, in every family idp-serve defines."""
    return {
        s.name
        for family in REGISTRY.collect()
        if family.name.startswith("idp_")
        for s in family.samples
        if s.labels.get("bank") == bank_name
    }


def test_reload_drops_the_series_of_banks_and_prompts_that_are_gone(model: Path, tmp_path: Path) -> None:
    banks_dir = tmp_path / "banks"
    save_bank(bank(model, "keep", ["k-0", "k-1"], 1), banks_dir / "keep")
    save_bank(bank(model, "gone", ["g-0", "g-1"], 2), banks_dir / "gone")
    loader = BankLoader(model, banks_dir, None, None, "cpu")
    first = loader()
    assert sorted(first.banks) == ["gone", "keep"] and first.default == "gone"
    assert sample("idp_bank_prompts", bank="gone") == 2
    assert {"idp_bank_info", "idp_bank_prompts", "idp_selections_total"} <= series_of("gone")
    assert sample("idp_selections_total", bank="gone", prompt="g-0", mode="dynamic") == 0

    shutil.rmtree(banks_dir / "gone")
    save_bank(bank(model, "keep", ["k-0", "k-renamed"], 3), banks_dir / "keep")
    second = loader()
    assert sorted(second.banks) == ["keep"]
    assert series_of("gone") == set()
    assert sample("idp_selections_total", bank="keep", prompt="k-1", mode="forced") is None
    assert sample("idp_selections_total", bank="keep", prompt="k-renamed", mode="forced") == 0
    assert sample("idp_selections_total", bank="keep", prompt="k-0", mode="dynamic") == 0
    assert sample("idp_bank_loads_total", bank="keep") == 2


def test_a_refused_set_leaves_the_metrics_of_the_serving_one(model: Path, tmp_path: Path) -> None:
    banks_dir = tmp_path / "banks"
    save_bank(bank(model, "solo", ["s-0"], 4), banks_dir / "solo")
    loader = BankLoader(model, banks_dir, "solo", None, "cpu")
    loader()
    shutil.rmtree(banks_dir / "solo")
    save_bank(bank(model, "other", ["o-0"], 5), banks_dir / "other")
    failures = sample("idp_bank_load_failures_total")
    with pytest.raises(BankError, match="default bank 'solo' is not among the loaded banks"):
        loader()
    assert sample("idp_bank_load_failures_total") == failures + 1
    assert sample("idp_bank_prompts", bank="solo") == 1
    assert sample("idp_bank_prompts", bank="other") is None


@pytest.mark.parametrize("state", ["empty", "missing"])
def test_an_explicit_banks_dir_without_a_bank_is_refused_before_anything_starts(tmp_path: Path, state: str) -> None:
    banks_dir = tmp_path / "banks"
    if state == "empty":
        banks_dir.mkdir()
    why = "holds no bank" if state == "empty" else "does not exist"
    with pytest.raises(BankError, match=f"banks directory {banks_dir} was set explicitly .* but {why}"):
        create_app(ServeSettings(banks_dir=banks_dir))
    create_app(ServeSettings(banks_dir=banks_dir, allow_empty_banks_dir=True))  # serving without banks on purpose


def test_the_environment_counts_as_explicit_and_the_default_dir_is_not_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IDP_BANKS_DIR", str(tmp_path))
    with pytest.raises(BankError, match="IDP_BANKS_DIR / --banks-dir"):
        create_app(ServeSettings())
    monkeypatch.delenv("IDP_BANKS_DIR")
    assert "banks_dir" not in ServeSettings().model_fields_set
    create_app(ServeSettings())  # builds the app only; the default directory is the project's own


def test_the_cli_says_why_it_refuses_an_empty_banks_dir(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--banks-dir", str(tmp_path)])
    assert str(exit_info.value).startswith("idp-serve serve: error: banks directory")
    assert "holds no bank" in str(exit_info.value)


def test_a_reload_of_an_explicit_dir_emptied_meanwhile_is_refused(model: Path, tmp_path: Path) -> None:
    banks_dir = tmp_path / "banks"
    save_bank(bank(model, "only", ["x-0"], 6), banks_dir / "only")
    loader = BankLoader(model, banks_dir, None, None, "cpu", required=True)
    assert sorted(loader().banks) == ["only"]
    shutil.rmtree(banks_dir / "only")
    with pytest.raises(BankError, match="holds no bank"):
        loader()
