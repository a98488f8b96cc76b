"""Serving logic: request -> validate -> tokenize -> select a prompt -> generate -> OpenAI response.

No HTTP here (routes live in router.py) and no torch (the engine and the selectors own it). Each input of a
request gets its own IDP plan outcome: in `dynamic` mode the selection queue scores it against every prompt of
the bank, in `forced` mode the named prompt is used, in `none` mode the input is decoded alone. What was chosen
is reported per choice (`choice.idp`) and in headers (`x-idp-*`, comma-separated per input, in input order).

Echo: prompt logprobs come from the engine itself (see engine.py: mixed-mode prompt embeds), for the caller's
tokens only; the soft prompt's virtual tokens are never reported, and the first prompt token's logprob is null
as in OpenAI's API (under IDP it is conditioned on the soft prompt, but clients expect null there).

Bank reload: the banks, their selectors and the default bank form one immutable `BankSet`. A request reads the
current set once, when it plans, and carries the bank and selector it planned with to the end; a reload builds
a whole new set off the event loop and swaps the reference in one assignment. So every request sees the old
set or the new one, never a mix, and a set that fails to load is never swapped in.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, TypeVar

from pydantic import BaseModel

from server.online import metrics
from server.online.api.errors import ApiError, invalid, model_not_found, unavailable
from server.online.api.protocol import (
    AssistantMessage,
    BankCard,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatStreamChoice,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    IdpInfo,
    IdpMode,
    IdpRequest,
    ModelCard,
    ModelIdp,
    ModelList,
    TopLogprob,
    Usage,
)
from server.online.selection_queue import SelectionQueue, Selector
from server.core.banks import PromptBank
from server.online.engine import (
    ChoiceDelta,
    DecodeOutput,
    DecodeParams,
    Engine,
    EngineRequestError,
    EngineUnavailableError,
    Prefix,
    TokenLogprob,
)

logger = logging.getLogger(__name__)

MIN_LOGPROB = -9999.0
"""OpenAI's stand-in for -inf, which JSON cannot carry."""

T = TypeVar("T")


@dataclass(frozen=True)
class Input:
    """One input of a request: its token ids, its text (for echo), and the IDP outcome it is decoded with."""

    token_ids: list[int]
    text: str
    prefix: Prefix | None = None
    idp: IdpInfo = field(default_factory=lambda: IdpInfo(mode="none"))


@dataclass(frozen=True)
class BankSet:
    """The loaded banks with one selector each and the default bank: swapped whole on reload, never edited."""

    banks: Mapping[str, PromptBank]
    selectors: Mapping[str, Selector]
    default: str | None


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
    """What a route returns: a response model or an SSE stream of `data:` lines, plus the x-idp-* headers."""

    body: BaseModel | AsyncIterator[str]
    headers: dict[str, str]


