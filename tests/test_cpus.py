"""CPU placement: the CPUs a child process pinned its threads to are found, and a process can be moved and back."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from server.online.cpus import frontend_cpus, own_cpus, pin_process, pinned_by_children

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs Linux and 2 CPUs"
)

PIN_SELF_AND_WAIT = (
    "import os, sys, time; os.sched_setaffinity(0, {int(sys.argv[1])}); print(flush=True); time.sleep(30)"
)


def test_a_child_pinning_itself_is_found_and_the_rest_is_left_to_the_frontend() -> None:
    first, *rest = sorted(own_cpus())
    child = subprocess.Popen([sys.executable, "-c", PIN_SELF_AND_WAIT, str(first)], stdout=subprocess.PIPE)
    try:
        child.stdout.readline()  # the child has pinned itself
        pinned = pinned_by_children()
        assert first in pinned
        assert first not in frontend_cpus(pinned) and frontend_cpus(pinned) <= set(rest)
    finally:
        child.kill()
        child.wait()


def test_pin_process_moves_every_thread_and_the_undo_restores_them() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.5)
        before = os.sched_getaffinity(child.pid)
        target = {max(before)}
        undo = pin_process(target, child.pid)
        assert os.sched_getaffinity(child.pid) == target
        undo()
        assert os.sched_getaffinity(child.pid) == before
    finally:
        child.kill()
        child.wait()
