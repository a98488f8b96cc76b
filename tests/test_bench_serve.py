"""The serving benchmarks run end to end on a tiny model. bench/serve.py: both workloads, all three arms (IDP on,
off, one prompt forced), every level, tables and JSON, with the server speculating (so the guess counts are read
too). bench/speculation.py: both traffic orders on its three servers.

Smoke tests of the benchmarks' code paths (the scoring workload's echo + logprobs requests included), not a
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


def bench(script: str, model: Path, k: int, folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run bench/`script` on `model` with a random bank "tiny" of k prompts (saved under `folder`)."""
    save_bank(random_bank(model, "tiny", k=k, m=4, seed=0), folder / "banks" / "tiny")
    command = [
        sys.executable, str(ROOT / "bench" / script), "--model", str(model),
        "--banks-dir", str(folder / "banks"), "--bank", "tiny", *args,
    ]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(ROOT)}  # the project importable however it was installed
    return subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)


@pytest.mark.slow
def test_the_serving_benchmark_measures_both_workloads_with_idp_on_off_and_forced(
    tiny_llama: Path, tmp_path: Path
) -> None:
    out = tmp_path / "serve.json"
    run = bench(
        "serve.py", tiny_llama, 3, tmp_path,
        "--concurrency", "1", "2", "--requests-per-level", "1", "--min-requests", "2", "--json", str(out),
        "--idp-flag=--selection-speculation=always", "--forced", "tiny-p1",
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert "scoring (250-token prompts" in run.stdout and "generation (128-token prompts" in run.stdout
    assert run.stdout.count("| p95 A/B |") == 2 and run.stdout.count("| p50 F/B |") == 2, run.stdout

    results = json.loads(out.read_text())["results"]
    assert set(results) == {"scoring", "generation"}
    for workload, output_tokens in (("scoring", 1), ("generation", 64)):
        for level in ("1", "2"):
            a, b, f = (results[workload][level][arm] for arm in ("A", "B", "F"))
            assert a["requests"] == b["requests"] == f["requests"] == 2
            assert len(a["latencies_s"]) == len(b["latencies_s"]) == len(f["latencies_s"]) == 2
            assert a["output_tokens"] == b["output_tokens"] == f["output_tokens"] == 2 * output_tokens
            assert len(a["selection_ms"]) == 2 and b["selection_ms"] == f["selection_ms"] == [], "only A selects"
            assert sum(a["guesses"].values()) == 2 and sum(b["guesses"].values()) == 0, "A guesses every input"
            ratios = set(results[workload][level]["ratios"])
            assert ratios == {"throughput", "p50", "p95", "throughput_forced", "p50_forced"}


def test_a_forced_prompt_the_bank_lacks_is_refused_before_the_server_starts(tiny_llama: Path, tmp_path: Path) -> None:
    run = bench("serve.py", tiny_llama, 2, tmp_path, "--forced", "nope")
    assert run.returncode == 2 and "--forced 'nope'" in run.stderr and "tiny-p0" in run.stderr, run.stderr


@pytest.mark.slow
def test_the_speculation_benchmark_measures_grouped_and_alternating_traffic_on_three_servers(
    tiny_llama: Path, tmp_path: Path
) -> None:
    out = tmp_path / "speculation.json"
    run = bench(
        "speculation.py", tiny_llama, 3, tmp_path, "--per-task", "2", "--max-input-tokens", "40", "--json", str(out)
    )
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert run.stdout.count("| grouped |") == run.stdout.count("| alternating |") == 3, run.stdout

    results = json.loads(out.read_text())["results"]
    assert list(results) == ["off", "idle, every guess", "idle, gated (default)"]
    for server, orders in results.items():
        assert list(orders) == ["grouped", "alternating"]
        for order in orders.values():
            assert order["requests"] == 4 and order["p50_s"] > 0
            guesses = order["guesses"]
            if server == "off":
                assert sum(guesses.values()) == 0, "no guesses without speculation"
            else:
                assert 1 <= sum(guesses.values()) <= 4, (server, guesses)
            if server == "idle, every guess":
                assert guesses["skipped"] == 0, "without the gate every guess is acted on"
