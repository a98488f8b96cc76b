"""IDP server vs the stock vLLM server on the same compressed model, in one run.

The stock server (`python -m vllm.entrypoints.openai.api_server --enable-prompt-embeds`) gets one static soft
prompt in front of every input as `prompt_embeds` (the best a plain vLLM deployment can do with a prompt bank);
idp-serve selects a prompt per request from the bank (mode dynamic) and decodes it the same way. Same model,
dtype, KV cache, eager mode; the servers run one after the other, never at once, so they never share the CPU.

idp-serve keeps its own threads off the cores vLLM pins its workers to (server/cpus.py); the stock server does
not. `--pin-stock` adds a third run, the stock server with its API process pinned the same way (with `taskset`
semantics, from outside), so the table also shows what is left of the overhead once both are placed alike.

Workload: 128-token prompts cut from the Lee news text (held-out articles first, then the background ones), 64
output tokens (ignore_eos), greedy, at concurrency 1, 8 and 32, 4 x concurrency requests per level (at least 16).
Every request of the run has its own input by default: a repeated input is mostly skipped by vLLM's prefix cache
(on in both servers; 63-78% of the stock server's prompt tokens when this script cycled through 39 inputs) and by
idp-serve's selection cache, so repeats measure the caches, not the servers. `--input-pool N` cycles through N
inputs instead, for that repeated-traffic case. Printed: output throughput and p50/p95 request latency of each
server, and the ratios IDP / stock.

    python bench/serve.py [--concurrency 1 8 32] [--requests-per-level 4] [--bank default] [--pin-stock]
                          [--input-pool N] [--idp-flag=--selection-batch-size=16 ...]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from transformers import AutoTokenizer

from server.core.banks import load_bank
from server.core.config import Settings
from server.core.identity import embedding_weight, resolve
from server.lab.corpus import lee_heldout, lee_train, token_blocks
from server.online.cpus import frontend_cpus, pin_process, pinned_by_children
from server.online.settings import ServeSettings

PROMPT_TOKENS, OUTPUT_TOKENS = 128, 64
MIN_REQUESTS = 16
"""Requests of a level at least: at concurrency 1, 4 requests made a p50 that moved by 5-8% from run to run."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pin_frontend(pid: int) -> list[int]:
    """Pin every thread of server process `pid` off the CPUs its engine's workers are pinned to, as idp-serve
    pins itself (server/cpus.py)."""
    cpus = sorted(frontend_cpus(pinned_by_children(pid)))
    pin_process(cpus, pid)
    return cpus


