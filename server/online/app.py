"""The app factory and its lifespan: every piece of serving state is created here and torn down here.

Start-up order: resolve the model folder, load and verify the prompt banks against the model's fingerprint,
then start vLLM while (in a thread) the selection model loads and each bank's prompt KV is computed; the two
overlap because the engine core runs in its own process. A bank that fails verification stops the start: a
server quietly missing a bank would answer differently from what its operator configured. The same loader
serves `POST /admin/banks/reload` and SIGHUP, where a bank that fails is refused and the loaded set keeps serving.

Engine death: vLLM does not restart a dead engine core in-process, and a half-alive server is the worst case for
Kubernetes (it keeps routing traffic to it). So once the core dies, /health answers 503 at once, every in-flight
request gets an error (vLLM fails them; streams get an error event), new requests get 503, and after
`engine_death_exit_s` (time for those answers to go out and for probes to see 503) the app calls its
`on_engine_death` hook; `run` makes that stop uvicorn and exit with status EXIT_ENGINE_DEAD, so the container
restarts with a fresh engine.

Middleware, outermost first: HTTP metrics (so every answer is counted), CORS (only with `cors_origins`; it
answers browser preflights), the API key (only with `api_key`), the body size limit; then FastAPI's routes.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from transformers import PreTrainedModel

from server import __version__
from server.online import cpus, metrics
from server.online.api.errors import ApiError, install_error_handlers
from server.online.api.middleware import ApiKey, BodyLimit
from server.online.api.router import router
from server.online.selection_queue import SelectionQueue
from server.online.api.serving import BankSet, IdpServing, Limits
from server.core.banks import BankError, PromptBank, list_banks, load_bank
from server.online.engine import Engine, EngineConfig
from server.core.identity import Fingerprint, fingerprint, read_card, resolve
from server.core.selection import CachedSelector, load_selection_model
from server.online.settings import ServeSettings

logger = logging.getLogger(__name__)

EXIT_ENGINE_DEAD = 3
"""Exit status of `run` after the engine died (non-zero, so any supervisor restarts the process)."""


@dataclass
class _Running:
    serving: IdpServing
    engine: Engine
    selection: SelectionQueue

    async def stop(self) -> None:
        await self.selection.stop()
        self.engine.shutdown()


def selection_device(setting: str) -> str:
    """The torch device of the selection pass: `auto` is the GPU when torch sees one (vLLM's GPU build), else CPU.

    An explicit device torch cannot use is refused here, at start-up, rather than on the first request."""
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.empty(0, device=setting)
    except (RuntimeError, AssertionError) as error:
        raise ValueError(f"selection_device {setting!r} is not usable here: {error}") from error
    return setting


def selection_batch_size(setting: int | None, device: str) -> int:
    """Most inputs per selection pass: the setting, else 1 on CPU and 16 on an accelerator.

    On CPU the pass is compute-bound: per 128-token input, batches of 4 cost 0.90x and batches of 16 1.06x of
    one input alone (`python bench/selection.py --batch-sizes 1 4 16`), while every input of a batch waits for the
    whole batch, and so does the engine. When 32 clients arrive at once, one at a time lets vLLM prefill each input
    while the next is scored: `python bench/serve.py` at c=32 gave 93.7-98.0 tok/s, 75.2 with batches of 16
    (stock vLLM 100-104). On a GPU a pass of one input leaves the device mostly idle, so batching pays there."""
    if setting is not None:
        return setting
    return 1 if torch.device(device).type == "cpu" else 16


def serve_dtype(folder: Path) -> str:
    """The dtype the model card asks for on CPU (float32 for folders idp-serve did not make)."""
    card = read_card(folder)
    return card.serve_dtype if card else "float32"


def load_banks(banks_dir: Path, model: Fingerprint) -> dict[str, PromptBank]:
    """Every bank under `banks_dir`, verified against the served model (BankError names the one at fault).

    All or nothing, and so are its metrics: the banks are described (`idp_bank_info`, zeroed selection counts)
    only once every one of them loaded, since a failed load leaves none of them serving."""
    try:
        banks = {name: load_bank(banks_dir / name, expect=model) for name in list_banks(banks_dir)}
    except BankError:
        metrics.bank_load_failed()
        raise
    for bank in banks.values():
        metrics.bank_loaded(bank)
    return banks


def choose_default_bank(requested: str | None, banks: dict[str, PromptBank]) -> str | None:
    """The configured default bank (which must exist), else the first by name, else None (IDP off by default)."""
    if requested is not None and requested not in banks:
        raise ValueError(f"default bank {requested!r} is not among the loaded banks {sorted(banks)}")
    return requested or next(iter(sorted(banks)), None)


class BankLoader:
    """Builds a verified `BankSet` from the banks directory: at start-up and on every reload.

    The selection model is loaded once, on the first non-empty bank set, and kept: it is the served model's, which
    does not change while serving, and loading it is the slow part. Calls are serialized by their callers (start-up
    runs once; IdpServing serializes reloads).
    """

    def __init__(self, folder: Path, banks_dir: Path, default_bank: str | None, layers: list[int] | None,
                 device: str) -> None:
        self._folder = folder
        self._device = device
        self._expect = fingerprint(folder)
        self._banks_dir = banks_dir
        self._default_bank = default_bank
        self._layers = layers
        self._model: PreTrainedModel | None = None

    def __call__(self) -> BankSet:
        """Every bank verified, the default resolved, one cached selector per bank; ValueError naming a fault."""
        banks = load_banks(self._banks_dir, self._expect)
        default = choose_default_bank(self._default_bank, banks)
        if banks and self._model is None:
            self._model = load_selection_model(self._folder, self._device)
        selectors = {
            name: CachedSelector(self._model, bank.embeddings, self._layers or bank.selection_layers)
            for name, bank in banks.items()
        }
        return BankSet(banks, selectors, default)


async def _start(settings: ServeSettings) -> _Running:
    folder = resolve(settings.model, settings.models_dir)
    torch.set_num_threads(settings.torch_threads)
    device = selection_device(settings.selection_device)
    loader = BankLoader(folder, settings.banks_dir, settings.default_bank, settings.selection_layers, device)
    bank_set = asyncio.create_task(asyncio.to_thread(loader))
    name = settings.served_model_name or folder.name
    config = EngineConfig(
        model=folder,
        served_model_name=name,
        dtype=settings.dtype or serve_dtype(folder),
        max_model_len=settings.max_model_len,
        kv_cache_gib=settings.kv_cache_gib,
        enforce_eager=settings.enforce_eager,
        caller_uses_cuda=device.startswith("cuda"),
        options=settings.engine_options,
    )
    try:
        engine = Engine.start(config)
    except BaseException:
        await asyncio.gather(bank_set, return_exceptions=True)
        raise
    try:
        banks = await bank_set
    except BaseException:
        engine.shutdown()
        raise
    queue = SelectionQueue(
        selection_batch_size(settings.selection_batch_size, device), settings.selection_wait_ms / 1000.0,
        settings.selection_cache_size,
    )
    queue.start()
    limits = Limits(settings.max_prompts, settings.max_n, settings.max_tokens_limit)
    serving = IdpServing(engine, name, str(folder), banks, queue, limits, loader)
    logger.info("serving %s from %s with banks %s (default %s)", name, folder, sorted(banks.banks), banks.default)
    return _Running(serving, engine, queue)


async def _watch_engine(engine: Engine, exit_after_s: float, on_engine_death: Callable[[], None] | None) -> None:
    """Wait for the engine to die, give in-flight requests and probes `exit_after_s`, then call the hook."""
    await engine.wait_dead()
    logger.error("the vLLM engine died: /health answers 503; handing over to the supervisor in %.1f s",
                 exit_after_s)
    await asyncio.sleep(exit_after_s)
    if on_engine_death is not None:
        on_engine_death()


def _pin_frontend(engine: Engine) -> Callable[[], None]:
    """Move this process's threads off the CPUs vLLM pinned its workers to, if any are left; returns the undo."""
    workers = engine.worker_cpus
    ours = cpus.frontend_cpus(workers) if workers else frozenset()
    if not ours:
        logger.info("frontend threads not pinned (vLLM workers pinned to %s)", sorted(workers) or "no CPU")
        return lambda: None
    return cpus.pin_process(ours)


def _reload_on_sighup(serving: IdpServing) -> Callable[[], None]:
    """Reload the banks on SIGHUP (Unix's "re-read your configuration"), as the admin endpoint does; returns the
    undo. Only the main thread may own signal handlers, so an app served from another thread (tests, embedders)
    reloads through the endpoint only."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        try:
            await serving.reload_banks()
        except ApiError:
            return  # reload_banks logged why; the previous banks keep serving

    def on_signal() -> None:
        task = loop.create_task(reload())
        pending.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(pending.discard)

    loop.add_signal_handler(signal.SIGHUP, on_signal)
    return lambda: loop.remove_signal_handler(signal.SIGHUP)


def create_app(settings: ServeSettings, on_engine_death: Callable[[], None] | None = None) -> FastAPI:
    """A FastAPI app serving `settings.model`; the engine starts with the app's lifespan, not at import.

    `on_engine_death` is called (on the event loop) `settings.engine_death_exit_s` after the engine died; the
    embedder decides what that means (`run` stops the server and exits). Without it the app keeps answering 503.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        running = await _start(settings)
        app.state.serving = running.serving
        watchdog = asyncio.create_task(
            _watch_engine(running.engine, settings.engine_death_exit_s, on_engine_death), name="idp-engine-watchdog"
        )
        stop_sighup = _reload_on_sighup(running.serving)
        unpin = _pin_frontend(running.engine) if settings.pin_frontend else lambda: None
        try:
            yield
        finally:
            unpin()
            stop_sighup()
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)
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
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if settings.api_key is not None:
        app.add_middleware(ApiKey, key=settings.api_key.get_secret_value(), open_paths=settings.open_paths)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type"], expose_headers=["x-idp-mode", "x-idp-bank",
                                                                          "x-idp-prompt", "x-idp-selection-ms"],
        )
    app.add_middleware(metrics.HttpMetrics)  # added last, so outermost: it also counts other middleware's answers
    return app


def run(settings: ServeSettings) -> None:
    """Serve until interrupted (what `idp-serve serve` calls); exit with EXIT_ENGINE_DEAD if the engine died."""
    died = False

    def engine_died() -> None:
        nonlocal died
        died = True
        server.should_exit = True

    config = uvicorn.Config(
        create_app(settings, on_engine_death=engine_died), host=settings.host, port=settings.port,
        log_level=settings.log_level, timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    server.run()
    if died:
        raise SystemExit(EXIT_ENGINE_DEAD)