class IdpServing:
    """Everything a request needs, created once in the app lifespan and shared by all requests."""

    def __init__(
        self,
        engine: Engine,
        model_name: str,
        model_root: str,
        bank_set: BankSet,
        selection: SelectionQueue,
        limits: Limits,
        load_banks: Callable[[], BankSet],
    ) -> None:
        """`load_banks` builds a fresh, verified BankSet from disk (blocking; run off the loop by reload_banks)."""
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.model_root = model_root
        self.bank_set = bank_set
        self.selection = selection
        self.limits = limits
        self._load_banks = load_banks
        self._reload_lock = asyncio.Lock()

    @property
    def banks(self) -> Mapping[str, PromptBank]:
        return self.bank_set.banks

    @property
    def default_bank(self) -> str | None:
        return self.bank_set.default

    async def reload_banks(self) -> ModelIdp:
        """Load the banks directory again and swap it in whole; 409 (the old set keeps serving) if any bank fails.

        Reloads are serialized so two concurrent ones cannot finish out of order and leave the older set in place.
        """
        async with self._reload_lock:
            try:
                fresh = await asyncio.to_thread(self._load_banks)
            except ValueError as error:  # BankError, or a configured default bank that is gone
                logger.warning("bank reload refused, the previous banks keep serving: %s", error)
                raise ApiError(
                    f"bank reload refused, the previous banks keep serving: {error}", HTTPStatus.CONFLICT,
                    code="bank_reload_refused",
                ) from error
            self.bank_set = fresh
        logger.info("banks reloaded: %s (default %s)", sorted(fresh.banks), fresh.default)
        return _bank_cards(fresh)

    # ----- models, health -------------------------------------------------------------------------------------

    def models(self) -> ModelList:
        card = ModelCard(
            id=self.model_name,
            root=self.model_root,
            max_model_len=self.engine.max_model_len,
            idp=_bank_cards(self.bank_set),
        )
        return ModelList(data=[card])

    async def healthy(self) -> bool:
        return await self.engine.is_healthy()

    # ----- completions ----------------------------------------------------------------------------------------

    async def completion(self, request: CompletionRequest) -> Served:
        self._check_model(request.model)
        self._check_limits(request.n, request.max_tokens, "max_tokens")
        plan = self._plan(request.idp)
        inputs = await self._prepare(self._completion_prompts(request.prompt), plan, request.max_tokens)
        _observe_accepted("completions", plan.mode, inputs)
        params = DecodeParams(
            **_sampling_fields(request, request.max_tokens),
            logprobs=request.logprobs,
            prompt_logprobs=request.logprobs if request.echo else None,
            stream=request.stream,
        )
        request_id = f"cmpl-{uuid.uuid4().hex}"
        outputs = _count_generated("completions", params, self._generate(request_id, inputs, params))
        if request.stream:
            return Served(_sse(self._completion_stream(request, request_id, inputs, outputs)), _headers(inputs))
        finals = await _collect(outputs, len(inputs))
        return Served(self._completion_response(request, request_id, inputs, finals), _headers(inputs))

    def _completion_prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[tuple[list[int], str]]:
        """(token ids, text) per input; strings are tokenized as vLLM does for completions (special tokens on).

        The number of inputs is checked before any is tokenized, and token ids before any is decoded (a tokenizer
        may raise on an id it does not know, and that is the caller's mistake, not a server fault).
        """
        if isinstance(prompt, str):
            prompt = [prompt]
        if isinstance(prompt[0], int):
            prompt = [prompt]
        if len(prompt) > self.limits.max_prompts:
            raise invalid(
                f"{len(prompt)} prompts in one request; this server accepts at most {self.limits.max_prompts}",
                param="prompt", code="too_many_prompts",
            )
        for i, ids in enumerate(p for p in prompt if not isinstance(p, str)):
            bad = next((t for t in ids if t >= self.engine.vocab_size), None)
            if bad is not None:
                raise invalid(f"prompt {i}: token id {bad} is out of range [0, {self.engine.vocab_size})",
                              param="prompt")
        return [
            (self.tokenizer.encode(p), p) if isinstance(p, str) else (list(p), self.tokenizer.decode(p))
            for p in prompt
        ]

    def _completion_response(
        self, request: CompletionRequest, request_id: str, inputs: list[Input], finals: list[DecodeOutput]
    ) -> CompletionResponse:
        choices = []
        for i, (item, final) in enumerate(zip(inputs, finals, strict=True)):
            for delta in sorted(final.choices, key=lambda c: c.index):
                text, logprobs = self._completion_content(request, item, delta, final.prompt_logprobs, True, 0)
                choices.append(
                    CompletionChoice(
                        index=i * request.n + delta.index, text=text, logprobs=logprobs,
                        finish_reason=delta.finish_reason, idp=item.idp,
                    )
                )
        return CompletionResponse(
            id=request_id, model=self.model_name, choices=choices, usage=_usage(request.max_tokens, inputs, finals)
        )

    def _completion_content(
        self,
        request: CompletionRequest,
        item: Input,
        delta: ChoiceDelta,
        prompt_logprobs: Sequence[TokenLogprob | None] | None,
        echo_now: bool,
        offset: int,
    ) -> tuple[str, CompletionLogprobs | None]:
        """Text and logprobs of one choice (or of one streamed delta), the prompt first if echoed now.

        With max_tokens=0 the engine still decodes one token (vLLM needs one); it is dropped here.
        """
        generated = request.max_tokens > 0
        text = delta.text if generated else ""
        token_ids = list(delta.token_ids) if generated else []
        positions: list[TokenLogprob | None] = list(delta.logprobs or ()) if generated else []
        if request.echo and echo_now:
            text = item.text + text
            token_ids = item.token_ids + token_ids
            positions = list(prompt_logprobs or [None] * len(item.token_ids)) + positions
        if request.logprobs is None:
            return text, None
        return text, self._legacy_logprobs(token_ids, positions, offset)

    def _legacy_logprobs(
        self, token_ids: Sequence[int], positions: Sequence[TokenLogprob | None], offset: int
    ) -> CompletionLogprobs:
        """OpenAI's completions logprobs; a position without a logprob (the first prompt token) gets nulls."""
        result = CompletionLogprobs()
        for token_id, position in zip(token_ids, positions, strict=True):
            token = self.tokenizer.decode([token_id]) if position is None else position.token
            result.text_offset.append(offset)
            result.tokens.append(token)
            result.token_logprobs.append(None if position is None else max(position.logprob, MIN_LOGPROB))
            result.top_logprobs.append(
                None if position is None else {t: max(lp, MIN_LOGPROB) for t, lp in position.top}
            )
            offset += len(token)
        return result

    async def _completion_stream(
        self,
        request: CompletionRequest,
        request_id: str,
        inputs: list[Input],
        outputs: AsyncIterator[tuple[int, DecodeOutput]],
    ) -> AsyncIterator[BaseModel]:
        created = int(time.time())
        offsets: dict[int, int] = {}
        totals = [0] * len(inputs)
        prompt_logprobs: dict[int, tuple[TokenLogprob | None, ...]] = {}
        async for i, out in outputs:
            if out.prompt_logprobs is not None:
                prompt_logprobs[i] = out.prompt_logprobs
            for delta in out.choices:
                index = i * request.n + delta.index
                first = index not in offsets
                text, logprobs = self._completion_content(
                    request, inputs[i], delta, prompt_logprobs.get(i), first, offsets.get(index, 0)
                )
                totals[i] += len(delta.token_ids)
                if not (text or delta.finish_reason or first):
                    continue
                if logprobs is not None and logprobs.tokens:
                    offsets[index] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
                else:
                    offsets.setdefault(index, 0)
                choice = CompletionChoice(
                    index=index, text=text, logprobs=logprobs, finish_reason=delta.finish_reason,
                    idp=inputs[i].idp if first else None,
                )
                yield CompletionResponse(id=request_id, created=created, model=self.model_name, choices=[choice])
        if request.stream_options and request.stream_options.include_usage:
            usage = _stream_usage(request.max_tokens, inputs, totals)
            yield CompletionResponse(id=request_id, created=created, model=self.model_name, choices=[], usage=usage)

    # ----- chat completions -----------------------------------------------------------------------------------

    async def chat(self, request: ChatCompletionRequest) -> Served:
        self._check_model(request.model)
        requested = request.max_completion_tokens or request.max_tokens
        self._check_limits(request.n, requested, "max_completion_tokens")
        plan = self._plan(request.idp)
        messages = [{"role": m.role, "content": m.text} for m in request.messages]
        try:
            rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as error:  # a template refusing these messages is the caller's problem
            raise invalid(f"cannot apply the chat template: {error}", param="messages") from error
        token_ids = self.tokenizer.encode(rendered, add_special_tokens=False)
        inputs = await self._prepare([(token_ids, rendered)], plan, requested or 1)
        max_tokens = requested or min(self._room_left(inputs[0]), self.limits.max_tokens or self.engine.max_model_len)
        _observe_accepted("chat", plan.mode, inputs)
        params = DecodeParams(
            **_sampling_fields(request, max_tokens),
            logprobs=(request.top_logprobs or 0) if request.logprobs else None,
            stream=request.stream,
        )
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        outputs = _count_generated("chat", params, self._generate(request_id, inputs, params))
        if request.stream:
            return Served(_sse(self._chat_stream(request, request_id, inputs[0], outputs)), _headers(inputs))
        (final,) = await _collect(outputs, 1)
        choices = [
            ChatChoice(
                index=delta.index, message=AssistantMessage(content=delta.text),
                logprobs=_chat_logprobs(delta, request.top_logprobs or 0), finish_reason=delta.finish_reason,
                idp=inputs[0].idp,
            )
            for delta in sorted(final.choices, key=lambda c: c.index)
        ]
        usage = _usage(max_tokens, inputs, [final])
        return Served(ChatCompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage),
                      _headers(inputs))

    def _room_left(self, item: Input) -> int:
        """Default chat max_tokens: whatever context the prompt (and its soft prompt) leaves."""
        virtual = 0 if item.prefix is None else item.prefix.bank.m
        return self.engine.max_model_len - virtual - len(item.token_ids)

    async def _chat_stream(
        self,
        request: ChatCompletionRequest,
        request_id: str,
        item: Input,
        outputs: AsyncIterator[tuple[int, DecodeOutput]],
    ) -> AsyncIterator[BaseModel]:
        chunk = _chunk_factory(request_id, self.model_name, int(time.time()))
        for index in range(request.n):
            yield chunk([ChatStreamChoice(index=index, delta=ChatDelta(role="assistant", content=""), idp=item.idp)])
        completion_tokens = 0
        async for _, out in outputs:
            for delta in out.choices:
                completion_tokens += len(delta.token_ids)
                if not (delta.text or delta.finish_reason):
                    continue
                logprobs = _chat_logprobs(delta, request.top_logprobs or 0) if request.logprobs else None
                choice = ChatStreamChoice(
                    index=delta.index, delta=ChatDelta(content=delta.text), logprobs=logprobs,
                    finish_reason=delta.finish_reason,
                )
                yield chunk([choice])
        if request.stream_options and request.stream_options.include_usage:
            yield chunk([], usage=_stream_usage(1, [item], [completion_tokens]))

    # ----- shared steps ---------------------------------------------------------------------------------------

    def _check_model(self, model: str) -> None:
        """404 for another model's name; 503 (before any stream starts) once the engine has died."""
        if model != self.model_name:
            raise model_not_found(model)
        if self.engine.errored:
            raise unavailable("the engine is not serving")

    def _check_limits(self, n: int, max_tokens: int | None, max_tokens_param: str) -> None:
        """400 for `n` or max_tokens over the server's configured limits (see ServeSettings)."""
        if n > self.limits.max_n:
            raise invalid(f"n={n} is over this server's limit of {self.limits.max_n}", param="n")
        cap = self.limits.max_tokens
        if cap is not None and max_tokens is not None and max_tokens > cap:
            raise invalid(
                f"{max_tokens_param}={max_tokens} is over this server's limit of {cap}", param=max_tokens_param
            )

    def _plan(self, idp: IdpRequest | None) -> IdpPlan:
        """Resolve the request's `idp` field against the loaded banks; 400 naming what is wrong."""
        idp = idp or IdpRequest()
        bank_set = self.bank_set  # read once: the whole request plans with this one set (see the module doc)
        bank_name = idp.bank or bank_set.default
        mode = idp.mode or ("forced" if idp.prompt else "dynamic" if bank_name else "none")
        if idp.bank is not None and idp.bank not in bank_set.banks:
            raise invalid(
                f"unknown bank '{idp.bank}'; available: {sorted(bank_set.banks)}", param="idp.bank",
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
                param="idp.prompt", code="prompt_not_found",
            )
        return IdpPlan("forced", bank, forced=bank.index(idp.prompt))

    async def _prepare(self, prompts: list[tuple[list[int], str]], plan: IdpPlan, max_tokens: int) -> list[Input]:
        """Check every input, then give each its prefix: selected (one batched pass), forced, or none."""
        # Every prompt of a bank has the same length m, so row 0 stands for whichever prompt gets chosen.
        any_prefix = None if plan.bank is None else Prefix(plan.bank, 0)
        for i, (token_ids, _) in enumerate(prompts):
            try:
                self.engine.check(token_ids, any_prefix, max_tokens)
            except EngineRequestError as error:
                where = f"prompt {i}: " if len(prompts) > 1 else ""
                raise invalid(where + str(error), param=error.param) from error
        if plan.bank is None:
            return [Input(ids, text) for ids, text in prompts]
        if plan.mode == "forced":
            info = IdpInfo(mode="forced", bank=plan.bank.name, prompt=plan.bank.prompt_names[plan.forced])
            return [Input(ids, text, Prefix(plan.bank, plan.forced), info) for ids, text in prompts]
        try:
            selections = await self.selection.select(plan.selector, [ids for ids, _ in prompts])
        except ValueError as error:
            raise invalid(f"selection refused the input: {error}", param="prompt") from error
        names = plan.bank.prompt_names
        inputs = []
        for (ids, text), chosen in zip(prompts, selections, strict=True):
            info = IdpInfo(
                mode="dynamic", bank=plan.bank.name, prompt=names[chosen.index],
                scores=dict(zip(names, chosen.scores, strict=True)), margin=chosen.margin,
                selection_ms=chosen.seconds * 1000.0,
            )
            inputs.append(Input(ids, text, Prefix(plan.bank, chosen.index), info))
        return inputs

    def _generate(
        self, request_id: str, inputs: list[Input], params: DecodeParams
    ) -> AsyncIterator[tuple[int, DecodeOutput]]:
        """All inputs' decodes, merged; engine errors become API errors."""
        streams = [
            self.engine.generate(f"{request_id}-{i}", item.token_ids, item.prefix, params)
            for i, item in enumerate(inputs)
        ]
        return _translate_errors(_merge(streams))