@contextmanager
def running(cmd: list[str], port: int, log: Path, pin: bool = False):
    """Start a server process, wait for /health, stop it afterwards."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ | {"PYTHONUNBUFFERED": "1"})
        try:
            deadline = time.time() + 900
            while time.time() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError(f"{cmd[:4]} exited with {proc.returncode}; see {log}")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(2)
            else:
                raise RuntimeError(f"{cmd[:4]} did not become healthy; see {log}")
            if pin:
                print(f"  pinned {cmd[2]} to CPUs {pin_frontend(proc.pid)}", file=sys.stderr)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(60)


@dataclass
class Level:
    """What one concurrency level measured on one server."""

    wall_s: float
    latencies: list[float]
    tokens: int
    selection_ms: list[float]  # idp-serve's per-input selection time (`idp.selection_ms`); empty for stock vLLM

    def row(self) -> tuple[float, float, float]:
        """Output tok/s, p50 and p95 latency in seconds."""
        return self.tokens / self.wall_s, percentile(self.latencies, 50), percentile(self.latencies, 95)


async def load(url: str, bodies: list[dict], concurrency: int) -> Level:
    """Send `bodies` with at most `concurrency` in flight."""
    semaphore = asyncio.Semaphore(concurrency)
    level = Level(0.0, [], 0, [])
    async with httpx.AsyncClient(timeout=1800) as client:

        async def one(body: dict) -> None:
            async with semaphore:
                start = time.perf_counter()
                response = await client.post(f"{url}/v1/completions", json=body)
                response.raise_for_status()
                level.latencies.append(time.perf_counter() - start)
                answer = response.json()
                level.tokens += answer["usage"]["completion_tokens"]
                level.selection_ms += [c["idp"]["selection_ms"] for c in answer["choices"] if "idp" in c]

        start = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        level.wall_s = time.perf_counter() - start
        return level


def embeds_b64(tensor: torch.Tensor) -> str:
    """vLLM's wire format for prompt_embeds: base64 of a torch.save'd tensor (we only write it)."""
    buffer = io.BytesIO()
    torch.save(tensor.contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode()


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--requests-per-level", type=int, default=4, help=f"requests = this x concurrency (at least {MIN_REQUESTS})"
    )
    parser.add_argument("--bank", default="default")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--pin-stock", action="store_true", help="also run the stock server pinned like ours")
    parser.add_argument(
        "--idp-flag",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra flag for `idp-serve serve`, repeatable: --idp-flag=--selection-batch-size=16",
    )
    parser.add_argument(
        "--input-pool",
        type=int,
        default=None,
        help="cycle through this many distinct inputs (default: a new input for every request)",
    )
    args = parser.parse_args()

    serve = ServeSettings()
    folder = resolve(serve.model, serve.models_dir)
    bank = load_bank(serve.banks_dir / args.bank)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    data_dir = Settings().data_dir
    blocks = token_blocks(tokenizer, lee_heldout(data_dir) + lee_train(data_dir), PROMPT_TOKENS)
    levels = [2] + [max(MIN_REQUESTS, args.requests_per_level * c) for c in args.concurrency]  # warm-up, levels
    pool = args.input_pool or sum(levels)
    if pool > len(blocks):
        parser.error(f"{pool} distinct inputs wanted, the corpus has {len(blocks)}: lower the requests or --input-pool")
    table = embedding_weight(folder)
    static = bank.embeddings[0]
    common = {"max_tokens": OUTPUT_TOKENS, "temperature": 0, "ignore_eos": True}
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    engine_flags = ["--dtype", args.dtype, "--max-model-len", "512", "--enforce-eager"]
    results: dict[str, dict[int, Level]] = {}

    def workloads(make) -> list[list[dict]]:
        """Request bodies of the warm-up and of each level: consecutive inputs of the pool, cycling within it."""
        bodies, start = [], 0
        for n in levels:
            bodies.append([make(blocks[(start + i) % pool]) for i in range(n)])
            start += n
        return bodies

    stock_port, idp_port = free_port(), free_port()
    stock_cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(folder),
        "--port",
        str(stock_port),
        "--enable-prompt-embeds",
        "--kv-cache-memory-bytes",
        str(2**30),
        *engine_flags,
    ]
    idp_cmd = [
        sys.executable,
        "-m",
        "server.cli",
        "serve",
        "--model",
        str(folder),
        "--port",
        str(idp_port),
        "--dtype",
        args.dtype,
        "--max-model-len",
        "512",
        "--default-bank",
        args.bank,
        *args.idp_flag,
    ]

    def stock_body(ids: torch.Tensor) -> dict:
        return {"model": str(folder), "prompt_embeds": embeds_b64(torch.cat([static, table[ids]])), **common}

    runs = {
        "stock": (stock_cmd, stock_port, False, stock_body),
        "idp": (
            idp_cmd,
            idp_port,
            False,
            lambda ids: {
                "model": folder.name,
                "prompt": ids.tolist(),
                "idp": {"bank": args.bank, "mode": "dynamic"},
                **common,
            },
        ),
    }
    if args.pin_stock:
        runs["stock pinned"] = (stock_cmd, stock_port, True, stock_body)
    for label, (cmd, port, pin, make) in runs.items():
        print(f"starting {label} ...", file=sys.stderr)
        with running(cmd, port, logs / f"bench-serve-{port}.log", pin) as url:
            warmup, *per_level = workloads(make)
            asyncio.run(load(url, warmup, 1))
            results[label] = {}
            for c, bodies in zip(args.concurrency, per_level, strict=True):
                results[label][c] = asyncio.run(load(url, bodies, c))
                print(f"  {label} c={c}: {results[label][c].row()[0]:.1f} tok/s", file=sys.stderr)

    print(
        f"\nmodel {folder.name}, bank {args.bank} (K={bank.k}, m={bank.m}), dtype {args.dtype}, "
        f"idp-serve flags {' '.join(args.idp_flag) or '(defaults)'}, "
        f"{PROMPT_TOKENS}-token prompts, {OUTPUT_TOKENS} output tokens, "
        f"{args.requests_per_level} x concurrency requests per level (at least {MIN_REQUESTS}), "
        f"{'every input distinct' if args.input_pool is None else f'inputs cycled from a pool of {pool}'}\n"
    )
    print(TABLE_HEAD)
    for baseline in [b for b in ("stock", "stock pinned") if b in results]:
        for c in args.concurrency:
            (st, s50, s95), (it, i50, i95) = results[baseline][c].row(), results["idp"][c].row()
            print(
                f"| idp vs {baseline} | {c} | {st:.1f} | {it:.1f} | {it / st:.2f}x | {s50:.2f} | {i50:.2f} "
                f"| {i50 / s50:.2f}x | {s95:.2f} | {i95:.2f} | {i95 / s95:.2f}x |"
            )
    passes = ", ".join(f"c={c} {statistics.median(results['idp'][c].selection_ms):.0f} ms" for c in args.concurrency)
    print(f"\nidp-serve selection pass per input (median of the reported `idp.selection_ms`): {passes}")


TABLE_HEAD = """| run | concurrency | stock tok/s | IDP tok/s | throughput ratio | stock p50 s | IDP p50 s | p50 ratio \
| stock p95 s | IDP p95 s | p95 ratio |
|---|---|---|---|---|---|---|---|---|---|---|"""

if __name__ == "__main__":
    main()
