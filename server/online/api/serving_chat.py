"""`/v1/chat/completions`: the messages rendered with the model's chat template, selected on the rendered text
(what the model reads), answered as one assistant message per choice or as a stream of chunks."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable

from pydantic import BaseModel

from server.online.api.errors import invalid
from server.online.api.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatStreamChoice,
    ChatTokenLogprob,
    TopLogprob,
    Usage,
)
from server.online.api.serving_base import (
    MIN_LOGPROB,
    IdpPlan,
    Input,
    Served,
    ServingBase,
    generated_tokens,
    idp_headers,
    sampling_fields,
    usage,
)
from server.online.api.streams import collect, sse
from server.online.engine import ChoiceDelta, DecodeOutput, DecodeParams


class ChatServing(ServingBase):
    endpoint = "chat"

    async def create(self, request: ChatCompletionRequest) -> Served:
        self.check_model(request.model)
        requested = request.max_completion_tokens or request.max_tokens
        self.check_limits(request.n, requested, "max_completion_tokens")
        plan = self.plan(request.idp)
        rendered = self._render(request)
        token_ids = self.tokenizer.encode(rendered, add_special_tokens=False)
        max_tokens = requested or min(
            self._room_left(token_ids, plan), self.limits.max_tokens or self.engine.max_model_len
        )
        params = DecodeParams(
            **sampling_fields(request, max_tokens),
            logprobs=(request.top_logprobs or 0) if request.logprobs else None,
            stream=request.stream,
        )
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        inputs, outputs = await self.decode(request_id, [(token_ids, rendered)], plan, params)
        if request.stream:
            return Served(sse(self._stream(request, request_id, inputs[0], outputs)), idp_headers(inputs))
        (final,) = await collect(outputs, 1)
        choices = [
            ChatChoice(
                index=delta.index,
                message=AssistantMessage(content=delta.text),
                logprobs=_chat_logprobs(delta, request.top_logprobs or 0),
                finish_reason=delta.finish_reason,
                idp=inputs[0].idp,
            )
            for delta in sorted(final.choices, key=lambda c: c.index)
        ]
        response = ChatCompletionResponse(
            id=request_id,
            model=self.model_name,
            choices=choices,
            usage=usage(max_tokens, inputs, [generated_tokens(final)]),
        )
        return Served(response, idp_headers(inputs))

    def _render(self, request: ChatCompletionRequest) -> str:
        """The messages through the model's chat template, ending where the assistant's answer starts."""
        messages = [{"role": m.role, "content": m.text} for m in request.messages]
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as error:  # a template refusing these messages is the caller's problem
            raise invalid(f"cannot apply the chat template: {error}", param="messages") from error

    def _room_left(self, token_ids: list[int], plan: IdpPlan) -> int:
        """Default chat max_tokens: whatever context the prompt and its soft prompt leave (every prompt of a bank
        has the bank's length, so it is known before one is chosen)."""
        virtual = 0 if plan.bank is None else plan.bank.m
        return self.engine.max_model_len - virtual - len(token_ids)

    async def _stream(
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
                    index=delta.index,
                    delta=ChatDelta(content=delta.text),
                    logprobs=logprobs,
                    finish_reason=delta.finish_reason,
                )
                yield chunk([choice])
        if request.stream_options and request.stream_options.include_usage:
            yield chunk([], usage=usage(1, [item], [completion_tokens]))


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
