"""The app factory and its lifespan: every piece of serving state is created here and torn down here.

Start-up order: resolve the model folder, load and verify the prompt banks against the model's fingerprint,
then start vLLM while (in a thread) the selection model loads and each bank's prompt KV is computed; the two
overlap because the engine core runs in its own process. A bank that fails verification stops the start: a
server quietly missing a bank would answer differently from what its operator configured.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI

from server import __version__
from server.api.errors import install_error_handlers
from server.api.router import router
from server.api.selection_queue import SelectionQueue, Selector
from server.api.serving import IdpServing
from server.banks import PromptBank, list_banks, load_bank
from server.engine import Engine, EngineConfig
from server.models import Fingerprint, fingerprint, read_card, resolve
from server.selection import CachedSelector, load_selection_model
from server.serve_settings import ServeSettings

logger = logging.getLogger(__name__)


@dataclass
class _Running:
    serving: IdpServing
    engine: Engine
    selection: SelectionQueue

    async def stop(self) -> None:
        await self.selection.stop()
        self.engine.shutdown()


def serve_dtype(folder: Path) -> str:
    """The dtype the model card asks for on CPU (float32 for folders idp-serve did not make)."""
    card = read_card(folder)
    return card.serve_dtype if card else "float32"


def load_banks(banks_dir: Path, model: Fingerprint) -> dict[str, PromptBank]:
    """Every bank under `banks_dir`, verified against the served model (BankError names the one at fault)."""
    return {name: load_bank(banks_dir / name, expect=model) for name in list_banks(banks_dir)}


def choose_default_bank(requested: str | None, banks: dict[str, PromptBank]) -> str | None:
    """The configured default bank (which must exist), else the first by name, else None (IDP off by default)."""
    if requested is not None and requested not in banks:
        raise ValueError(f"default bank {requested!r} is not among the loaded banks {sorted(banks)}")
    return requested or next(iter(sorted(banks)), None)


def build_selectors(
    folder: Path, banks: dict[str, PromptBank], layers: list[int] | None
) -> dict[str, Selector]:
    """One cached selector per bank over one shared float32 selection model (none to load without banks)."""
    if not banks:
        return {}
    model = load_selection_model(folder)
    return {name: CachedSelector(model, bank.embeddings, layers) for name, bank in banks.items()}


async def _start(settings: ServeSettings) -> _Running:
    folder = resolve(settings.model, settings.models_dir)
    torch.set_num_threads(settings.torch_threads)
    banks = load_banks(settings.banks_dir, fingerprint(folder))
    default_bank = choose_default_bank(settings.default_bank, banks)
    selectors = asyncio.create_task(asyncio.to_thread(build_selectors, folder, banks, settings.selection_layers))
    name = settings.served_model_name or folder.name
    config = EngineConfig(
        model=folder,
        served_model_name=name,
        dtype=settings.dtype or serve_dtype(folder),
        max_model_len=settings.max_model_len,
        kv_cache_gib=settings.kv_cache_gib,
        enforce_eager=settings.enforce_eager,
        options=settings.engine_options,
    )
    try:
        engine = Engine.start(config)
    except BaseException:
        await asyncio.gather(selectors, return_exceptions=True)
        raise
    try:
        queue = SelectionQueue(await selectors, settings.selection_batch_size, settings.selection_wait_ms / 1000.0)
    except BaseException:
        engine.shutdown()
        raise
    queue.start()
    serving = IdpServing(engine, name, str(folder), banks, default_bank, queue)
    logger.info("serving %s from %s with banks %s (default %s)", name, folder, sorted(banks), default_bank)
    return _Running(serving, engine, queue)


def create_app(settings: ServeSettings) -> FastAPI:
    """A FastAPI app serving `settings.model`; the engine starts with the app's lifespan, not at import."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        running = await _start(settings)
        app.state.serving = running.serving
        try:
            yield
        finally:
            await running.stop()

    app = FastAPI(
        title="idp-serve",
        version=__version__,
        description="OpenAI-compatible server for compressed LLMs repaired per request by Inference-time "
        "Dynamic Prompting: each input gets the soft prompt of a bank it attends to most.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(router)
    return app


def run(settings: ServeSettings) -> None:
    """Serve until interrupted (what `idp-serve serve` calls)."""
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)