def _bank_cards(bank_set: BankSet) -> ModelIdp:
    cards = [BankCard(name=b.name, k=b.k, m=b.m, prompts=list(b.prompt_names)) for b in bank_set.banks.values()]
    return ModelIdp(default_bank=bank_set.default, banks=cards)


def _sampling_fields(request: CompletionRequest | ChatCompletionRequest, max_tokens: int) -> dict[str, Any]:
    return dict(
        max_tokens=max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        n=request.n,
        stop=request.stop_list,
        seed=request.seed,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        ignore_eos=request.ignore_eos,
    )


def _observe_accepted(endpoint: str, mode: IdpMode, inputs: list[Input]) -> None:
    """Count a request that will be decoded: its prompt tokens and, per input, the prompt it is decoded with
    (names from a loaded bank, never from the request) and, when selected, the selection's margin."""
    metrics.request_accepted(endpoint, mode, sum(len(x.token_ids) for x in inputs))
    for item in inputs:
        metrics.prompt_used(item.idp.mode, item.idp.bank, item.idp.prompt, item.idp.margin)


async def _count_generated(
    endpoint: str, params: DecodeParams, outputs: AsyncIterator[tuple[int, DecodeOutput]]
) -> AsyncIterator[tuple[int, DecodeOutput]]:
    """`outputs`, counting the tokens generated for the caller as they pass (each output holds only new tokens
    when streaming, all of them otherwise). With max_tokens=0 the one token vLLM must decode is dropped, and so
    not counted, as in `usage`."""
    async for index, out in outputs:
        if params.max_tokens > 0:
            metrics.tokens_generated(endpoint, sum(len(c.token_ids) for c in out.choices))
        yield index, out


