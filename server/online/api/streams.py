"""Async plumbing of the generation endpoints: merge several inputs' decodes, collect their finals, write SSE.

Nothing here knows OpenAI's fields or IDP; the endpoints compose these with their own chunk types.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from server.online.api.errors import ApiError, internal
from server.online.engine import DecodeOutput

logger = logging.getLogger(__name__)

T = TypeVar("T")


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
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


class Started(Generic[T]):
    """An async iterator whose first item is being fetched already, for a decode submitted before the caller knows
    it will keep it (speculation). `stream` continues it, first item included; `abort` cancels it, which for an
    engine decode aborts the request (vLLM aborts a request whose generator is cancelled or closed)."""

    def __init__(self, source: AsyncIterator[T]) -> None:
        self._source = source
        self._first: asyncio.Task[tuple[bool, T | None]] = asyncio.create_task(self._fetch_first())

    async def _fetch_first(self) -> tuple[bool, T | None]:
        try:
            return True, await anext(self._source)
        except StopAsyncIteration:
            return False, None

    async def stream(self) -> AsyncIterator[T]:
        got, first = await self._first
        if not got:
            return
        yield first  # type: ignore[misc]
        async for item in self._source:
            yield item

    async def abort(self) -> None:
        """Stop it, wherever it is, and swallow what it raises: nobody will read its outputs."""
        self._first.cancel()
        await asyncio.gather(self._first, return_exceptions=True)
        close = getattr(self._source, "aclose", None)
        try:
            if close is not None:
                await close()
        except Exception:  # noqa: BLE001 - an abandoned decode's error concerns nobody
            logger.debug("an aborted speculative decode raised on close", exc_info=True)


async def collect(outputs: AsyncIterator[tuple[int, DecodeOutput]], count: int) -> list[DecodeOutput]:
    """The final output of each input, in input order (non-streaming requests get exactly one each)."""
    finals: list[DecodeOutput | None] = [None] * count
    async for i, out in outputs:
        finals[i] = out
    return [f for f in finals if f is not None]


async def sse(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them; an error mid-stream becomes an error event, then [DONE]."""
    try:
        async for chunk in chunks:
            yield f"data: {chunk.model_dump_json()}\n\n"
    except ApiError as error:
        yield f"data: {error.response().body.decode()}\n\n"
    except Exception:  # headers are sent; all that is left is to tell the client in-band
        logger.exception("error while streaming")
        yield f"data: {internal().response().body.decode()}\n\n"
    yield "data: [DONE]\n\n"
