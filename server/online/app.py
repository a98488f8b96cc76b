"""The app factory and its lifespan: the composition root, where every piece of serving state is created and
torn down.

Start-up: resolve the model folder, then start vLLM while, in a thread, the prompt banks load and are verified
against the model's fingerprint, the selection model loads and each bank's prompt KV is computed; the two overlap
because the engine core runs in its own process. A bank that fails verification stops the start (the engine is
shut down again): a server quietly missing a bank would answer differently from what its operator configured.
The same loader serves `POST /admin/banks/reload` and SIGHUP, where a bank that fails is refused and the loaded
set keeps serving (server/online/bank_registry.py). Where the selection pass runs and which CPUs the frontend
uses is server/online/placement.py's policy.

Fatal faults: vLLM does not restart a dead engine core in-process, the selection worker is not restarted either
(the bug that killed it would again), and a half-alive server is the worst case for Kubernetes (it keeps routing
traffic to it). So once either dies, /health answers 503 at once, the requests it fails get an error (5xx; streams
get an error event), and after `engine_death_exit_s` (time for those answers to go out and for probes to see 503)
the app calls its `on_fatal` hook; `run` makes that stop uvicorn and exit non-zero (EXIT_ENGINE_DEAD,
EXIT_SELECTION_DEAD), so the container restarts fresh.

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

from server import __version__
from server.core.banks import BankError
from server.core.identity import read_card, resolve, servable
from server.online import metrics
from server.online.api.errors import install_error_handlers
from server.online.api.middleware import ApiKey, BodyLimit
from server.online.api.router import router
from server.online.api.serving_base import Limits
from server.online.api.serving_chat import ChatServing
from server.online.api.serving_completion import CompletionServing
from server.online.api.serving_models import ModelsServing
from server.online.bank_registry import BankLoader, BankRegistry, require_banks
from server.online.engine import Engine, EngineConfig
from server.online.placement import pin_frontend, selection_batch_size, selection_device, selection_threads
from server.online.selection_queue import SelectionQueue
from server.online.settings import ServeSettings

logger = logging.getLogger(__name__)

EXIT_START_FAILED = 1
"""Exit status of `run` when the app did not start (a bank refused, the engine failed to start, ...)."""
EXIT_ENGINE_DEAD = 3
"""Exit status of `run` after the engine died (non-zero, so any supervisor restarts the process)."""
EXIT_SELECTION_DEAD = 4
"""Exit status of `run` after the selection worker died."""


@dataclass
class _Running:
    """What the lifespan started and must stop, and the servings it hands to the router."""

    engine: Engine
    selection: SelectionQueue
    banks: BankRegistry
    completion: CompletionServing
    chat: ChatServing
    models: ModelsServing

    async def stop(self) -> None:
        await self.selection.stop()
        self.engine.shutdown()


def serve_dtype(folder: Path) -> str:
    """The dtype the model card asks for on CPU (float32 for folders idp-serve did not make)."""
    card = read_card(folder)
    return card.serve_dtype if card else "float32"


def _banks_required(settings: ServeSettings) -> bool:
    """Whether the banks directory must hold a bank: the operator named it (flag or environment) rather than
    leaving the default, and did not allow it to be empty."""
    return "banks_dir" in settings.model_fields_set and not settings.allow_empty_banks_dir


async def _start(settings: ServeSettings) -> _Running:
    folder = servable(resolve(settings.model, settings.models_dir))
    torch.set_num_threads(settings.torch_threads)
    device = selection_device(settings.selection_device)
    loader = BankLoader(
        folder,
        settings.banks_dir,
        settings.default_bank,
        settings.selection_layers,
        device,
        required=_banks_required(settings),
        allow_weights_mismatch=settings.allow_bank_weights_mismatch,
    )
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
        allocator=settings.engine_allocator,
        options=settings.engine_options,
    )
    try:
        engine = Engine.start(config)
    except BaseException:
        await asyncio.gather(bank_set, return_exceptions=True)
        raise
    try:
        banks = BankRegistry(loader, await bank_set)
    except BaseException:
        engine.shutdown()
        raise
    threads = selection_threads(
        settings.selection_idle_threads or None,
        settings.torch_threads,
        device,
        engine.unfinished_requests,
        engine.worker_cpus,
        settings.pin_frontend,
    )
    queue = SelectionQueue(
        selection_batch_size(settings.selection_batch_size, device),
        settings.selection_wait_ms / 1000.0,
        settings.selection_cache_size,
        threads,
    )
    queue.start()
    limits = Limits(settings.max_prompts, settings.max_n, settings.max_tokens_limit)
    speculation = (settings.selection_speculation, settings.selection_speculation_min_hit_rate)
    current = banks.current
    logger.info("serving %s from %s with banks %s (default %s)", name, folder, sorted(current.banks), current.default)
    return _Running(
        engine,
        queue,
        banks,
        completion=CompletionServing(engine, name, banks, queue, limits, *speculation),
        chat=ChatServing(engine, name, banks, queue, limits, *speculation),
        models=ModelsServing(engine, name, str(folder), banks, queue),
    )


async def _supervise(running: _Running, exit_after_s: float, on_fatal: Callable[[int], None] | None) -> None:
    """Wait for the engine or the selection worker to die, give in-flight requests and probes `exit_after_s`,
    then call the hook. Both deaths already show on /health (503) and fail requests; this only ends the process."""
    engine_dead = asyncio.create_task(running.engine.wait_dead())
    selection_dead = asyncio.create_task(running.selection.wait_failed())
    try:
        await asyncio.wait({engine_dead, selection_dead}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (engine_dead, selection_dead):
            task.cancel()
    if engine_dead.done() and not engine_dead.cancelled():
        what, status = "the vLLM engine", EXIT_ENGINE_DEAD
    else:
        what, status = "the selection worker", EXIT_SELECTION_DEAD
    logger.error("%s died: /health answers 503; handing over to the supervisor in %.1f s", what, exit_after_s)
    await asyncio.sleep(exit_after_s)
    if on_fatal is not None:
        on_fatal(status)


def _reload_on_sighup(banks: BankRegistry) -> Callable[[], None]:
    """Reload the banks on SIGHUP (Unix's "re-read your configuration"), as the admin endpoint does; returns the
    undo. Only the main thread may own signal handlers, so an app served from another thread (tests, embedders)
    reloads through the endpoint only."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        try:
            await banks.reload()
        except BankError:
            return  # reload logged which bank and why; the previous banks keep serving
        except Exception:
            logger.exception("bank reload on SIGHUP failed, the previous banks keep serving")

    def on_signal() -> None:
        task = loop.create_task(reload())
        pending.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(pending.discard)

    loop.add_signal_handler(signal.SIGHUP, on_signal)
    return lambda: loop.remove_signal_handler(signal.SIGHUP)


def create_app(settings: ServeSettings, on_fatal: Callable[[int], None] | None = None) -> FastAPI:
    """A FastAPI app serving `settings.model`; the engine starts with the app's lifespan, not at import.

    `on_fatal(exit_status)` is called (on the event loop) `settings.engine_death_exit_s` after the engine
    (EXIT_ENGINE_DEAD) or the selection worker (EXIT_SELECTION_DEAD) died; the embedder decides what that means
    (`run` stops the server and exits with that status). Without it the app keeps answering 503.

    A banks directory named explicitly that holds no bank is refused here, before anything starts (BankError).
    """
    if _banks_required(settings):
        require_banks(settings.banks_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        running = await _start(settings)
        app.state.engine = running.engine
        app.state.completion_serving = running.completion
        app.state.chat_serving = running.chat
        app.state.models_serving = running.models
        supervisor = asyncio.create_task(
            _supervise(running, settings.engine_death_exit_s, on_fatal), name="idp-supervisor"
        )
        stop_sighup = _reload_on_sighup(running.banks)
        unpin = pin_frontend(running.engine.worker_cpus) if settings.pin_frontend else lambda: None
        try:
            yield
        finally:
            unpin()
            stop_sighup()
            supervisor.cancel()
            await asyncio.gather(supervisor, return_exceptions=True)
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
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type"],
            expose_headers=["x-idp-mode", "x-idp-bank", "x-idp-prompt", "x-idp-selection-ms"],
        )
    app.add_middleware(metrics.HttpMetrics)  # added last, so outermost: it also counts other middleware's answers
    return app


def run(settings: ServeSettings) -> None:
    """Serve until interrupted (what `idp-serve serve` calls). Exit with EXIT_ENGINE_DEAD or EXIT_SELECTION_DEAD
    when that part died, and with EXIT_START_FAILED when the app did not start (uvicorn logged why)."""
    fatal: int | None = None

    def on_fatal(status: int) -> None:
        nonlocal fatal
        fatal = status
        server.should_exit = True

    config = uvicorn.Config(
        create_app(settings, on_fatal=on_fatal),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    try:
        server.run()
    except SystemExit as error:  # uvicorn's own status for a failed start is 3, which is EXIT_ENGINE_DEAD here
        if server.started:
            raise
        raise SystemExit(EXIT_START_FAILED) from error
    if fatal is not None:
        raise SystemExit(fatal)
    if not server.started:
        raise SystemExit(EXIT_START_FAILED)
