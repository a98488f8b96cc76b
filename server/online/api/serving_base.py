"""What every generation endpoint shares: request -> validate -> plan IDP -> tokenize -> select -> generate.

As in vLLM's `entrypoints/openai` (a shared `serving_engine` base, one `serving_*` module per endpoint, routes
in the router), the endpoint modules (serving_completion, serving_chat) build on `ServingBase`. The servings
speak OpenAI's protocol (its request and response models, its errors as `ApiError` with their status) but never
see a request or response object of the web framework: the router does that, and no torch either: the engine
and the selection queue own it.

Each input of a request gets its own IDP plan outcome: in `dynamic` mode the selection queue scores it against
every prompt of the bank, in `forced` mode the named prompt is used, in `none` mode the input is decoded alone.
What was chosen is reported per choice (`choice.idp`) and in headers (`x-idp-*`, comma-separated per input, in
input order). A request plans with the bank set current when it arrives and keeps it to the end, so a bank
reload never changes a request halfway (see server/online/bank_registry.py).

Speculation (`--selection-speculation`, `idle` by default): a dynamic input's decode is submitted with a guessed
prompt (the selection queue's `guess`) while its selection pass runs, so the pass and vLLM's prefill overlap
instead of queueing. The pass still decides: when it picks the guessed prompt the decode goes on, otherwise it is
aborted and the input is decoded behind the selected prompt, so what a caller gets is exactly what it would get
without speculation. `idle` speculates only while vLLM holds no request (a miss then costs idle cores only),
`always` on every dynamic input. Either only while the bank's recent guesses were mostly right (the selection
queue's `guess_rate` at least `min_guess_rate`): a miss is dearer than no speculation, since vLLM finishes the
step it is in before an abort or a new request takes effect, so on traffic whose guesses mostly miss speculation
would add latency. Every guess is scored against the pass's choice, acted on or not, so the rate keeps following
the traffic while speculation waits.

Errors: the caller's mistakes (a bad token id, an input over the context, an unknown bank) are refused with a 400
before anything is selected or decoded; a dead engine or selection worker is a 503; anything else that goes wrong
is this server's fault and reaches the caller as a 500, its traceback in the log.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import BaseModel

from server.core.banks import PromptBank
from server.online import metrics
from server.online.api.errors import invalid, model_not_found, unavailable
from server.online.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    IdpInfo,
    IdpMode,
    IdpRequest,
    Usage,
)
from server.online.api.streams import Started, merge
from server.online.bank_registry import BankRegistry
from server.online.engine import (
    DecodeOutput,
    DecodeParams,
    Engine,
    EngineRequestError,
    EngineUnavailableError,
    Prefix,
)
from server.online.selection_queue import SelectionQueue, SelectionUnavailableError, Selector

logger = logging.getLogger(__name__)

MIN_LOGPROB = -9999.0
"""OpenAI's stand-in for -inf, which JSON cannot carry."""

T = TypeVar("T")
Speculation = Literal["off", "idle", "always"]


@dataclass(frozen=True)
class Input:
    """One input of a request: its token ids, its text (for echo), and the IDP outcome it is decoded with."""

    token_ids: list[int]
    text: str
    prefix: Prefix | None = None
    idp: IdpInfo = field(default_factory=lambda: IdpInfo(mode="none"))


@dataclass(frozen=True)
class Limits:
    """Per-request bounds from ServeSettings (see there for why each exists)."""

    max_prompts: int
    max_n: int
    max_tokens: int | None


@dataclass(frozen=True)
class IdpPlan:
    """How a request's inputs get their prompt: the mode, the bank (with its selector) and, when forced, the
    prompt's row. Holding the bank and selector themselves, not names, is what makes a reload atomic per request."""

    mode: IdpMode
    bank: PromptBank | None = None
    selector: Selector | None = None
    forced: int | None = None


@dataclass(frozen=True)
class Served:
    """What a generation endpoint returns: a response model or an SSE stream of `data:` lines, plus the x-idp-*
    headers."""

    body: BaseModel | AsyncIterator[str]
    headers: dict[str, str]


