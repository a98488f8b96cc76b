"""What speculation buys when its guesses hit, what it costs when they miss, and what the guess-rate gate saves.

`bench/serve.py` sends news text, whose inputs nearly all select one prompt, so every guess hits there. Real
traffic mixes tasks whose inputs prefer different prompts. This sends scoring requests (the input, `max_tokens`
1, `echo` with `logprobs`, as lm-evaluation-harness's log-likelihood requests) built from the test examples of two
tasks that the default bank routes apart (by default bbq_race_disambig, nearly all to one prompt, and
knowledge_conflicts, mostly to another), one client at a time, in two orders over distinct examples:
- grouped: every example of the first task, then every one of the second: the last selection is a good guess;
- alternating: one of each in turn: the last selection is nearly always the wrong guess.
Each order goes to three servers, started one after the other with everything else at its defaults: speculation
off; speculation `idle` acting on every guess (`--selection-speculation-min-hit-rate 0`); and `idle` with the
default gate (act only while at least half of the bank's recent guesses hit). The selection cache is off, so
every input runs a pass. Printed: per server and order, p50 and mean latency and the guesses' outcomes (hit,
miss, skipped, from `/metrics`); also written to `--json`.

    python bench/speculation.py [--tasks bbq_race_disambig knowledge_conflicts] [--per-task 16] [--model M]
                                [--banks-dir DIR] [--bank default] [--max-input-tokens N] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import httpx
from launch import free_port, server_process  # bench/launch.py, beside this script
from serve import load, percentile, speculations  # bench/serve.py, beside this script
from transformers import AutoTokenizer

from server.core.identity import resolve
from server.lab.tasks import task_split
from server.online.settings import ServeSettings

SERVERS = {
    "off": ["--selection-speculation=off"],
    "idle, every guess": ["--selection-speculation=idle", "--selection-speculation-min-hit-rate=0"],
    "idle, gated (default)": [],
}
"""Each server's flags beyond the shared ones."""
SCORING = {"max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True}
WARMUP = 2


def task_inputs(tokenizer: Any, tasks: list[str], count: int, most: int | None) -> list[list[list[int]]]:
    """Per task, `count` distinct scoring inputs (context + first choice) from its test split, each cut to its
    first `most` tokens if given."""
    out = []
    for task in tasks:
        examples = task_split(task, "test")
        if len(examples) < count:
            raise ValueError(f"{task} has {len(examples)} test examples, {count} asked for")
        out.append([tokenizer(e.context + e.choices[0])["input_ids"][:most] for e in examples[:count]])
    return out


def orders(per_task: list[list[list[int]]], count: int) -> tuple[list[list[int]], dict[str, list[list[int]]]]:
    """Warm-up inputs, and the two orders of `count` inputs per task each, all disjoint (no input repeats)."""
    warmup = per_task[0][:WARMUP]
    first = [inputs[WARMUP : WARMUP + count] for inputs in per_task]
    second = [inputs[WARMUP + count : WARMUP + 2 * count] for inputs in per_task]
    return warmup, {
        "grouped": [ids for inputs in first for ids in inputs],
        "alternating": [ids for group in zip(*second, strict=True) for ids in group],
    }


def measure(url: str, model: str, bank: str, inputs: list[list[int]]) -> dict[str, Any]:
    """One client sends `inputs` in order; latencies and the guess outcomes meanwhile."""
    before = speculations(url)
    bodies = [{"model": model, "prompt": ids, "idp": {"bank": bank, "mode": "dynamic"}, **SCORING} for ids in inputs]
    level = asyncio.run(load(url, bodies, 1))
    after = speculations(url)
    return {
        "requests": level.requests,
        "p50_s": percentile(level.latencies_s, 50),
        "mean_s": statistics.fmean(level.latencies_s),
        "selection_ms": statistics.median(level.selection_ms) if level.selection_ms else None,
        "guesses": {k: after[k] - before[k] for k in after},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve = ServeSettings()
    parser.add_argument("--tasks", nargs=2, default=["bbq_race_disambig", "knowledge_conflicts"])
    parser.add_argument("--per-task", type=int, default=16, help="inputs per task and order")
    parser.add_argument("--model", default=serve.model)
    parser.add_argument("--banks-dir", type=Path, default=serve.banks_dir)
    parser.add_argument("--bank", default="default")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--max-input-tokens", type=int, help="cut inputs to this many tokens (small test models)")
    parser.add_argument("--json", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "bench-speculation.json")
    args = parser.parse_args()

    folder = resolve(args.model, serve.models_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = task_inputs(tokenizer, args.tasks, WARMUP + 2 * args.per_task, args.max_input_tokens)
    warmup, by_order = orders(inputs, args.per_task)
    results: dict[str, dict[str, Any]] = {}
    for server, flags in SERVERS.items():
        port = free_port()
        cmd = [
            sys.executable, "-m", "server.cli", "serve", "--model", str(folder), "--port", str(port),
            "--max-model-len", str(args.max_model_len), "--banks-dir", str(args.banks_dir),
            "--default-bank", args.bank, "--selection-cache-size", "0", *flags,
        ]  # fmt: skip
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-speculation-{port}.log"
        print(f"{server}: starting idp-serve (log {log}) ...", file=sys.stderr)
        with server_process(cmd, port, log) as (url, _):
            model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
            measure(url, model, args.bank, warmup)  # the first calls' one-off costs
            results[server] = {order: measure(url, model, args.bank, inputs) for order, inputs in by_order.items()}
    print(f"\nscoring requests, one client, tasks {' and '.join(args.tasks)}, bank {args.bank}, model {folder.name}\n")
    print("| server | order | requests | p50 s | mean s | selection ms | guesses hit / miss / skipped |")
    print("|---|---|---|---|---|---|---|")
    for server, by in results.items():
        for order, r in by.items():
            g = r["guesses"]
            print(
                f"| {server} | {order} | {r['requests']} | {r['p50_s']:.3f} | {r['mean_s']:.3f} "
                f"| {r['selection_ms'] or float('nan'):.0f} | {g['hit']:.0f} / {g['miss']:.0f} / {g['skipped']:.0f} |"
            )
    args.json.write_text(json.dumps({"tasks": args.tasks, "bank": args.bank, "results": results}, indent=1))
    print(f"\nwritten {args.json}")


if __name__ == "__main__":
    main()
