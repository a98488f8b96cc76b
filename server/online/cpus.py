"""Where the server's own threads run on a CPU host: off the cores vLLM's workers are pinned to.

vLLM's CPU build binds each worker's OpenMP threads to chosen cores and leaves the rest to "the scheduler and the
frontend". The API process (HTTP, tokenizing, detokenizing) and our selection pass are that frontend, but nothing
stops Linux from running them on a worker core, where every slice they take stalls the decode of every running
request; keeping them apart serves more tokens per second (measured with `taskset` against a running server; the
numbers are in docs/).

Linux only (`os.sched_setaffinity`); elsewhere, or when vLLM pins nothing (GPU workers, `nobind`), nothing moves.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)


def own_cpus() -> frozenset[int]:
    """CPUs this process may run on."""
    return frozenset(os.sched_getaffinity(0))


def pinned_by_children(pid: int | None = None) -> frozenset[int]:
    """CPUs that descendants of process `pid` (default: this one) pinned some of their threads to.

    A thread whose mask is narrower than the one this process has (the one children inherit) was pinned by its
    own process: for a vLLM engine, its CPU workers' OpenMP threads. Call it before moving this process. Reading
    the threads rather than recomputing vLLM's binding rules (NUMA nodes, SMT siblings, reserved cores,
    `VLLM_CPU_OMP_THREADS_BIND`) leaves those rules vLLM's to change. Empty where there is no affinity API.
    """
    if not hasattr(os, "sched_getaffinity"):
        return frozenset()  # not Linux: no thread affinity to read (or to set)
    inherited = own_cpus()
    pinned: set[int] = set()
    for process in psutil.Process(pid).children(recursive=True):
        try:
            threads = process.threads()
        except psutil.Error:
            continue  # the process ended meanwhile
        for thread in threads:
            try:
                mask = frozenset(os.sched_getaffinity(thread.id))
            except OSError:
                continue
            if mask < inherited:
                pinned |= mask
    return frozenset(pinned)


def pin_process(cpus: Iterable[int], pid: int | None = None) -> Callable[[], None]:
    """Run every thread of process `pid` (default: this one), and the threads they start later, on `cpus`;
    returns the undo.

    `sched_setaffinity` on a thread id moves that thread only, and a new thread inherits its creator's mask, so
    setting it on every current thread covers the process from now on. The undo gives every thread alive then
    the caller's mask from before, including threads started while pinned (pools keep their threads).
    """
    target, before = frozenset(cpus), frozenset(os.sched_getaffinity(pid or 0))
    for tid in _thread_ids(pid):
        _set(tid, target)
    logger.info("threads of process %s pinned to CPUs %s", pid or os.getpid(), sorted(target))

    def undo() -> None:
        for tid in _thread_ids(pid):
            _set(tid, before)

    return undo


def pin_thread(cpus: Iterable[int]) -> None:
    """Run the calling thread, and the threads it starts from now on, on `cpus` (Linux affinity is per thread).

    The selection worker widens itself onto vLLM's worker cores while the engine is idle and narrows back when it
    is busy (server/online/placement.py `ThreadSwitch`); no other thread of the process moves.
    """
    os.sched_setaffinity(0, frozenset(cpus))


def cpu_quota(cgroup: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs' worth of time the container's cgroup grants per period (v2 `cpu.max`, v1 `cpu.cfs_quota_us`); None
    when unlimited or unreadable. A Kubernetes CPU limit shows here and not in the affinity mask, which still
    lists every core of the node: threads beyond the quota only get throttled."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 else None


def frontend_cpus(worker_cpus: frozenset[int]) -> frozenset[int]:
    """Our CPUs minus the workers' ones; empty when the workers hold them all (then nothing should move)."""
    return own_cpus() - worker_cpus


def _thread_ids(pid: int | None) -> list[int]:
    return [int(entry.name) for entry in Path(f"/proc/{pid or 'self'}/task").iterdir()]


def _set(tid: int, cpus: frozenset[int]) -> None:
    try:
        os.sched_setaffinity(tid, cpus)
    except (ProcessLookupError, FileNotFoundError):
        pass  # the thread ended meanwhile
