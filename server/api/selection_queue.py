"""Micro-batching of selection passes across concurrent requests, off the event loop.

A selection pass is CPU torch work (one prefill of the inputs over the bank's cached prompt KV). Run inline it
would stall every stream the event loop serves; run per request it would pay the per-pass overhead each time.
So requests queue here, a single worker takes whatever arrived within `wait_s` (at most `max_batch` inputs),
and runs one pass per bank in a single worker thread (torch work serialized: two passes on two cores only
fight over them). A pass that fails is retried input by input, so one bad input never fails its neighbours.

Callers hand in the selector itself, not a bank name: a bank reload swaps the serving's whole bank set, and an
input queued before the swap must still be scored by the selector of the bank its request planned with.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from server import metrics
from server.selection import Selection

logger = logging.getLogger(__name__)


class Selector(Protocol):
    def select(self, batch: Sequence[Sequence[int]]) -> list[Selection]: ...


@dataclass
class _Pending:
    selector: Selector
    token_ids: list[int]
    future: asyncio.Future[Selection] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class SelectionQueue:
    """Select prompts for many inputs, batched across callers; `start` and `stop` belong to the app lifespan."""

    def __init__(self, max_batch: int, wait_s: float) -> None:
        self._max_batch = max_batch
        self._wait_s = wait_s
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="idp-selection")
        self._worker: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._worker = asyncio.create_task(self._run(), name="idp-selection-queue")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def select(self, selector: Selector, inputs: Sequence[Sequence[int]]) -> list[Selection]:
        """One `Selection` per input, in order, by `selector`; ValueError if an input cannot be scored."""
        pending = [_Pending(selector, list(ids)) for ids in inputs]
        for item in pending:
            self._queue.put_nowait(item)
        return list(await asyncio.gather(*(item.future for item in pending)))

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            for selector in {id(item.selector): item.selector for item in batch}.values():
                await self._select_bank([item for item in batch if item.selector is selector])

    async def _collect(self) -> list[_Pending]:
        """The first waiting input, plus whatever else arrives within `wait_s`, up to `max_batch`."""
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self._wait_s
        while len(batch) < self._max_batch:
            timeout = deadline - time.monotonic()
            try:
                item = self._queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self._queue.get(), timeout)
            except (asyncio.QueueEmpty, TimeoutError):
                break
            batch.append(item)
        return [item for item in batch if not item.future.done()]

    async def _select_bank(self, items: list[_Pending]) -> None:
        if not items:
            return
        selector = items[0].selector
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._executor, selector.select, [i.token_ids for i in items])
        except Exception as error:  # noqa: BLE001 - isolate the culprit below
            if len(items) == 1:
                _settle(items[0], error=error)
                return
            for item in items:
                await self._select_bank([item])
            return
        metrics.selection_pass(results)
        for item, result in zip(items, results, strict=True):
            _settle(item, result=result)


def _settle(item: _Pending, result: Selection | None = None, error: BaseException | None = None) -> None:
    """Resolve a caller's future unless it gave up (cancelled) meanwhile."""
    if item.future.done():
        return
    if error is not None:
        item.future.set_exception(error)
    else:
        item.future.set_result(result)
