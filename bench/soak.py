"""Soak: memory of every server process under long mixed traffic, and whether it levels off.

A load test of a minute says nothing about a slow leak: the vLLM worker was seen growing ~420 MiB over ~4,000
requests without levelling off, with IDP off too. So this drives a server for many minutes with N concurrent
clients (default 16) cycling through mixed workloads, and every `--interval` seconds (default 10) records the
resident memory (RSS) of each process in the server's tree: idp-serve itself, vLLM's engine core and any worker
or helper process it starts. Workloads, in turn per client:
- scoring: ~250-token input ids, max_tokens 1, echo + logprobs (lm-evaluation-harness log-likelihood), IDP on,
- generation: a text prompt, up to 64 tokens, IDP on,
- none: the same with IDP off (so growth with and without IDP is exercised alike),
- stream: a streamed generation with IDP on, read to [DONE].
Inputs are windows at random offsets and lengths (48-250 tokens) of the Lee news text, so repeats are rare and
the caches (selection, prefix) do not hide the cold path.

Written to `--out`: soak.csv (one row per process per sample), soak.json (settings, request counts, per-process
first/last/peak RSS, the slope of the first and the last third of the run and the verdict), soak.png (RSS per
process over time). A process "levels off" when the slope of its last third is under `LEVEL_MIB_PER_MIN`; the
first third's slope is printed next to it to show how much it flattened.

Against a running server (its pid, to find its process tree):
    python bench/soak.py --url http://127.0.0.1:8000 --pid PID [--clients 16] [--minutes 30] --out DIR
Or launched here, with an allocator preloaded for the whole server (Debian's libtcmalloc / libjemalloc, found with
`ldconfig -p`) or glibc's arenas capped, the remedies vLLM's CPU documentation and glibc offer. Without either the
server runs on its defaults, which preload jemalloc for vLLM's engine processes when it is installed
(server/online/allocator.py); `--idp-flag=--engine-allocator=glibc` measures glibc's malloc:
    python bench/soak.py --launch [--allocator tcmalloc|jemalloc] [--malloc-arena-max 2] [--model M]
        [--banks-dir DIR] [--bank default] [--idp-flag=...] --minutes 30 --out DIR
Re-analyse (and re-plot) a run's CSV: python bench/soak.py --analyze DIR/soak.csv --out DIR
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from launch import free_port, server_process  # bench/launch.py, beside this script

from server.online.allocator import LIBRARIES, find_library

KINDS = ("scoring", "generation", "none", "stream")
LEVEL_MIB_PER_MIN = 1.0
"""Last-third RSS slope under which a process counts as levelled off: 60 MiB an hour, a fraction of the growth
the load test saw (~420 MiB over ~4,000 requests), yet above what allocator noise makes over ten minutes."""


def find_allocator(name: str) -> str:
    """The path of an installed allocator library, or SystemExit naming the Debian package to install."""
    path = find_library(name)
    if path is None:
        raise SystemExit(f"{name} is not installed: apt-get install {LIBRARIES[name][1]}")
    return str(path)


def server_env(allocator: str | None, arena_max: int | None) -> dict[str, str]:
    """The environment of a launched server: LD_PRELOAD and MALLOC_ARENA_MAX as asked (vLLM's engine processes
    inherit both, and vLLM appends its own preloads after ours)."""
    env = dict(os.environ) | {"PYTHONUNBUFFERED": "1"}
    if allocator is not None:
        env["LD_PRELOAD"] = ":".join(p for p in (find_allocator(allocator), env.get("LD_PRELOAD")) if p)
    if arena_max is not None:
        env["MALLOC_ARENA_MAX"] = str(arena_max)
    return env


def label(process: psutil.Process, root: int) -> str:
    """A stable name for a process of the tree: idp-serve for the root, else vLLM's process title (it names its
    engine core and workers with setproctitle) or the command, with the pid."""
    if process.pid == root:
        return f"idp-serve:{root}"
    try:
        title = " ".join(process.cmdline()) or process.name()
    except psutil.Error:
        title = "?"
    short = title.split()[0].rsplit("/", 1)[-1] if title.split() else "?"
    if "python" in short and "multiprocessing" in title:
        short = "python-mp-helper"
    return f"{short}:{process.pid}"


def tree_rss(pid: int) -> dict[str, float]:
    """RSS in MiB of process `pid` and each of its descendants, by `label`."""
    root = psutil.Process(pid)
    out = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            out[label(process, pid)] = process.memory_info().rss / 2**20
        except psutil.Error:
            continue  # ended meanwhile
    return out


@dataclass
class Traffic:
    """What the clients did."""

    counts: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    latencies_s: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    @property
    def requests(self) -> int:
        return sum(self.counts.values())


class Client:
    """One client: cycles through the workloads (offset by its number, so all run at once), random inputs."""

    def __init__(
        self, number: int, http: httpx.AsyncClient, model: str, bank: str | None, text: list[int], tokenizer: Any
    ) -> None:
        self.number, self.http, self.model, self.bank = number, http, model, bank
        self.text, self.tokenizer = text, tokenizer
        self.random = random.Random(number)

    def _window(self) -> list[int]:
        length = self.random.randint(48, 250)
        start = self.random.randrange(0, len(self.text) - length)
        return self.text[start : start + length]

    def _idp(self, on: bool) -> dict[str, Any]:
        return ({"mode": "dynamic"} | ({"bank": self.bank} if self.bank else {})) if on else {"mode": "none"}

    def body(self, kind: str) -> dict[str, Any]:
        ids = self._window()
        if kind == "scoring":
            extra = {"prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 1, "idp": self._idp(True)}
        else:
            extra = {"prompt": self.tokenizer.decode(ids), "max_tokens": 64, "idp": self._idp(kind != "none")}
            extra |= {"stream": True} if kind == "stream" else {}
        return {"model": self.model, "temperature": 0, **extra}

    async def run(self, until: float, traffic: Traffic) -> None:
        step = self.number
        while time.monotonic() < until:
            kind = KINDS[step % len(KINDS)]
            step += 1
            started = time.monotonic()
            try:
                await (self._stream if kind == "stream" else self._post)(self.body(kind))
            except (httpx.HTTPError, ValueError) as error:
                traffic.errors.append(f"{kind}: {type(error).__name__}: {error}"[:300])
            traffic.counts[kind] += 1
            traffic.latencies_s[kind].append(time.monotonic() - started)

    async def _post(self, body: dict[str, Any]) -> None:
        response = await self.http.post("/v1/completions", json=body)
        if response.status_code != 200:
            raise ValueError(f"HTTP {response.status_code}: {response.text[:200]}")

    async def _stream(self, body: dict[str, Any]) -> None:
        async with self.http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    return
                if line.startswith("data: ") and '"error"' in line:
                    raise ValueError(f"error event: {line[:200]}")
        raise ValueError("stream ended without [DONE]")


async def soak(
    url: str, pid: int, model: str, bank: str | None, text: list[int], tokenizer: Any, clients: int, seconds: float,
    interval: float,
) -> tuple[list[dict[str, Any]], Traffic]:  # fmt: skip
    """Drive the clients for `seconds`, sampling the tree's RSS every `interval` (first sample before any load)."""
    traffic, rows = Traffic(), []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        start = time.monotonic()
        until = start + seconds
        workers = [Client(i, http, model, bank, text, tokenizer) for i in range(clients)]
        tasks = [asyncio.create_task(w.run(until, traffic)) for w in workers]
        while True:
            elapsed = time.monotonic() - start
            for process, rss in tree_rss(pid).items():
                rows.append(
                    {
                        "t_s": round(elapsed, 1),
                        "requests": traffic.requests,
                        "process": process,
                        "rss_mib": round(rss, 1),
                    }
                )
            if all(t.done() for t in tasks):
                break
            await asyncio.wait(tasks, timeout=interval)
        await asyncio.gather(*tasks)
    return rows, traffic


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (minutes, MiB) points, MiB per minute; None with fewer than two times."""
    if len({t for t, _ in points}) < 2:
        return None
    mean_t = sum(t for t, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    num = sum((t - mean_t) * (y - mean_y) for t, y in points)
    return num / sum((t - mean_t) ** 2 for t, _ in points)


def analyze(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per process: first, last and peak RSS, the slopes of the first and last thirds of the run, the verdict."""
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        series[row["process"]].append((float(row["t_s"]) / 60.0, float(row["rss_mib"])))
    end = max(float(row["t_s"]) for row in rows) / 60.0
    out = {}
    for process, points in series.items():
        first = slope([p for p in points if p[0] <= end / 3])
        last = slope([p for p in points if p[0] >= 2 * end / 3])
        out[process] = {
            "samples": len(points),
            "first_mib": points[0][1],
            "last_mib": points[-1][1],
            "peak_mib": max(y for _, y in points),
            "growth_mib": round(points[-1][1] - points[0][1], 1),
            "first_third_mib_per_min": None if first is None else round(first, 2),
            "last_third_mib_per_min": None if last is None else round(last, 2),
            "levels_off": None if last is None else last < LEVEL_MIB_PER_MIN,
        }
    return out


