"""`/v1/completions`: text or token-id prompts (one or many per request), echo, legacy logprobs, streams.

Echo: prompt logprobs come from the engine itself (see engine.py: mixed-mode prompt embeds), for the caller's
tokens only; the soft prompt's virtual tokens are never reported, and the first prompt token's logprob is null
as in OpenAI's API (under IDP it is conditioned on the soft prompt, but clients expect null there).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence

from pydantic import BaseModel

from server.online.api.errors import invalid
from server.online.api.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from server.online.api.serving_base import (
    MIN_LOGPROB,
    Input,
    Served,
    ServingBase,
    generated_tokens,
    idp_headers,
    sampling_fields,
    usage,
)
from server.online.api.streams import collect, sse
from server.online.engine import ChoiceDelta, DecodeOutput, DecodeParams, TokenLogprob


class CompletionServing(ServingBase):
    endpoint = "completions"

    async def create(self, request: CompletionRequest) -> Served:
        self.check_model(request.model)
        self.check_limits(request.n, request.max_tokens, "max_tokens")
        plan = self.plan(request.idp)
        prompts = self._prompts(request.prompt)
        params = DecodeParams(
            **sampling_fields(request, request.max_tokens),
            logprobs=request.logprobs,
            prompt_logprobs=request.logprobs if request.echo else None,
            stream=request.stream,
        )
        request_id = f"cmpl-{uuid.uuid4().hex}"
        inputs, outputs = await self.decode(request_id, prompts, plan, params)
        if request.stream:
            return Served(sse(self._stream(request, request_id, inputs, outputs)), idp_headers(inputs))
        finals = await collect(outputs, len(inputs))
        return Served(self._response(request, request_id, inputs, finals), idp_headers(inputs))

    def _prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[tuple[list[int], str]]:
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
                param="prompt",
                code="too_many_prompts",
            )
        for i, ids in enumerate(p for p in prompt if not isinstance(p, str)):
            bad = next((t for t in ids if t >= self.engine.vocab_size), None)
            if bad is not None:
                raise invalid(
                    f"prompt {i}: token id {bad} is out of range [0, {self.engine.vocab_size})", param="prompt"
                )
        return [
            (self.tokenizer.encode(p), p) if isinstance(p, str) else (list(p), self.tokenizer.decode(p)) for p in prompt
        ]

    def _response(
        self, request: CompletionRequest, request_id: str, inputs: list[Input], finals: list[DecodeOutput]
    ) -> CompletionResponse:
        choices = []
        for i, (item, final) in enumerate(zip(inputs, finals, strict=True)):
            for delta in sorted(final.choices, key=lambda c: c.index):
                text, logprobs = self._content(request, item, delta, final.prompt_logprobs, True, 0)
                choices.append(
                    CompletionChoice(
                        index=i * request.n + delta.index,
                        text=text,
                        logprobs=logprobs,
                        finish_reason=delta.finish_reason,
                        idp=item.idp,
                    )
                )
        counts = [generated_tokens(final) for final in finals]
        return CompletionResponse(
            id=request_id, model=self.model_name, choices=choices, usage=usage(request.max_tokens, inputs, counts)
        )

    def _content(
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

    async def _stream(
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
                text, logprobs = self._content(
                    request, inputs[i], delta, prompt_logprobs.get(i), first, offsets.get(index, 0)
                )
                totals[i] += len(delta.token_ids)
                scored = logprobs is not None and bool(logprobs.tokens)  # a token may decode to "" (partial UTF-8)
                if not (text or scored or delta.finish_reason or first):
                    continue
                if logprobs is not None and logprobs.tokens:
                    offsets[index] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
                else:
                    offsets.setdefault(index, 0)
                choice = CompletionChoice(
                    index=index,
                    text=text,
                    logprobs=logprobs,
                    finish_reason=delta.finish_reason,
                    idp=inputs[i].idp if first else None,
                )
                yield CompletionResponse(id=request_id, created=created, model=self.model_name, choices=[choice])
        if request.stream_options and request.stream_options.include_usage:
            final_usage = usage(request.max_tokens, inputs, totals)
            yield CompletionResponse(
                id=request_id, created=created, model=self.model_name, choices=[], usage=final_usage
            )
