"""Every metric idp-serve defines, in one place (prometheus-client, default registry), and the observers that
update them.

They live in the default registry next to vLLM's own `vllm:*` families (vLLM's default stat loggers register
there when the engine's stats are on, the default), so `/metrics` shows both. Metric objects are module globals
on purpose: prometheus-client keys them by name, and one process serves one model.

Label values are bounded by construction: bank and prompt names come from loaded banks (a request naming an
unknown bank or prompt is refused before anything is counted), modes and endpoints are fixed sets, HTTP handlers
are route templates (never a raw path) and statuses are the codes this server answers with. Every bank's label
sets are created at load with zero counts, so a prompt that is never chosen is visible as 0 (not absent) and a
rate() starts from the first selection instead of missing it.

Callers use the observer functions below rather than the metric objects, so label order and the meaning of each
label value live here only.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from server.core.banks import PromptBank
    from server.core.selection import Selection

ENDPOINTS = ("completions", "chat")
"""`endpoint` label values: the generation endpoints, as the servings in server.online.api name them."""
MODES = ("dynamic", "forced", "none")
"""`mode` label values: the IDP modes of server.online.api.protocol."""
NO_BANK = ""
"""Bank and prompt label value of inputs decoded without a soft prompt (mode none). Empty, because an empty label
is Prometheus' 'no value' and no bank or prompt can have an empty name (any other string could be a bank's)."""
_PROMPT_MODES = ("dynamic", "forced")
"""The modes that decode with a bank's prompt (their label sets are created per prompt at load)."""
OTHER_HANDLER = "other"
"""HTTP handler label of a request no route matched (e.g. a 404): its raw path would be unbounded."""

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)