class ServingBase:
    """The steps every generation endpoint takes; one instance per endpoint, created in the app lifespan."""

    endpoint: str
    """The `endpoint` label of this endpoint's metrics (one of metrics.ENDPOINTS)."""

    def __init__(
        self,
        engine: Engine,
        model_name: str,
        banks: BankRegistry,
        selection: SelectionQueue,
        limits: Limits,
        speculation: Speculation = "off",
        min_guess_rate: float = 0.0,
    ) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.banks = banks
        self.selection = selection
        self.limits = limits
        self.speculation = speculation
        self.min_guess_rate = min_guess_rate

    def check_model(self, model: str) -> None:
        """404 for another model's name; 503 (before any stream starts) once the engine has died."""
        if model != self.model_name:
            raise model_not_found(model)
        if self.engine.errored:
            raise unavailable("the engine is not serving")

    def check_limits(self, n: int, max_tokens: int | None, max_tokens_param: str) -> None:
        """400 for `n` or max_tokens over the server's configured limits (see ServeSettings)."""
        if n > self.limits.max_n:
            raise invalid(f"n={n} is over this server's limit of {self.limits.max_n}", param="n")
        cap = self.limits.max_tokens
        if cap is not None and max_tokens is not None and max_tokens > cap:
            raise invalid(
                f"{max_tokens_param}={max_tokens} is over this server's limit of {cap}", param=max_tokens_param
            )

    def plan(self, idp: IdpRequest | None) -> IdpPlan:
        """Resolve the request's `idp` field against the loaded banks; 400 naming what is wrong."""
        idp = idp or IdpRequest()
        bank_set = self.banks.current  # read once: the whole request plans with this one set
        bank_name = idp.bank or bank_set.default
        mode = idp.mode or ("forced" if idp.prompt else "dynamic" if bank_name else "none")
        if idp.bank is not None and idp.bank not in bank_set.banks:
            raise invalid(
                f"unknown bank '{idp.bank}'; available: {sorted(bank_set.banks)}",
                param="idp.bank",
                code="bank_not_found",
            )
        if mode == "none":
            if idp.prompt is not None:
                raise invalid("idp.prompt cannot be used with mode 'none'", param="idp.prompt")
            return IdpPlan("none")
        if bank_name is None:
            raise invalid(f"mode '{mode}' needs a prompt bank and none is loaded", param="idp.bank")
        bank = bank_set.banks[bank_name]
        if mode == "dynamic":
            if idp.prompt is not None:
                raise invalid("idp.prompt forces a prompt: use mode 'forced' (or leave mode out)", param="idp.mode")
            return IdpPlan("dynamic", bank, bank_set.selectors[bank_name])
        if idp.prompt is None:
            raise invalid("mode 'forced' needs idp.prompt", param="idp.prompt")
        if idp.prompt not in bank.prompt_names:
            raise invalid(
                f"unknown prompt '{idp.prompt}' in bank '{bank.name}'; available: {list(bank.prompt_names)}",
                param="idp.prompt",
                code="prompt_not_found",
            )
        return IdpPlan("forced", bank, forced=bank.index(idp.prompt))

    async def decode(
        self, request_id: str, prompts: list[tuple[list[int], str]], plan: IdpPlan, params: DecodeParams
    ) -> tuple[list[Input], AsyncIterator[tuple[int, DecodeOutput]]]:
        """Check every input, give each its prefix (selected, forced or none), count the request, and return the
        inputs with their decodes, merged and counted as they pass; engine errors become API errors."""
        self.check_inputs(prompts, plan, params.max_tokens)
        guesses = self._guesses(prompts, plan)
        started = self._speculate(request_id, prompts, plan, params, guesses)
        try:
            inputs = await self.choose(prompts, plan)
        except BaseException:  # a failed selection or a caller gone: nobody will read the speculative decodes
            await asyncio.gather(*(decode.abort() for _, decode in started.values()))
            raise
        self._score_guesses(plan, guesses, inputs)
        self.observe_accepted(plan.mode, inputs)
        streams = []
        for i, item in enumerate(inputs):
            guess, decode = started.get(i, (None, None))
            if decode is not None:
                hit = item.prefix is not None and item.prefix.index == guess
                metrics.speculation(hit)
                if hit:
                    streams.append(decode.stream())
                    continue
                await decode.abort()
            streams.append(self.engine.generate(f"{request_id}-{i}", item.token_ids, item.prefix, params))
        return inputs, _count_generated(self.endpoint, params, _translate_errors(merge(streams)))

    def check_inputs(self, prompts: list[tuple[list[int], str]], plan: IdpPlan, max_tokens: int) -> None:
        """400 naming the input and the problem for anything the engine would refuse (ids in the vocabulary,
        [prefix | input | max_tokens] within the context), before anything is selected or decoded."""
        # Every prompt of a bank has the same length m, so row 0 stands for whichever prompt gets chosen.
        any_prefix = None if plan.bank is None else Prefix(plan.bank, 0)
        for i, (token_ids, _) in enumerate(prompts):
            try:
                self.engine.check(token_ids, any_prefix, max_tokens)
            except EngineRequestError as error:
                where = f"prompt {i}: " if len(prompts) > 1 else ""
                raise invalid(where + str(error), param=error.param) from error

    def _guesses(self, prompts: list[tuple[list[int], str]], plan: IdpPlan) -> dict[int, int]:
        """Per input to be selected, the selection queue's guess of its prompt row; none when speculation is off,
        the bank single or there is nothing to guess from."""
        if self.speculation == "off" or plan.selector is None or plan.bank is None or plan.bank.k == 1:
            return {}  # (only a dynamic plan has a selector)
        guesses = {i: self.selection.guess(plan.selector, token_ids) for i, (token_ids, _) in enumerate(prompts)}
        return {i: guess for i, guess in guesses.items() if guess is not None}

    def _speculate(
        self,
        request_id: str,
        prompts: list[tuple[list[int], str]],
        plan: IdpPlan,
        params: DecodeParams,
        guesses: dict[int, int],
    ) -> dict[int, tuple[int, Started[DecodeOutput]]]:
        """Per guessed input, a decode submitted now behind the guessed prompt row (see the module doc); none
        when the engine is busy under `idle` or the bank's recent guesses were too often wrong."""
        if not guesses or plan.bank is None or plan.selector is None:
            return {}
        if self.speculation == "idle" and self.engine.unfinished_requests() > 0:
            return {}
        if self.selection.guess_rate(plan.selector) < self.min_guess_rate:
            metrics.speculation_skipped(len(guesses))
            return {}
        started = {}
        for i, guess in guesses.items():
            source = self.engine.generate(f"{request_id}-{i}-guess", prompts[i][0], Prefix(plan.bank, guess), params)
            started[i] = (guess, Started(source))
        return started

    def _score_guesses(self, plan: IdpPlan, guesses: dict[int, int], inputs: list[Input]) -> None:
        """Tell the selection queue how each guess fared against the pass, for inputs a pass scored (a
        remembered selection is its own guess and proves nothing about the traffic)."""
        if plan.selector is None:
            return
        for i, guess in guesses.items():
            chosen = inputs[i].prefix
            if chosen is not None and inputs[i].idp.selection_ms:
                self.selection.score_guess(plan.selector, guess, chosen.index)

    async def choose(self, prompts: list[tuple[list[int], str]], plan: IdpPlan) -> list[Input]:
        """Each input with its prefix: selected (one batched pass), forced, or none; a dead selection worker is a
        503, and whatever the selector raises on checked inputs is this server's fault (a 500)."""
        if plan.bank is None:
            return [Input(ids, text) for ids, text in prompts]
        if plan.mode == "forced":
            info = IdpInfo(mode="forced", bank=plan.bank.name, prompt=plan.bank.prompt_names[plan.forced])
            return [Input(ids, text, Prefix(plan.bank, plan.forced), info) for ids, text in prompts]
        if plan.bank.k == 1:  # nothing to choose: a pass would only cost time to confirm the one prompt
            info = IdpInfo(mode="dynamic", bank=plan.bank.name, prompt=plan.bank.prompt_names[0], selection_ms=0.0)
            return [Input(ids, text, Prefix(plan.bank, 0), info) for ids, text in prompts]
        try:
            selections = await self.selection.select(plan.selector, [ids for ids, _ in prompts])
        except SelectionUnavailableError as error:
            raise unavailable("prompt selection is not serving", code="selection_unavailable") from error
        names = plan.bank.prompt_names
        inputs = []
        for (ids, text), chosen in zip(prompts, selections, strict=True):
            info = IdpInfo(
                mode="dynamic",
                bank=plan.bank.name,
                prompt=names[chosen.index],
                scores=dict(zip(names, chosen.scores, strict=True)),
                margin=chosen.margin,
                selection_ms=chosen.seconds * 1000.0,
            )
            inputs.append(Input(ids, text, Prefix(plan.bank, chosen.index), info))
        return inputs

    def observe_accepted(self, mode: IdpMode, inputs: list[Input]) -> None:
        """Count a request that will be decoded: its prompt tokens and, per input, the prompt it is decoded with
        (names from a loaded bank, never from the request) and, when selected, the selection's margin."""
        metrics.request_accepted(self.endpoint, mode, sum(len(x.token_ids) for x in inputs))
        for item in inputs:
            metrics.prompt_used(item.idp.mode, item.idp.bank, item.idp.prompt, item.idp.margin)


