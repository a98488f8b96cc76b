"""The selection pass's threads follow the engine's load, and the choice never depends on them.

A selection pass that starts while vLLM holds no request gets every CPU (vLLM's idle worker cores included);
one that starts while vLLM holds any request gets one thread off the worker cores (server/online/placement.py
`ThreadSwitch`). The engine is a fake counter here: the switching is the queue's and the placement's logic, not
vLLM's. The pass itself is exact whatever the thread count: the reference tests' tolerance holds at 1, 2 and 4
threads, and the chosen prompt is the same.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

from server.core.selection import CachedSelector, ReferenceSelector, Selection, prepare_selection_model
from server.online import cpus
from server.online.placement import PassThreads, ThreadSwitch, selection_threads
from server.online.selection_queue import SelectionQueue
from tests.helpers import micro_llama, random_bank, start_server

ATOL = 1e-5
"""The reference tests' tolerance (tests/test_selection.py)."""
EVERY = cpus.own_cpus()
READ_CPU_QUOTA = cpus.cpu_quota
needs_two_cpus = pytest.mark.skipif(len(EVERY) < 2, reason="switching needs a host with two CPUs or more")


class FakeEngine:
    """Stands in for `Engine.unfinished_requests`: the requests vLLM holds, set by the test."""

    def __init__(self) -> None:
        self.requests = 0

    def unfinished_requests(self) -> int:
        return self.requests


class Recording:
    """A selector that records, inside the selection worker, the torch threads and CPUs its pass ran on."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, frozenset[int]]] = []

    def select(self, batch: Sequence[Sequence[int]]) -> list[Selection]:
        self.seen.append((torch.get_num_threads(), frozenset(os.sched_getaffinity(0))))
        return [Selection(index=0, scores=(1.0,), margin=0.0, seconds=0.0) for _ in batch]


@pytest.fixture(autouse=True)
def no_cpu_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host's own cgroup quota (if any) stays out of the tests that do not set one."""
    monkeypatch.setattr(cpus, "cpu_quota", lambda: None)


