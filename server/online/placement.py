"""Where the server's own work runs: the selection pass's device and batch size, and the CPUs of the frontend.

One policy, decided at start-up from the settings and what the host has: the selection pass goes to the GPU when
torch sees one, batches inputs only where batching pays (an accelerator), and on a CPU host the frontend's
threads (HTTP, tokenizing, selection) keep off the cores vLLM pinned its workers to.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from server.core.device import resolve_device
from server.online import cpus

logger = logging.getLogger(__name__)

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