def plot(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    """RSS of every process over time, one line each."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        series[row["process"]].append((float(row["t_s"]) / 60.0, float(row["rss_mib"])))
    figure, axes = pyplot.subplots(figsize=(9, 5))
    for process, points in sorted(series.items()):
        axes.plot([t for t, _ in points], [y for _, y in points], marker=".", label=process)
    axes.set_xlabel("minutes")
    axes.set_ylabel("RSS (MiB)")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def write(rows: list[dict[str, Any]], report: dict[str, Any], out: Path, title: str) -> None:
    """soak.csv, soak.json and soak.png under `out`; prints the verdict per process."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "soak.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["t_s", "requests", "process", "rss_mib"])
        writer.writeheader()
        writer.writerows(rows)
    report["processes"] = analyze(rows)
    (out / "soak.json").write_text(json.dumps(report, indent=1))
    plot(rows, title, out / "soak.png")
    print(f"{title}\n")
    print("| process | first MiB | last MiB | peak MiB | first third MiB/min | last third MiB/min | levels off |")
    print("|---|---|---|---|---|---|---|")
    for process, p in report["processes"].items():
        print(
            f"| {process} | {p['first_mib']:.0f} | {p['last_mib']:.0f} | {p['peak_mib']:.0f} "
            f"| {p['first_third_mib_per_min']} | {p['last_third_mib_per_min']} | {p['levels_off']} |"
        )
    print(f"\nwritten {out}/soak.csv, soak.json, soak.png")


