"""What IDP costs on the request path: idp-serve with a bank (A) against idp-serve with IDP off (B), in one run.

One idp-serve server, the same model, engine and machine for both arms: A asks for dynamic selection over the
bank (`"idp": {"bank": ..., "mode": "dynamic"}`: a selection pass, then vLLM decodes [chosen prompt | input]);
B asks for IDP off (`"idp": {"mode": "none"}`: vLLM decodes the input alone, no selection pass). That is the
comparison a user makes when deciding whether to turn IDP on.

Two workloads, as clients send them:
- scoring: ~250-token prompts, `max_tokens` 1, `echo` with `logprobs` 1, greedy: lm-evaluation-harness's
  log-likelihood requests (its `local-completions` model), also what rerankers and classifiers send. Prefill
  only, so the selection pass has no decoding to hide behind.
- generation: 128-token prompts, 64 output tokens (`ignore_eos`), greedy.

At each concurrency (default 1, 8, 32) each arm sends max(16, 4 x concurrency) requests, arms alternating which
goes first from level to level so a slow drift of the machine does not favour one. Every input of a workload is
distinct (consecutive blocks of the Lee news text, held-out articles first; scoring and generation take
disjoint token ranges), and A and B get the same inputs: a repeated input would be mostly skipped by vLLM's
prefix cache and idp-serve's selection cache, measuring the caches, not the request path. A's inputs start with
virtual tokens and B's do not, so neither arm's prefix cache serves the other. `--input-pool N` cycles through N
inputs instead, for the repeated-traffic case.

Printed: one table per workload, throughput (requests/s), p50 and p95 latency of each arm and the ratios A / B,
the median selection time the server reports for A (`idp.selection_ms`) and, when the server speculates
(`--idp-flag=--selection-speculation=idle`), how many of A's guessed decodes it kept (its `/metrics`). Everything
also goes to `--json`.

`--forced PROMPT` adds a third arm, F: the bank's prompt PROMPT forced (`"mode": "forced"`), so vLLM decodes
[prompt | input] as in A but no selection pass runs. It splits A's cost into the prompt's (F / B: m more
positions to prefill, sent as embeddings) and the selection's (A / F).

    python bench/serve.py [--workloads scoring generation] [--concurrency 1 8 32] [--requests-per-level 4]
                          [--model M] [--banks-dir DIR] [--bank default] [--input-pool N] [--json PATH]
                          [--forced PROMPT]
                          [--idp-flag=--selection-idle-threads=0 ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from launch import free_port, server_process  # bench/launch.py, beside this script
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from server.core.banks import bank_dir, load_bank
from server.core.config import Settings
from server.core.identity import resolve
from server.lab.corpus import lee_heldout, lee_train, token_blocks
from server.online.settings import ServeSettings


@dataclass(frozen=True)
class Workload:
    """What every request of a workload asks for, besides its input and its `idp` field."""

    name: str
    prompt_tokens: int
    body: dict[str, Any]


WORKLOADS = {
    "scoring": Workload("scoring", 250, {"max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True, "seed": 1234}),
    "generation": Workload("generation", 128, {"max_tokens": 64, "temperature": 0, "ignore_eos": True}),
}
ARMS = ("A", "B")
"""A: IDP on (dynamic selection over the bank); B: IDP off. With `--forced`, F too: one prompt forced, no pass."""
MIN_REQUESTS = 16
"""Requests of a level at least: at concurrency 1, 4 requests made a p50 that moved by 5-8% from run to run."""
WARMUP = 2
"""Requests per arm and workload before the first level: the first requests pay one-off costs (allocations,
kernels' first calls) that are no part of serving."""


@dataclass
class Level:
    """What one arm measured at one concurrency."""

    requests: int = 0
    wall_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    selection_ms: list[float] = field(default_factory=list)
    """idp-serve's per-input selection time (`idp.selection_ms`); empty for arm B, which selects nothing."""
    guesses: dict[str, float] = field(default_factory=dict)
    """Speculative decodes during this level by outcome (hit, miss), from the server's `/metrics`; all 0 unless
    the server runs with `--selection-speculation`."""

    @property
    def throughput(self) -> float:
        """Requests per second."""
        return self.requests / self.wall_s

    def p(self, q: int) -> float:
        """The q-th percentile of the request latencies, in seconds."""
        return percentile(self.latencies_s, q)


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


async def load(url: str, bodies: list[dict[str, Any]], concurrency: int) -> Level:
    """Send `bodies` with at most `concurrency` in flight; every answer must be a 200 with a choice per input."""
    semaphore = asyncio.Semaphore(concurrency)
    level = Level(requests=len(bodies))
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=1800, limits=limits) as client:

        async def one(body: dict[str, Any]) -> None:
            async with semaphore:
                start = time.perf_counter()
                response = await client.post(f"{url}/v1/completions", json=body)
                elapsed = time.perf_counter() - start
            response.raise_for_status()
            answer = response.json()
            level.latencies_s.append(elapsed)
            level.output_tokens += answer["usage"]["completion_tokens"]
            picks = [c.get("idp") or {} for c in answer["choices"]]
            level.selection_ms += [p["selection_ms"] for p in picks if p.get("selection_ms") is not None]

        start = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        level.wall_s = time.perf_counter() - start
    return level