@pytest.fixture
def torch_threads() -> Iterator[None]:
    """Put torch's process-wide thread count back after a test that switches it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def run_passes(switch: ThreadSwitch, engine: FakeEngine, loads: list[int]) -> list[tuple[int, frozenset[int]]]:
    """One pass per entry of `loads`, each started with that many requests in the fake engine."""
    selector = Recording()

    async def main() -> None:
        queue = SelectionQueue(max_batch=1, wait_s=0.0, threads=switch)
        queue.start()
        try:
            for step, requests in enumerate(loads):
                engine.requests = requests
                await queue.select(selector, [[step]])
        finally:
            await queue.stop()

    asyncio.run(main())
    return selector.seen


@needs_two_cpus
def test_a_pass_uses_every_cpu_while_the_engine_is_idle_and_one_thread_off_its_workers_while_busy(
    torch_threads: None,
) -> None:
    engine = FakeEngine()
    workers = frozenset({min(EVERY)})
    switch = selection_threads(None, 1, "cpu", engine.unfinished_requests, workers, pin_frontend=True)
    assert switch is not None
    idle, busy = (2, EVERY), (1, EVERY - workers)
    assert run_passes(switch, engine, [0, 3, 0, 1, 1]) == [idle, busy, idle, busy, busy]


@needs_two_cpus
def test_after_a_wide_pass_the_worker_and_torch_are_back_on_the_busy_setting(torch_threads: None) -> None:
    engine = FakeEngine()
    switch = selection_threads(2, 1, "cpu", engine.unfinished_requests, frozenset({min(EVERY)}), pin_frontend=True)
    assert switch is not None
    result = switch.run(switch.for_next_pass(), lambda: (torch.get_num_threads(), os.sched_getaffinity(0)))
    assert result == (2, EVERY)
    assert torch.get_num_threads() == 1, "torch's thread count is process-wide: other torch work must not keep 2"
    assert frozenset(os.sched_getaffinity(0)) == switch.busy.cpus
    switch.busy.apply()  # the test ran the pass in its own thread: give it back every CPU
    cpus.pin_thread(EVERY)


@needs_two_cpus
def test_idle_threads_default_to_the_busy_ones_plus_the_workers_cores_unpinned_too(torch_threads: None) -> None:
    engine = FakeEngine()
    switch = selection_threads(None, 1, "cpu", engine.unfinished_requests, frozenset({0}), pin_frontend=False)
    assert switch is not None and switch.busy == PassThreads(1, EVERY) and switch.idle == PassThreads(2, EVERY)


def test_switching_is_opt_in_until_a_benchmark_shows_it_helps() -> None:
    from server.online.settings import ServeSettings

    assert ServeSettings.model_fields["selection_idle_threads"].default == 1, "1 means off"


def test_switching_is_off_when_set_to_one_on_an_accelerator_without_pinned_workers_or_with_nothing_to_gain() -> None:
    def requests() -> int:
        return 0

    assert selection_threads(1, 1, "cpu", requests, frozenset({0}), pin_frontend=True) is None
    assert selection_threads(None, 1, "cuda", requests, frozenset({0}), pin_frontend=True) is None
    assert selection_threads(None, 1, "cpu", requests, frozenset(), pin_frontend=True) is None, "no core known idle"
    assert selection_threads(2, 2, "cpu", requests, frozenset({0}), pin_frontend=False) is None


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "250000 100000\n"}, 2.5),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "150000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1.5),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_the_cgroup_cpu_quota_is_read_from_v2_or_v1(tmp_path: Path, files: dict[str, str], quota: float | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert READ_CPU_QUOTA(tmp_path) == quota


@needs_two_cpus
def test_idle_threads_stay_within_the_cpu_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    def requests() -> int:
        return 0

    monkeypatch.setattr(cpus, "cpu_quota", lambda: 1.5)
    assert selection_threads(None, 1, "cpu", requests, frozenset({0}), pin_frontend=True) is None, "1 thread only"
    monkeypatch.setattr(cpus, "cpu_quota", lambda: 2.0)
    switch = selection_threads(8, 1, "cpu", requests, frozenset({0}), pin_frontend=True)
    assert switch is not None and switch.idle.count == 2


def test_without_a_switch_the_queue_leaves_the_threads_alone(torch_threads: None) -> None:
    torch.set_num_threads(1)
    selector = Recording()

    async def main() -> None:
        queue = SelectionQueue(max_batch=1, wait_s=0.0)
        queue.start()
        try:
            await queue.select(selector, [[1]])
        finally:
            await queue.stop()

    asyncio.run(main())
    assert [count for count, _ in selector.seen] == [1]


def test_scores_equal_the_reference_and_the_choice_is_the_same_at_any_thread_count(torch_threads: None) -> None:
    model = prepare_selection_model(micro_llama(vocab_size=256, seed=0, initializer_range=0.2))
    prompts = torch.randn(4, 6, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(4)
    batch = [torch.randint(0, 256, (n,), generator=generator).tolist() for n in (5, 40, 100)]
    torch.set_num_threads(1)
    reference = ReferenceSelector(model, prompts).scores(batch)
    cached = CachedSelector(model, prompts)
    for threads in (1, 2, 4):
        torch.set_num_threads(threads)
        torch.testing.assert_close(cached.scores(batch), reference, atol=ATOL, rtol=0, msg=f"{threads} threads")
        assert [s.index for s in cached.select(batch)] == reference.argmax(1).tolist(), f"{threads} threads"


@pytest.mark.slow
@needs_two_cpus
def test_the_server_switches_on_its_own_engines_request_count(tiny_llama: Path, tmp_path: Path) -> None:
    """Wiring: the served queue reads the live engine's count, and a dynamic request is answered through it."""
    bank = random_bank(tiny_llama, "tiny", k=3, m=4, seed=0)
    with start_server(tiny_llama, tmp_path, [bank], selection_idle_threads=0) as live:  # the switch is opt-in
        switch = live.app.state.completion_serving.selection.threads
        workers = live.engine.worker_cpus
        if not workers:
            assert switch is None, "vLLM pinned no worker here, so no core is known to idle with it"
        else:
            assert switch is not None and switch.idle.cpus == EVERY and switch.idle.count > switch.busy.count
            assert switch.engine_requests == live.engine.unfinished_requests and switch.engine_requests() == 0
        answer = live.post("/v1/completions", {"model": tiny_llama.name, "prompt": "The river", "max_tokens": 2})
        assert answer.status_code == 200 and answer.json()["choices"][0]["idp"]["prompt"].startswith("tiny-p")
