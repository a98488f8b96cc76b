"""bench/gpu_check.py's CPU path: the command a GPU machine runs, here on a tiny random model with --device cpu.

It compares the device against the CPU, so on the CPU every difference is zero; what this checks is that the
script runs end to end on the project's public functions and prints its one summary line, and that a
comparison outside its tolerance fails the run.
"""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT

COMMAND = [
    sys.executable,
    "bench/gpu_check.py",
    "--device",
    "cpu",
    "--model",
    "tiny",
    "--inputs",
    "8",
    "--steps",
    "2",
    "--repeats",
    "1",
]


def run(*extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(COMMAND + list(extra), capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_cpu_path_passes_with_one_summary_line():
    proc = run()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (line,) = proc.stdout.splitlines()
    assert line.startswith("gpu_check: PASS cpu")
    for part in ("selection 8/8 same choice", "train 2 steps", "eval ppl", "select/prefill"):
        assert part in line, line


def test_a_difference_beyond_tolerance_fails_the_run():
    proc = run("--score-tol", "-1", "--rel-tol", "-1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.startswith("gpu_check: FAIL")
