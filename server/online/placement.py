"""Where the server's own work runs: the selection pass's device, batch size and threads, and the frontend's CPUs.

One policy, decided at start-up from the settings and what the host has: the selection pass goes to the GPU when
torch sees one, batches inputs only where batching pays (an accelerator), and on a CPU host the frontend's
threads (HTTP, tokenizing, selection) keep off the cores vLLM pinned its workers to, except that a selection pass
started while vLLM has no request at all may use every core (`ThreadSwitch`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from server.core.device import resolve_device
from server.online import cpus

logger = logging.getLogger(__name__)

T = TypeVar("T")

GPU_SELECTION_BATCH = 16
"""Default inputs per selection pass on an accelerator, where one input alone leaves the device mostly idle."""


def selection_device(setting: str) -> str:
    """The torch device of the selection pass (see `server.core.device.resolve_device`), refused at start-up
    rather than on the first request."""
    return resolve_device(setting, "selection_device")


def selection_batch_size(setting: int | None, device: str) -> int:
    """Most inputs per selection pass: the setting, else 1 on CPU and `GPU_SELECTION_BATCH` on an accelerator.

    On CPU the pass is compute-bound, so a batch costs about as much as its inputs one by one, while every input
    of a batch waits for the whole batch, and so does the engine's prefill of it. One at a time lets vLLM prefill
    each input while the next is scored, which serves a burst of clients faster (measured with bench/selection.py
    --batch-sizes and bench/serve.py; the numbers are in docs/). On a GPU a pass of one input leaves the device
    mostly idle, so batching pays there."""
    if setting is not None:
        return setting
    return 1 if torch.device(device).type == "cpu" else GPU_SELECTION_BATCH


def pin_frontend(worker_cpus: frozenset[int]) -> Callable[[], None]:
    """Move this process's threads off `worker_cpus` (those vLLM pinned its workers to), if any CPUs are left;
    returns the undo."""
    ours = cpus.frontend_cpus(worker_cpus) if worker_cpus else frozenset()
    if not ours:
        logger.info("frontend threads not pinned (vLLM workers pinned to %s)", sorted(worker_cpus) or "no CPU")
        return lambda: None
    return cpus.pin_process(ours)


@dataclass(frozen=True)
class PassThreads:
    """torch threads for one selection pass, and the CPUs the selection worker thread (and its OpenMP team) may
    run on."""

    count: int
    cpus: frozenset[int]

    def apply(self) -> None:
        """Configure the calling thread (the selection worker). Affinity is per thread; torch's intra-op thread
        count is process-wide, which is why `ThreadSwitch.run` sets the busy count back after every wide pass."""
        cpus.pin_thread(self.cpus)
        torch.set_num_threads(self.count)


@dataclass(frozen=True)
class ThreadSwitch:
    """The selection pass's threads by the engine's load: `idle` while vLLM holds no request, else `busy`.

    At low load a request's selection pass runs alone, while vLLM's worker cores, which have nothing to do until
    that pass ends, sit idle; giving the pass those cores shortens the request. Under load the worker cores decode
    other requests, and a pass spread onto them would stall every one of them, so it keeps to one thread off them.
    The load is read when a pass starts; a request that reaches vLLM during a wide pass shares the worker cores
    with it until the pass ends. The thread count changes only how floating-point sums are split, within the
    tolerance the reference tests hold the pass to (tests/test_selection_threads.py).
    """

    engine_requests: Callable[[], int]
    """Requests vLLM holds now, running or waiting (`Engine.unfinished_requests`)."""
    idle: PassThreads
    busy: PassThreads

    def for_next_pass(self) -> PassThreads:
        """The threads of a pass starting now (call on the event loop, where vLLM's bookkeeping lives)."""
        return self.idle if self.engine_requests() == 0 else self.busy

    def run(self, threads: PassThreads, work: Callable[[], T]) -> T:
        """In the selection worker thread: do `work` on `threads`, and be back on `busy` when it returns."""
        threads.apply()
        try:
            return work()
        finally:
            if threads != self.busy:
                self.busy.apply()


def selection_threads(
    idle_threads: int | None,
    busy_threads: int,
    device: str,
    engine_requests: Callable[[], int],
    worker_cpus: frozenset[int],
    pin_frontend: bool,
) -> ThreadSwitch | None:
    """The selection pass's thread switch on a CPU host, or None where nothing should switch.

    Busy: `busy_threads` (the `torch_threads` setting) on the frontend's CPUs (off vLLM's workers when the
    frontend is pinned). Idle: every CPU this process may use, with `idle_threads` threads, by default the busy
    count plus one per core vLLM pinned its workers to (the cores that idle with it; not every core of a big
    node, most of which may be other pods'), never more than the cgroup's CPU quota allows. None when the pass
    runs on an accelerator (host threads barely matter there), when `idle_threads` is 1 (the setting that turns
    switching off), when vLLM pinned no worker and no idle count is set (no core is known to idle with the
    engine), or when the idle count would be no larger than the busy one. Call before the frontend is pinned,
    while this process still has all its CPUs.
    """
    if torch.device(device).type != "cpu" or idle_threads == 1 or (idle_threads is None and not worker_cpus):
        return None
    every = cpus.own_cpus()
    frontend = (cpus.frontend_cpus(worker_cpus) if worker_cpus else frozenset()) if pin_frontend else frozenset()
    busy = PassThreads(busy_threads, frontend or every)
    count = idle_threads or busy_threads + len(worker_cpus & every)
    quota = cpus.cpu_quota()
    idle = PassThreads(max(1, min(count, len(every), int(quota) if quota else count)), every)
    if idle.count <= busy.count:
        return None
    logger.info(
        "selection pass: %d thread(s) on CPUs %s while vLLM is idle, %d on %s while it is busy",
        idle.count,
        sorted(idle.cpus),
        busy.count,
        sorted(busy.cpus),
    )
    return ThreadSwitch(engine_requests, idle, busy)