def _headers(inputs: list[Input]) -> dict[str, str]:
    """x-idp-* headers: one comma-separated value per input ('-' where it has none)."""
    def column(get: Callable[[IdpInfo], Any]) -> str:
        return ",".join("-" if get(x.idp) is None else str(get(x.idp)) for x in inputs)

    return {
        "x-idp-mode": column(lambda i: i.mode),
        "x-idp-bank": column(lambda i: i.bank),
        "x-idp-prompt": column(lambda i: i.prompt),
        "x-idp-selection-ms": column(lambda i: None if i.selection_ms is None else f"{i.selection_ms:.3f}"),
    }


def _usage(max_tokens: int, inputs: list[Input], finals: list[DecodeOutput]) -> Usage:
    prompt = sum(len(x.token_ids) for x in inputs)
    completion = sum(len(c.token_ids) for f in finals for c in f.choices) if max_tokens > 0 else 0
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _stream_usage(max_tokens: int, inputs: list[Input], generated: list[int]) -> Usage:
    prompt = sum(len(x.token_ids) for x in inputs)
    completion = sum(generated) if max_tokens > 0 else 0
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _chat_logprobs(delta: ChoiceDelta, top: int) -> ChatLogprobs | None:
    """Chat logprobs: the sampled token and the `top` most likely ones (vLLM's candidates are rank-sorted, the
    sampled token last when it is not among the top ones)."""
    if delta.logprobs is None:
        return None
    content = [
        ChatTokenLogprob(
            **_top(position.token, position.logprob).model_dump(),
            top_logprobs=[_top(token, logprob) for token, logprob in position.top[:top]],
        )
        for position in delta.logprobs
    ]
    return ChatLogprobs(content=content)