REQUESTS = Counter(
    "idp_requests", "Generation requests accepted (past validation), by endpoint and IDP mode.", ["endpoint", "mode"]
)
PROMPT_TOKENS = Counter(
    "idp_prompt_tokens",
    "Prompt tokens of accepted requests (the caller's tokens, soft prompts excluded).",
    ["endpoint"],
)
COMPLETION_TOKENS = Counter(
    "idp_completion_tokens", "Tokens generated for callers (as reported in `usage`).", ["endpoint"]
)
HTTP_REQUESTS = Counter(
    "idp_http_requests", "HTTP requests answered, by route template and status code.", ["handler", "status"]
)
HTTP_SECONDS = Histogram(
    "idp_http_request_duration_seconds",
    "HTTP request wall time, from arrival to the last byte of the response (the whole stream when streaming).",
    ["handler"],
    buckets=_LATENCY_BUCKETS,
)
SELECTIONS = Counter(
    "idp_selections",
    "Inputs decoded with each soft prompt, by bank, prompt and IDP mode (bank and prompt empty for mode none).",
    ["bank", "prompt", "mode"],
)
SELECTION_SECONDS = Histogram(
    "idp_selection_duration_seconds",
    "Wall time of one selection pass (all inputs of one bank batched in it, across requests).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
SELECTION_BATCH = Histogram(
    "idp_selection_batch_size", "Inputs scored per selection pass.", buckets=(1, 2, 4, 8, 16, 32, 64)
)
SPECULATIONS = Counter(
    "idp_speculations",
    "Guessed prompts of dynamically selected inputs, by what speculation did with them: hit (decoded behind the "
    "guess before the selection pass answered, and the pass chose it), miss (so decoded, aborted, decoded again "
    "behind the chosen prompt) or skipped (not acted on: the bank's recent guesses were too often wrong).",
    ["outcome"],
)
SELECTION_CACHE_QUERIES = Counter(
    "idp_selection_cache_queries", "Inputs looked up in the selection cache (every dynamically selected input)."
)
SELECTION_CACHE_HITS = Counter(
    "idp_selection_cache_hits", "Inputs whose selection was remembered from an earlier identical input (no pass)."
)
SELECTION_MARGIN = Histogram(
    "idp_selection_margin_ratio",
    "Best minus second-best prompt score per dynamically selected input (scores are fractions of the input's "
    "attention mass); small margins mean the bank's prompts are hard to tell apart for this traffic.",
    ["bank"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
BANK = Info(
    "idp_bank", "Each loaded prompt bank: K prompts of m soft tokens, for the model it was trained on.", ["bank"]
)
BANK_PROMPTS = Gauge("idp_bank_prompts", "Soft prompts (K) of each loaded bank.", ["bank"])
BANK_LOADS = Counter("idp_bank_loads", "Successful loads (and reloads) of each bank.", ["bank"])
BANK_LOAD_FAILURES = Counter(
    "idp_bank_load_failures",
    "Bank set loads refused (a bank damaged or for another model, the default bank missing, an explicitly set "
    "banks directory empty). Not labelled by bank: a failed name may not be a bank.",
)


def _zero_fixed_label_sets() -> None:
    """Create the label sets known before any bank loads at zero (see the module doc: 0, not absent)."""
    for endpoint in ENDPOINTS:
        PROMPT_TOKENS.labels(endpoint)
        COMPLETION_TOKENS.labels(endpoint)
        for mode in MODES:
            REQUESTS.labels(endpoint, mode)
    SELECTIONS.labels(NO_BANK, NO_BANK, "none")
    for outcome in ("hit", "miss", "skipped"):
        SPECULATIONS.labels(outcome)


_zero_fixed_label_sets()


# ----- banks --------------------------------------------------------------------------------------------------


def banks_replaced(before: Sequence[PromptBank], after: Sequence[PromptBank]) -> None:
    """A new bank set replaces `before`: describe every bank of `after` and remove the series of banks, and of
    prompts, that `after` no longer has (a renamed or deleted bank must not stay on dashboards, nor its label
    sets pile up across reloads)."""
    kept_banks = {bank.name for bank in after}
    kept_prompts = {(bank.name, prompt) for bank in after for prompt in bank.prompt_names}
    for bank in before:
        for prompt in bank.prompt_names:
            if (bank.name, prompt) not in kept_prompts:
                for mode in _PROMPT_MODES:
                    SELECTIONS.remove(bank.name, prompt, mode)
        if bank.name not in kept_banks:
            for metric in (BANK, BANK_PROMPTS, BANK_LOADS, SELECTION_MARGIN):
                metric.remove(bank.name)
    for bank in after:
        bank_loaded(bank)


def bank_loaded(bank: PromptBank) -> None:
    """Describe a freshly (re)loaded bank and create its label sets at zero."""
    name = bank.name
    BANK_LOADS.labels(name).inc()
    model = bank.manifest.model
    BANK.labels(name).info(
        {
            "k": str(bank.k),
            "m": str(bank.m),
            "hidden_size": str(bank.hidden_size),
            "model_weights": model.weights,
            "model_embedding_sha256": model.embedding_sha256,
        }
    )
    BANK_PROMPTS.labels(name).set(bank.k)
    for prompt in bank.prompt_names:
        for mode in _PROMPT_MODES:
            SELECTIONS.labels(name, prompt, mode)
    SELECTION_MARGIN.labels(name)


def bank_load_failed() -> None:
    """A bank load (start-up or reload) was refused; the log names the bank and the fault."""
    BANK_LOAD_FAILURES.inc()


# ----- requests and selection ---------------------------------------------------------------------------------


def request_accepted(endpoint: str, mode: str, prompt_tokens: int) -> None:
    """A generation request passed validation and will be decoded."""
    REQUESTS.labels(endpoint, mode).inc()
    PROMPT_TOKENS.labels(endpoint).inc(prompt_tokens)


def tokens_generated(endpoint: str, count: int) -> None:
    COMPLETION_TOKENS.labels(endpoint).inc(count)


def prompt_used(mode: str, bank: str | None, prompt: str | None, margin: float | None) -> None:
    """One input is decoded with `prompt` of `bank` (both None in mode none; names come from a loaded bank), and
    `margin` is its selection's margin (None unless selected dynamically)."""
    SELECTIONS.labels(bank or NO_BANK, prompt or NO_BANK, mode).inc()
    if margin is not None and bank:
        SELECTION_MARGIN.labels(bank).observe(margin)


def selection_pass(results: Sequence[Selection]) -> None:
    """One selection pass over a batch of one bank's inputs: its time (shared by the batch) and its size.

    Not labelled by bank: the queue batches by selector object, which a bank reload replaces, not by name."""
    SELECTION_SECONDS.observe(results[0].seconds)
    SELECTION_BATCH.observe(len(results))


def speculation(hit: bool) -> None:
    """One speculative decode was settled; `hit`: the pass chose its guessed prompt and it was kept."""
    SPECULATIONS.labels("hit" if hit else "miss").inc()


def speculation_skipped(guesses: int) -> None:
    """`guesses` guessed inputs were not speculated on: their bank's recent guesses were too often wrong."""
    SPECULATIONS.labels("skipped").inc(guesses)


def selection_cache_lookup(hit: bool) -> None:
    """One input was looked up in the selection cache; `hit`: its selection was remembered."""
    SELECTION_CACHE_QUERIES.inc()
    if hit:
        SELECTION_CACHE_HITS.inc()


# ----- HTTP ---------------------------------------------------------------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class HttpMetrics:
    """Plain ASGI middleware counting every HTTP request by route template and status, and timing it to its last
    byte. Plain ASGI (not `BaseHTTPMiddleware`) so streams and disconnects pass through untouched; it must be the
    outermost middleware so that answers given by other middleware (401, 413) are counted too.

    The handler label is read after the app ran (see `_handler`).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the server error handler answers if the app raises before responding

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            handler = _handler(scope)
            HTTP_REQUESTS.labels(handler, str(status)).inc()
            HTTP_SECONDS.labels(handler).observe(time.perf_counter() - start)


def _handler(scope: Scope) -> str:
    """The route template of a request: the route FastAPI's router matched (it puts it in the scope), else a path
    equal to one of the app's routes (a request answered before routing, e.g. a 401), else `OTHER_HANDLER`."""
    route = scope.get("route")
    if route is not None:
        return str(route.path_format)
    routes = getattr(scope.get("app"), "routes", ())
    return scope["path"] if scope["path"] in {getattr(r, "path", None) for r in routes} else OTHER_HANDLER


def exposition() -> tuple[bytes, str]:
    """The registry in Prometheus text format and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
