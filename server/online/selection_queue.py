"""Micro-batching of selection passes across concurrent requests, off the event loop.

A selection pass is torch work (one prefill of the inputs over the bank's cached prompt KV). Run inline it
would stall every stream the event loop serves. So requests queue here, a single worker takes whatever arrived
within `wait_s` (at most `max_batch` inputs), and runs one pass per bank in a single worker thread (torch work
serialized: two passes on two cores only fight over them). On a GPU batching amortizes each pass; on CPU the
server sets `max_batch` to 1 (see server/online/placement.py `selection_batch_size`). A pass that fails is retried
input by input, so one bad input never fails its neighbours.

The worker is supervised. If it dies of anything outside that per-input isolation (a bug of ours), it is logged
with its traceback, every waiting caller and every later one gets `SelectionUnavailableError`, and `wait_failed`
returns, so the app can turn /health to 503 and hand over to its supervisor, as when the engine dies. Without
this a dead worker would leave every dynamic request waiting forever behind a healthy-looking /health.

Callers hand in the selector itself, not a bank name: a bank reload swaps the serving's whole bank set, and an
input queued before the swap must still be scored by the selector of the bank its request planned with.

How many threads a pass gets is `threads`' call (server/online/placement.py `ThreadSwitch`): read on the event
loop when the pass starts (every CPU while vLLM holds no request, one thread off its workers otherwise) and
applied inside the worker thread, which the pass owns while it runs.

Selections are remembered (an LRU of `cache_size` entries, keyed by selector and a digest of the token ids), as
vLLM's prefix cache remembers prefills: an input seen before (a client's retry, an evaluation rerun, the same
input twice in one batch) skips the pass. A remembered selection reports 0 seconds, the time this request spent
on it. Keys hold the selector itself, so a reloaded bank never answers from its predecessor's entries.

`guess` is the prompt a speculative decode starts with before the pass has answered: the remembered selection of
that very input, else the last one its selector made (traffic of one kind tends to pick one prompt). How often
that is right depends on the traffic (one task's inputs mostly pick one prompt, a mix of tasks does not), so the
queue also keeps each selector's `guess_rate`, the recent share of guesses its passes confirmed, scored by the
caller for every guess whether it was acted on or not (`score_guess`); speculation asks it before betting a
prefill on a guess.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import weakref
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Protocol

from server.core.selection import Selection
from server.online import metrics
from server.online.placement import ThreadSwitch

logger = logging.getLogger(__name__)

GUESS_RATE_WEIGHT = 0.1
"""Weight of the newest guess in a selector's `guess_rate` (an exponential average): the rate follows about the
last ten to twenty guesses, so a change of traffic shows within a few dozen requests, one odd input does not."""


class SelectionUnavailableError(RuntimeError):
    """The selection worker has died: no input can be selected until the process restarts."""


class Selector(Protocol):
    def select(self, batch: Sequence[Sequence[int]]) -> list[Selection]: ...


_Key = tuple[Selector, bytes]


def _key(selector: Selector, token_ids: Sequence[int]) -> _Key:
    """The cache key of an input: its selector and a 128-bit digest of its token ids (int64, so any id fits)."""
    return selector, hashlib.blake2b(array("q", token_ids).tobytes(), digest_size=16).digest()


@dataclass
class _Pending:
    selector: Selector
    token_ids: list[int]
    key: _Key
    future: asyncio.Future[Selection] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class SelectionQueue:
    """Select prompts for many inputs, batched across callers; `start` and `stop` belong to the app lifespan."""

    def __init__(self, max_batch: int, wait_s: float, cache_size: int = 0, threads: ThreadSwitch | None = None) -> None:
        self._max_batch = max_batch
        self._threads = threads
        self._wait_s = wait_s
        self._cache_size = cache_size
        self._cache: OrderedDict[_Key, Selection] = OrderedDict()
        # the last selection per selector, for `guess`; weak, so a reloaded bank's selectors (and the prompt KV
        # they hold) do not outlive their bank set for the sake of a guess
        self._last: weakref.WeakKeyDictionary[Selector, int] = weakref.WeakKeyDictionary()
        self._guess_rate: weakref.WeakKeyDictionary[Selector, float] = weakref.WeakKeyDictionary()
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="idp-selection")
        self._worker: asyncio.Task[None] | None = None
        self._in_pass: list[_Pending] = []
        self._failure: BaseException | None = None
        self._failed = asyncio.Event()

    def start(self) -> None:
        self._worker = asyncio.create_task(self._supervise(), name="idp-selection-queue")

    @property
    def threads(self) -> ThreadSwitch | None:
        """How each pass's threads are chosen (None: left as they are)."""
        return self._threads

    @property
    def failed(self) -> bool:
        """True once the worker has died (it is not restarted: a bug that killed it once would again)."""
        return self._failure is not None

    async def wait_failed(self) -> BaseException:
        """Return, with what killed it, once the worker has died."""
        await self._failed.wait()
        assert self._failure is not None
        return self._failure

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def select(self, selector: Selector, inputs: Sequence[Sequence[int]]) -> list[Selection]:
        """One `Selection` per input, in order, by `selector`. Raises what the selector raised for an input it
        could not score, and SelectionUnavailableError once the worker has died."""
        if self._failure is not None:
            raise SelectionUnavailableError(f"the selection worker has died: {self._failure!r}")
        outcomes: list[Selection | asyncio.Future[Selection]] = []
        for ids in inputs:
            key = _key(selector, ids)
            remembered = self._recall(key)
            metrics.selection_cache_lookup(hit=remembered is not None)
            if remembered is not None:
                outcomes.append(replace(remembered, seconds=0.0))
                continue
            item = _Pending(selector, list(ids), key)
            self._queue.put_nowait(item)
            outcomes.append(item.future)
        scored = iter(await asyncio.gather(*(o for o in outcomes if not isinstance(o, Selection))))
        return [outcome if isinstance(outcome, Selection) else next(scored) for outcome in outcomes]

    def guess(self, selector: Selector, token_ids: Sequence[int]) -> int | None:
        """The likeliest prompt row for this input before its pass runs: its remembered selection, else the last
        selection of this selector, else None. A guess only: the pass still decides."""
        remembered = self._cache.get(_key(selector, token_ids))
        return remembered.index if remembered is not None else self._last.get(selector)

    def guess_rate(self, selector: Selector) -> float:
        """The recent share of this selector's scored guesses that its pass confirmed; 1.0 before any, so a
        new bank's first guesses are tried (each scored one corrects the rate)."""
        return self._guess_rate.get(selector, 1.0)

    def score_guess(self, selector: Selector, guessed: int, chosen: int) -> None:
        """Fold one guess and what the pass then chose into the selector's `guess_rate`."""
        rate = self.guess_rate(selector)
        self._guess_rate[selector] = rate + GUESS_RATE_WEIGHT * (float(guessed == chosen) - rate)

    def _recall(self, key: _Key) -> Selection | None:
        selection = self._cache.get(key)
        if selection is not None:
            self._cache.move_to_end(key)
        return selection

    def _remember(self, key: _Key, selection: Selection) -> None:
        if self._cache_size == 0:
            return
        self._cache[key] = selection
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def _supervise(self) -> None:
        """Run the worker; if it dies, log why and fail every caller, waiting now or coming later."""
        try:
            await self._run()
        except Exception as error:  # anything that escapes _run is a bug: report it and fail every caller
            logger.critical(
                "the selection worker died; dynamic requests fail until the process restarts", exc_info=error
            )
            self._failure = error
            unavailable = SelectionUnavailableError(f"the selection worker has died: {error!r}")
            waiting = list(self._in_pass)
            while not self._queue.empty():
                waiting.append(self._queue.get_nowait())
            for item in waiting:
                _settle(item, error=unavailable)
            self._failed.set()

    async def _run(self) -> None:
        while True:
            await self._pass(await self._collect())

    async def _pass(self, batch: list[_Pending]) -> None:
        """One pass per bank of the batch. Its own frame, so that nothing of a finished batch (its selectors, a
        reloaded bank's among them) stays referenced while the worker waits for the next."""
        for selector in {id(item.selector): item.selector for item in batch}.values():
            await self._select_bank([item for item in batch if item.selector is selector])
        self._in_pass = []

    async def _collect(self) -> list[_Pending]:
        """The first waiting input, plus whatever else arrives within `wait_s`, up to `max_batch`. Taken inputs
        are in `_in_pass` from the moment they leave the queue until their pass is over, for `_supervise`."""
        self._in_pass = batch = [await self._queue.get()]
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
        """Score one bank's inputs in one pass (each distinct input once), settle every caller, remember them."""
        if not items:
            return
        distinct = list({item.key: item for item in items}.values())
        loop = asyncio.get_running_loop()
        batch = [item.token_ids for item in distinct]
        work = partial(items[0].selector.select, batch)
        if self._threads is not None:
            work = partial(self._threads.run, self._threads.for_next_pass(), work)
        try:
            results = await loop.run_in_executor(self._executor, work)
        except Exception as error:  # noqa: BLE001 - isolate the culprit below
            if len(distinct) == 1:
                for item in items:
                    _settle(item, error=error)
                return
            for item in distinct:
                await self._select_bank([same for same in items if same.key == item.key])
            return
        metrics.selection_pass(results)
        self._last[items[0].selector] = results[-1].index
        by_key = {item.key: result for item, result in zip(distinct, results, strict=True)}
        for key, result in by_key.items():
            self._remember(key, result)
        for item in items:
            _settle(item, result=by_key[item.key])


def _settle(item: _Pending, result: Selection | None = None, error: BaseException | None = None) -> None:
    """Resolve a caller's future unless it gave up (cancelled) meanwhile."""
    if item.future.done():
        return
    if error is not None:
        item.future.set_exception(error)
    else:
        item.future.set_result(result)