def _top(token: str, logprob: float) -> TopLogprob:
    return TopLogprob(token=token, logprob=max(logprob, MIN_LOGPROB), bytes=list(token.encode()))


def _chunk_factory(request_id: str, model: str, created: int) -> Callable[..., ChatCompletionChunk]:
    def chunk(choices: list[ChatStreamChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=request_id, model=model, created=created, choices=choices, usage=usage)

    return chunk


async def _collect(outputs: AsyncIterator[tuple[int, DecodeOutput]], count: int) -> list[DecodeOutput]:
    """The final output of each input, in input order (non-streaming requests get exactly one each)."""
    finals: list[DecodeOutput | None] = [None] * count
    async for i, out in outputs:
        finals[i] = out
    return [f for f in finals if f is not None]


async def _merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several async iterators as (source index, item); the first error cancels the rest."""
    queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item, None))
            await queue.put((index, done, None))
        except Exception as error:  # noqa: BLE001 - handed to the consumer, which re-raises it
            await queue.put((index, None, error))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item, error = await queue.get()
            if error is not None:
                raise error
            if item is done:
                remaining -= 1
                continue
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _translate_errors(outputs: AsyncIterator[T]) -> AsyncIterator[T]:
    try:
        async for item in outputs:
            yield item
    except EngineRequestError as error:
        raise invalid(str(error), param=error.param) from error
    except EngineUnavailableError as error:
        raise unavailable(f"the engine is not serving: {error}") from error


async def _sse(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them; an error mid-stream becomes an error event, then [DONE]."""
    try:
        async for chunk in chunks:
            yield f"data: {chunk.model_dump_json()}\n\n"
    except ApiError as error:
        yield f"data: {error.response().body.decode()}\n\n"
    except Exception:  # headers are sent; all that is left is to tell the client in-band
        logger.exception("error while streaming")
        yield f"data: {ApiError('internal server error', 500, type='internal_error').response().body.decode()}\n\n"
    yield "data: [DONE]\n\n"