def input_blocks(tokenizer: Any, data_dir: Path, lengths: list[tuple[int, int]]) -> list[list[list[int]]]:
    """For each (tokens, count), `count` distinct inputs of that many tokens, from disjoint ranges of the text."""
    flat = token_blocks(tokenizer, lee_heldout(data_dir) + lee_train(data_dir), 1).flatten().tolist()
    out, start = [], 0
    for length, count in lengths:
        end = start + length * count
        if end > len(flat):
            raise ValueError(f"the corpus has {len(flat)} tokens, {end} needed: lower the requests or --input-pool")
        out.append([flat[i : i + length] for i in range(start, end, length)])
        start = end
    return out


def levels(concurrency: list[int], per_level: int, least: int = MIN_REQUESTS) -> list[int]:
    """Requests per arm at each concurrency."""
    return [max(least, per_level * c) for c in concurrency]


def run_workload(
    url: str,
    workload: Workload,
    inputs: list[list[int]],
    concurrency: list[int],
    counts: list[int],
    make: Callable[[str, list[int]], dict[str, Any]],
    arms: tuple[str, ...] = ARMS,
) -> dict[int, dict[str, Level]]:
    """Warm up, then at each concurrency run every arm on the same inputs, alternating which goes first."""
    pool = iter_inputs(inputs)
    warm = [next(pool) for _ in range(WARMUP)]
    for arm in arms:
        asyncio.run(load(url, [make(arm, ids) for ids in warm], 1))
    results: dict[int, dict[str, Level]] = {}
    for index, (c, n) in enumerate(zip(concurrency, counts, strict=True)):
        batch = [next(pool) for _ in range(n)]
        results[c] = {}
        for arm in arms if index % 2 == 0 else arms[::-1]:
            before = speculations(url)
            results[c][arm] = asyncio.run(load(url, [make(arm, ids) for ids in batch], c))
            results[c][arm].guesses = {k: v - before[k] for k, v in speculations(url).items()}
            print(f"  {workload.name} c={c} {arm}: {results[c][arm].throughput:.2f} req/s", file=sys.stderr)
    return results


def speculations(url: str) -> dict[str, float]:
    """The server's guesses so far, by outcome (`idp_speculations_total`: hit, miss, skipped)."""
    counts = {"hit": 0.0, "miss": 0.0, "skipped": 0.0}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == "idp_speculations_total":
                counts[sample.labels["outcome"]] = sample.value
    return counts


def iter_inputs(inputs: list[list[int]]) -> Iterator[list[int]]:
    """The inputs in order, cycling (only `--input-pool` makes the pool shorter than the run)."""
    while True:
        yield from inputs


def table(workload: str, results: dict[int, dict[str, Level]]) -> str:
    """The markdown table of one workload: each arm's numbers and the ratios A / B (and F / B with a forced arm)."""
    forced = "F" in next(iter(results.values()))
    lines = [
        f"{workload}: A = IDP on, B = IDP off" + (", F = one prompt forced (no selection pass)" if forced else ""),
        "",
        "| concurrency | A req/s | B req/s | throughput A/B | A p50 s | B p50 s | p50 A/B | A p95 s | B p95 s "
        "| p95 A/B | A selection ms (median) | A guesses right |"
        + (" F p50 s | throughput F/B | p50 F/B |" if forced else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if forced else ""),
    ]
    for c, arms in results.items():
        a, b = arms["A"], arms["B"]
        selection = statistics.median(a.selection_ms) if a.selection_ms else float("nan")
        guessed = a.guesses.get("hit", 0) + a.guesses.get("miss", 0)
        right = f"{a.guesses['hit']:.0f}/{guessed:.0f}" if guessed else "-"
        line = (
            f"| {c} | {a.throughput:.2f} | {b.throughput:.2f} | {a.throughput / b.throughput:.2f}x "
            f"| {a.p(50):.2f} | {b.p(50):.2f} | {a.p(50) / b.p(50):.2f}x "
            f"| {a.p(95):.2f} | {b.p(95):.2f} | {a.p(95) / b.p(95):.2f}x | {selection:.0f} | {right} |"
        )
        if forced:
            f = arms["F"]
            line += f" {f.p(50):.2f} | {f.throughput / b.throughput:.2f}x | {f.p(50) / b.p(50):.2f}x |"
        lines.append(line)
    return "\n".join(lines)