def sampling_fields(request: CompletionRequest | ChatCompletionRequest, max_tokens: int) -> dict[str, Any]:
    """The `DecodeParams` fields both endpoints take from their request alike."""
    return {
        "max_tokens": max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "n": request.n,
        "stop": request.stop_list,
        "seed": request.seed,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
        "ignore_eos": request.ignore_eos,
    }


def idp_headers(inputs: list[Input]) -> dict[str, str]:
    """x-idp-* headers: one comma-separated value per input ('-' where it has none)."""

    def column(get: Callable[[IdpInfo], Any]) -> str:
        return ",".join("-" if get(x.idp) is None else str(get(x.idp)) for x in inputs)

    return {
        "x-idp-mode": column(lambda i: i.mode),
        "x-idp-bank": column(lambda i: i.bank),
        "x-idp-prompt": column(lambda i: i.prompt),
        "x-idp-selection-ms": column(lambda i: None if i.selection_ms is None else f"{i.selection_ms:.3f}"),
    }


def usage(max_tokens: int, inputs: list[Input], generated: list[int]) -> Usage:
    """`usage` of a request: its prompt tokens, and the tokens generated per input (none when max_tokens=0,
    where the one token vLLM must decode is dropped)."""
    prompt = sum(len(x.token_ids) for x in inputs)
    completion = sum(generated) if max_tokens > 0 else 0
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def generated_tokens(final: DecodeOutput) -> int:
    """Tokens generated for all choices of one input's final output."""
    return sum(len(c.token_ids) for c in final.choices)


async def _count_generated(
    endpoint: str, params: DecodeParams, outputs: AsyncIterator[tuple[int, DecodeOutput]]
) -> AsyncIterator[tuple[int, DecodeOutput]]:
    """`outputs`, counting the tokens generated for the caller as they pass (each output holds only new tokens
    when streaming, all of them otherwise). With max_tokens=0 the one token vLLM must decode is dropped, and so
    not counted, as in `usage`."""
    async for index, out in outputs:
        if params.max_tokens > 0:
            metrics.tokens_generated(endpoint, generated_tokens(out))
        yield index, out


async def _translate_errors(outputs: AsyncIterator[T]) -> AsyncIterator[T]:
    try:
        async for item in outputs:
            yield item
    except EngineRequestError as error:
        raise invalid(str(error), param=error.param) from error
    except EngineUnavailableError as error:
        raise unavailable(f"the engine is not serving: {error}") from error
