"""The selection worker under supervision: a fault that kills it fails every waiting and later caller with
SelectionUnavailableError (never a hang), is logged with its traceback, and hands the process to the app's
supervisor, which exits with EXIT_SELECTION_DEAD as it exits with EXIT_ENGINE_DEAD when the engine dies.

Faults are injected into a real SelectionQueue: a selector whose answer breaks the queue's bookkeeping (no
selection for its inputs), and a collect step that raises. A selector that raises for an input is not such a
fault: the queue isolates it to that input's callers (tests/test_selection_queue.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest

from server.core.selection import Selection
from server.online.app import EXIT_ENGINE_DEAD, EXIT_SELECTION_DEAD, EXIT_START_FAILED, _supervise, run
from server.online.selection_queue import SelectionQueue, SelectionUnavailableError
from server.online.settings import ServeSettings


class Answering:
    def select(self, batch: Sequence[Sequence[int]]) -> list[Selection]:
        return [Selection(index=0, scores=(1.0, 0.0), margin=1.0, seconds=0.001) for _ in batch]


class Losing(Answering):
    """Returns fewer selections than it was given inputs: a bug the queue cannot pin on any one input."""

    def select(self, batch: Sequence[Sequence[int]]) -> list[Selection]:
        return super().select(batch)[:-1]


class BrokenCollect(SelectionQueue):
    """A queue whose collect step fails on its second batch."""

    batches = 0

    async def _collect(self) -> list:  # type: ignore[override]
        self.batches += 1
        if self.batches == 2:
            raise RuntimeError("collect broke")
        return await super()._collect()


def test_a_worker_killed_by_a_bad_answer_fails_every_caller_now_and_later(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> tuple[list[object], BaseException, BaseException]:
        queue = SelectionQueue(max_batch=8, wait_s=0.05)
        queue.start()
        try:
            waiting = await asyncio.wait_for(
                asyncio.gather(*(queue.select(Losing(), [[i, i + 1]]) for i in range(3)), return_exceptions=True), 10
            )
            with pytest.raises(SelectionUnavailableError):
                await queue.select(Answering(), [[1, 2]])
            cause = await asyncio.wait_for(queue.wait_failed(), 1)
            later = await asyncio.gather(queue.select(Answering(), [[9]]), return_exceptions=True)
            return waiting, cause, later[0]
        finally:
            await queue.stop()

    with caplog.at_level(logging.CRITICAL):
        waiting, cause, later = asyncio.run(main())
    assert all(isinstance(outcome, SelectionUnavailableError) for outcome in waiting), waiting
    assert isinstance(cause, IndexError | ValueError), "the short answer broke the bookkeeping, and that is reported"
    assert isinstance(later, SelectionUnavailableError)
    assert "selection worker died" in caplog.text and "Traceback" in caplog.text


def test_a_worker_killed_outside_a_pass_fails_the_inputs_still_queued(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> tuple[list[Selection], list[object], bool]:
        queue = BrokenCollect(max_batch=1, wait_s=0.0)
        queue.start()
        try:
            first = await queue.select(Answering(), [[1]])
            rest = await asyncio.wait_for(
                asyncio.gather(*(queue.select(Answering(), [[i]]) for i in range(2, 5)), return_exceptions=True), 10
            )
            return first, rest, queue.failed
        finally:
            await queue.stop()

    with caplog.at_level(logging.CRITICAL):
        first, rest, failed = asyncio.run(main())
    assert first[0].index == 0
    assert failed and all(isinstance(outcome, SelectionUnavailableError) for outcome in rest), rest
    assert "collect broke" in caplog.text


def test_a_healthy_worker_is_not_failed_and_stops_cleanly() -> None:
    async def main() -> bool:
        queue = SelectionQueue(max_batch=4, wait_s=0.001)
        queue.start()
        await queue.select(Answering(), [[1], [2]])
        failed = queue.failed
        await queue.stop()
        return failed

    assert asyncio.run(main()) is False


class Dying:
    """Stands in for the engine or the selection queue: dies when told to."""

    def __init__(self) -> None:
        self.dead = asyncio.Event()

    async def wait_dead(self) -> None:
        await self.dead.wait()

    async def wait_failed(self) -> BaseException:
        await self.dead.wait()
        return RuntimeError("dead")


@pytest.mark.parametrize(("part", "status"), [("selection", EXIT_SELECTION_DEAD), ("engine", EXIT_ENGINE_DEAD)])
def test_the_supervisor_hands_over_after_the_grace_period_with_the_parts_exit_status(part: str, status: int) -> None:
    async def main() -> tuple[list[int], list[int]]:
        running = SimpleNamespace(engine=Dying(), selection=Dying())
        calls: list[int] = []
        supervisor = asyncio.create_task(_supervise(running, 0.05, calls.append))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        before = list(calls)
        getattr(running, part).dead.set()
        await asyncio.wait_for(supervisor, 5)
        return before, calls

    before, calls = asyncio.run(main())
    assert before == [] and calls == [status]
    assert EXIT_SELECTION_DEAD != EXIT_ENGINE_DEAD and 0 not in (EXIT_SELECTION_DEAD, EXIT_ENGINE_DEAD)


def test_a_server_that_fails_to_start_exits_non_zero(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """uvicorn logs a failed lifespan start and returns; `run` must not let that look like a clean exit (0)."""
    settings = ServeSettings(home=tmp_path, model=str(tmp_path / "no-such-model"), port=0, log_level="critical")
    with pytest.raises(SystemExit) as exit_info:
        run(settings)
    assert exit_info.value.code == EXIT_START_FAILED != 0