def summary(results: dict[int, dict[str, Level]]) -> dict[str, Any]:
    """JSON-ready numbers of one workload, per concurrency: both arms' raw measurements and the ratios."""
    out: dict[str, Any] = {}
    for c, arms in results.items():
        a, b = arms["A"], arms["B"]
        ratios = {"throughput": a.throughput / b.throughput, "p50": a.p(50) / b.p(50), "p95": a.p(95) / b.p(95)}
        if "F" in arms:
            f = arms["F"]
            ratios |= {"throughput_forced": f.throughput / b.throughput, "p50_forced": f.p(50) / b.p(50)}
        out[str(c)] = {
            "ratios": ratios,
            **{
                arm: asdict(level) | {"throughput": level.throughput, "p50": level.p(50), "p95": level.p(95)}
                for arm, level in arms.items()
            },
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--requests-per-level",
        type=int,
        default=4,
        help=f"requests per arm = this x concurrency (at least {MIN_REQUESTS})",
    )
    parser.add_argument(
        "--min-requests", type=int, default=MIN_REQUESTS, help="requests per arm and level at least (smoke runs: 2)"
    )
    serve = ServeSettings()
    parser.add_argument("--model", default=serve.model, help="model folder or name under models_dir")
    parser.add_argument("--banks-dir", type=Path, default=serve.banks_dir)
    parser.add_argument("--bank", default="default")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument(
        "--idp-flag",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra flag for `idp-serve serve`, repeatable: --idp-flag=--selection-idle-threads=0",
    )
    parser.add_argument(
        "--input-pool",
        type=int,
        default=None,
        help="cycle through this many inputs per workload (default: all distinct)",
    )
    parser.add_argument(
        "--forced", metavar="PROMPT", help="add arm F: this prompt of the bank forced, no selection pass"
    )
    parser.add_argument(
        "--json", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "bench-serve.json", help="results file"
    )
    args = parser.parse_args()

    folder = resolve(args.model, serve.models_dir)
    bank = load_bank(bank_dir(args.banks_dir, args.bank))
    if args.forced is not None and args.forced not in bank.prompt_names:
        parser.error(f"--forced {args.forced!r}: bank {args.bank!r} has the prompts {bank.prompt_names}")
    arms = ARMS + (("F",) if args.forced is not None else ())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    counts = levels(args.concurrency, args.requests_per_level, args.min_requests)
    needed = WARMUP + sum(counts)
    chosen = [WORKLOADS[name] for name in args.workloads]
    per_workload = input_blocks(
        tokenizer, Settings().data_dir, [(w.prompt_tokens, args.input_pool or needed) for w in chosen]
    )

    port = free_port()
    cmd = [
        sys.executable, "-m", "server.cli", "serve",
        "--model", str(folder), "--port", str(port), "--dtype", args.dtype,
        "--max-model-len", str(args.max_model_len),
        "--banks-dir", str(args.banks_dir), "--default-bank", args.bank,
        *args.idp_flag,
    ]  # fmt: skip
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-serve-{port}.log"
    results: dict[str, dict[int, dict[str, Level]]] = {}
    print(f"starting idp-serve (log {log}) ...", file=sys.stderr)
    with server_process(cmd, port, log) as (url, _):
        name = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        for workload, inputs in zip(chosen, per_workload, strict=True):

            def make(arm: str, ids: list[int], workload: Workload = workload) -> dict[str, Any]:
                idp = {
                    "A": {"bank": args.bank, "mode": "dynamic"},
                    "B": {"mode": "none"},
                    "F": {"bank": args.bank, "mode": "forced", "prompt": args.forced},
                }[arm]
                return {"model": name, "prompt": ids, "idp": idp, **workload.body}

            results[workload.name] = run_workload(url, workload, inputs, args.concurrency, counts, make, arms)

    config = {
        "model": folder.name,
        "bank": {"name": args.bank, "k": bank.k, "m": bank.m},
        "dtype": args.dtype,
        "idp_flags": args.idp_flag,
        "forced": args.forced,
        "requests_per_arm": dict(zip(map(str, args.concurrency), counts, strict=True)),
        "inputs": "every input distinct" if args.input_pool is None else f"cycled from a pool of {args.input_pool}",
        "cpus": os.cpu_count(),
        "workloads": {w.name: {"prompt_tokens": w.prompt_tokens, **w.body} for w in chosen},
    }
    print(
        f"\nmodel {folder.name}, bank {args.bank} (K={bank.k}, m={bank.m}), dtype {args.dtype}, idp-serve flags "
        f"{' '.join(args.idp_flag) or '(defaults)'}, requests per arm {config['requests_per_arm']}, "
        f"{config['inputs']}, {os.cpu_count()} CPUs\n"
    )
    for workload in chosen:
        print(
            table(f"{workload.name} ({workload.prompt_tokens}-token prompts, {workload.body})", results[workload.name])
        )
        print()
    args.json.write_text(
        json.dumps({"config": config, "results": {k: summary(v) for k, v in results.items()}}, indent=1)
    )
    print(f"written {args.json}")


if __name__ == "__main__":
    main()
