"""bench/serve.py runs end to end on a tiny model: both workloads, both arms, every level, tables and JSON, with
the server speculating (so the guess counts are read too).

A smoke test of the benchmark's code paths (the scoring workload's echo + logprobs requests included), not a
measurement: speed is only ever judged by running the benchmark itself on the real model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.core.banks import save_bank
from tests.helpers import ROOT, random_bank


@pytest.mark.slow
def test_the_serving_benchmark_measures_both_workloads_with_idp_on_and_off(tiny_llama: Path, tmp_path: Path) -> None:
    save_bank(random_bank(tiny_llama, "tiny", k=3, m=4, seed=0), tmp_path / "banks" / "tiny")
    out = tmp_path / "serve.json"
    command = [
        sys.executable, str(ROOT / "bench" / "serve.py"),
        "--model", str(tiny_llama), "--banks-dir", str(tmp_path / "banks"), "--bank", "tiny",
        "--concurrency", "1", "2", "--requests-per-level", "1", "--min-requests", "2", "--json", str(out),
        "--idp-flag=--selection-speculation=always",
    ]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(ROOT)}  # the project importable however it was installed
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert "scoring (250-token prompts" in run.stdout and "generation (128-token prompts" in run.stdout
    assert run.stdout.count("| p95 A/B |") == 2, run.stdout

    results = json.loads(out.read_text())["results"]
    assert set(results) == {"scoring", "generation"}
    for workload, output_tokens in (("scoring", 1), ("generation", 64)):
        for level in ("1", "2"):
            a, b = results[workload][level]["A"], results[workload][level]["B"]
            assert a["requests"] == b["requests"] == 2 == len(a["latencies_s"]) == len(b["latencies_s"])
            assert a["output_tokens"] == b["output_tokens"] == 2 * output_tokens, (workload, level)
            assert len(a["selection_ms"]) == 2 and b["selection_ms"] == [], "A selects every input, B none"
            assert sum(a["guesses"].values()) == 2 and sum(b["guesses"].values()) == 0, "A guesses every input"
            assert set(results[workload][level]["ratios"]) == {"throughput", "p50", "p95"}