def corpus_ids(tokenizer: Any) -> list[int]:
    """The Lee news text as one token stream (held-out articles first)."""
    from server.core.config import Settings
    from server.lab.corpus import lee_heldout, lee_train, token_blocks

    data_dir = Settings().data_dir
    return token_blocks(tokenizer, lee_heldout(data_dir) + lee_train(data_dir), 1).flatten().tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for soak.csv, soak.json, soak.png")
    parser.add_argument("--url", help="a running server (with --pid)")
    parser.add_argument("--pid", type=int, help="the running server's pid: its process tree is sampled")
    parser.add_argument("--launch", action="store_true", help="start idp-serve here (and stop it at the end)")
    parser.add_argument("--analyze", type=Path, metavar="CSV", help="only re-analyse and re-plot a run's soak.csv")
    parser.add_argument("--model", help="model folder or name (default: the server's default model)")
    parser.add_argument("--banks-dir", type=Path, help="launch: banks folder (default: the project's)")
    parser.add_argument("--bank", help="bank to ask for (default: the server's default bank)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between RSS samples")
    parser.add_argument("--allocator", choices=sorted(LIBRARIES), help="launch: LD_PRELOAD this allocator")
    parser.add_argument("--malloc-arena-max", type=int, help="launch: MALLOC_ARENA_MAX for glibc's malloc")
    parser.add_argument("--idp-flag", action="append", default=[], metavar="FLAG", help="launch: extra serve flag")
    args = parser.parse_args()

    if args.analyze is not None:
        with open(args.analyze) as handle:
            rows = list(csv.DictReader(handle))
        write(rows, {"analyzed": str(args.analyze)}, args.out, f"soak re-analysed from {args.analyze}")
        return
    if args.launch == bool(args.url and args.pid) or (args.launch and (args.url or args.pid)):
        parser.error("give either --launch, or both --url and --pid")

    from transformers import AutoTokenizer

    from server.core.identity import resolve
    from server.online.settings import ServeSettings

    serve = ServeSettings()
    folder = resolve(args.model or serve.model, serve.models_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = corpus_ids(tokenizer)
    report: dict[str, Any] = {
        "clients": args.clients,
        "minutes": args.minutes,
        "interval_s": args.interval,
        "kinds": KINDS,
        "allocator": args.allocator or "glibc",
        "malloc_arena_max": args.malloc_arena_max,
        "idp_flags": args.idp_flag,
        "level_mib_per_min": LEVEL_MIB_PER_MIN,
    }

    def drive(url: str, pid: int) -> tuple[list[dict[str, Any]], Traffic]:
        model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        return asyncio.run(
            soak(url, pid, model, args.bank, text, tokenizer, args.clients, args.minutes * 60, args.interval)
        )

    if args.launch:
        port = free_port()
        cmd = [
            sys.executable, "-m", "server.cli", "serve", "--model", str(folder), "--port", str(port),
            "--max-model-len", "512", *(["--banks-dir", str(args.banks_dir)] if args.banks_dir else []),
            *(["--default-bank", args.bank] if args.bank else []), *args.idp_flag,
        ]  # fmt: skip
        args.out.mkdir(parents=True, exist_ok=True)
        env = server_env(args.allocator, args.malloc_arena_max)
        with server_process(cmd, port, args.out / "server.log", env) as (url, pid):
            rows, traffic = drive(url, pid)
    else:
        rows, traffic = drive(args.url, args.pid)

    report |= {
        "requests": traffic.requests,
        "counts": dict(traffic.counts),
        "errors": len(traffic.errors),
        "first_errors": traffic.errors[:5],
        "latency_s_median": {k: round(sorted(v)[len(v) // 2], 3) for k, v in traffic.latencies_s.items() if v},
    }
    title = (
        f"{folder.name}, {args.clients} clients x {args.minutes:g} min, {traffic.requests} requests "
        f"({len(traffic.errors)} errors), allocator {report['allocator']}"
        + (f", MALLOC_ARENA_MAX={args.malloc_arena_max}" if args.malloc_arena_max else "")
    )
    write(rows, report, args.out, title)
    sys.exit(1 if traffic.errors else 0)


if __name__ == "__main__":
    main()
