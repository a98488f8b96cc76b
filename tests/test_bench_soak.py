"""bench/soak.py: its verdict on memory series, and a short run of the whole soak on a tiny model.

The verdict is what the soak is for, so it is checked on series whose answer is known: a process that grows
steadily does not level off, one that grows and then stays flat does. The short run checks the code paths
(launch, mixed traffic, sampling the server's process tree, CSV/JSON/PNG); it measures nothing.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.core.banks import save_bank
from tests.helpers import ROOT, random_bank

SOAK = str(ROOT / "bench" / "soak.py")
ENV = os.environ | {"PYTHONPATH": str(ROOT)}  # the project importable however it was installed


def test_steady_growth_does_not_level_off_and_growth_that_stops_does(tmp_path: Path) -> None:
    rows = []
    for minute in range(31):
        rows.append({"t_s": minute * 60, "requests": minute * 100, "process": "leaking", "rss_mib": 1000 + 7 * minute})
        settled = 1000 + 10 * min(minute, 8)  # fills its caches for 8 minutes, then flat (with noise)
        rows.append(
            {"t_s": minute * 60, "requests": minute * 100, "process": "settling", "rss_mib": settled + minute % 2}
        )
    with open(tmp_path / "soak.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["t_s", "requests", "process", "rss_mib"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "report"
    run = subprocess.run(
        [sys.executable, SOAK, "--analyze", str(tmp_path / "soak.csv"), "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    processes = json.loads((out / "soak.json").read_text())["processes"]
    assert processes["leaking"]["levels_off"] is False
    assert processes["leaking"]["last_third_mib_per_min"] == pytest.approx(7.0)
    assert processes["settling"]["levels_off"] is True
    assert processes["settling"]["first_third_mib_per_min"] > 5
    assert (out / "soak.png").stat().st_size > 0 and "| leaking |" in run.stdout


@pytest.mark.slow
def test_a_short_soak_samples_every_server_process_under_mixed_traffic(tiny_llama: Path, tmp_path: Path) -> None:
    save_bank(random_bank(tiny_llama, "tiny", k=3, m=4, seed=0), tmp_path / "banks" / "tiny")
    out = tmp_path / "soak"
    command = [
        sys.executable, SOAK, "--launch", "--model", str(tiny_llama), "--banks-dir", str(tmp_path / "banks"),
        "--bank", "tiny", "--clients", "4", "--minutes", "0.33", "--interval", "2", "--out", str(out),
        "--malloc-arena-max", "2",
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT, env=ENV)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    report = json.loads((out / "soak.json").read_text())
    assert report["errors"] == 0 and report["malloc_arena_max"] == 2
    assert set(report["counts"]) == {"scoring", "generation", "none", "stream"}, report["counts"]
    processes = report["processes"]
    lasting = {name.rsplit(":", 1)[0] for name, p in processes.items() if p["samples"] >= 5}
    assert {"idp-serve", "VLLM::EngineCore"} <= lasting, (
        f"the server and its engine core, sampled throughout: {processes}"
    )
    assert (out / "soak.png").stat().st_size > 0
