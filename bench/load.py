"""Bounded load test of a running idp-serve on loopback: many concurrent clients, every IDP mode, cancellations.

N clients (default 32) loop for a fixed duration; each request is, in turn, one of
- dynamic: a completion whose chosen prompt must equal the selection computed offline for its input
  (`CachedSelector` on the same model and bank, the oracle-checked serving selector),
- forced: a completion forcing a prompt of the bank, which must come back as that prompt,
- none: a completion without IDP,
- stream: a dynamic streamed completion, read to `[DONE]` (an error event counts as an error),
- cancel: a dynamic stream the client abandons after its first event (its engine request must be aborted).

Afterwards it checks that the engine drained (vLLM's `num_requests_running` and `num_requests_waiting` on
/metrics return to 0) and that every cancelled stream was aborted rather than decoded to its end: a cancelled
stream asks for many tokens past end-of-sequence, so had it run on it would have finished with reason `length`;
vLLM's `request_success` counters must instead grow by exactly the requests that were not cancelled. Given the
server's pid, it also checks that the server process's memory (RSS) stayed flat between the end of warm-up and
the end. The vLLM engine processes (its children) are measured and reported apart, not judged: their heap grows
under any load, plain token-id requests without IDP included (vLLM's CPU worker, not idp-serve code).
Exit status 0 only with no errors, no wrong prompts, a drained engine, aborted cancels and a flat server RSS.

Run against a server started with `idp-serve serve`:
    python bench/load.py --url http://127.0.0.1:8000 --model MODEL_DIR --banks-dir BANKS [--pid PID]
        [--clients 32] [--duration 60] [--bank NAME] [--api-key KEY]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

KINDS = ("dynamic", "forced", "none", "stream", "cancel")
SUBJECTS = [
    "The river",
    "My neighbour's cat",
    "A tired engineer",
    "The old library",
    "Quantum computers",
    "The recipe",
    "Our small startup",
    "The orchestra",
]
ACTIONS = [
    "quietly explained why",
    "never understood how",
    "wrote a long letter about",
    "was surprised that",
    "kept asking whether",
    "forgot completely that",
]
ENDINGS = [
    "the bridge was closed.",
    "prices went up again.",
    "def main(): return 0",
    "Paris is in France.",
    "two plus two is four.",
    "nobody came to the meeting.",
]
DRAIN_TIMEOUT_S = 30.0
RSS_GROWTH_LIMIT_MIB = 64.0
"""Growth allowed between warm-up and the end: allocator noise and caches that fill once, not a leak's slope."""


def load_inputs(count: int = 48) -> list[str]:
    """A fixed, varied pool of inputs (deterministic, so runs are comparable)."""
    pool = [f"{s} {a} {e}" for s, a, e in itertools.product(SUBJECTS, ACTIONS, ENDINGS)]
    return pool[:: max(1, len(pool) // count)][:count]


@dataclass
class LoadReport:
    """What a run did and found; `ok` is the verdict."""

    clients: int
    duration_s: float
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    latencies_ms: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    errors: list[str] = field(default_factory=list)
    wrong_prompts: list[str] = field(default_factory=list)
    drained: bool | None = None
    finished: dict[str, float] = field(default_factory=dict)
    rss_mib: list[float] = field(default_factory=list)
    """Server process RSS (MiB), sampled every second from the end of warm-up."""
    engine_rss_mib: list[float] = field(default_factory=list)
    """RSS (MiB) of the server's child processes (vLLM's engine core and worker), sampled alike."""

    def sample_rss(self, server: float, engine: float) -> None:
        self.rss_mib.append(server)
        self.engine_rss_mib.append(engine)

    @property
    def requests(self) -> int:
        return sum(self.counts.values())

    @property
    def rss_growth_mib(self) -> float | None:
        return self.rss_mib[-1] - self.rss_mib[0] if len(self.rss_mib) >= 2 else None

    @property
    def engine_rss_growth_mib(self) -> float | None:
        return self.engine_rss_mib[-1] - self.engine_rss_mib[0] if len(self.engine_rss_mib) >= 2 else None

    @property
    def aborted(self) -> bool:
        """Whether the engine finished (stop/length) exactly the requests that were not cancelled."""
        completed = self.requests - self.counts["cancel"]
        return self.finished.get("stop", 0) + self.finished.get("length", 0) == completed

    @property
    def ok(self) -> bool:
        growth = self.rss_growth_mib
        return (
            not self.errors
            and not self.wrong_prompts
            and self.drained is True
            and self.aborted
            and (growth is None or growth < RSS_GROWTH_LIMIT_MIB)
        )

    def summary(self) -> dict[str, Any]:
        def pct(values: list[float], q: float) -> float | None:
            return round(statistics.quantiles(values, n=100)[q - 1], 1) if len(values) >= 2 else None

        return {
            "ok": self.ok,
            "clients": self.clients,
            "duration_s": round(self.duration_s, 1),
            "requests": self.requests,
            "requests_per_s": round(self.requests / self.duration_s, 2),
            "counts": self.counts,
            "latency_ms_p50_p95": {k: [pct(v, 50), pct(v, 95)] for k, v in self.latencies_ms.items()},
            "errors": len(self.errors),
            "first_errors": self.errors[:5],
            "wrong_prompts": len(self.wrong_prompts),
            "first_wrong_prompts": self.wrong_prompts[:5],
            "engine_drained": self.drained,
            "engine_finished": self.finished,
            "cancels_aborted": self.aborted,
            "server_rss_growth_mib": None if self.rss_growth_mib is None else round(self.rss_growth_mib, 1),
            "server_rss_mib_series": _series(self.rss_mib),
            "engine_rss_growth_mib": None
            if self.engine_rss_growth_mib is None
            else round(self.engine_rss_growth_mib, 1),
            "engine_rss_mib_series": _series(self.engine_rss_mib),
        }


def _series(values: list[float], points: int = 12) -> list[float]:
    """About `points` evenly spaced samples, the last one always included."""
    picked = values[:: max(1, len(values) // points)]
    return [round(x, 1) for x in picked + values[-1:] if values]


def process_rss(pid: int) -> Callable[[], tuple[float, float]]:
    """RSS in MiB of a process, and of its children together (vLLM's engine core and worker processes)."""
    process = psutil.Process(pid)

    def rss() -> tuple[float, float]:
        children = 0
        for child in process.children(recursive=True):
            try:
                children += child.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return process.memory_info().rss / 2**20, children / 2**20

    return rss


class _Client:
    """One simulated client: cycles through its kinds (offset by its number, so all kinds run at once)."""

    def __init__(
        self,
        number: int,
        http: httpx.AsyncClient,
        model: str,
        bank: str,
        prompts: Sequence[str],
        expected: dict[str, str],
        report: LoadReport,
        cancel_max_tokens: int,
        kinds: Sequence[str],
    ) -> None:
        self.number = number
        self.kinds = list(kinds)
        self.cancel_max_tokens = cancel_max_tokens
        self.http = http
        self.model = model
        self.bank = bank
        self.prompts = list(prompts)
        self.expected = expected
        self.inputs = list(expected)
        self.report = report

    async def run(self, until: float) -> None:
        for step in itertools.count(self.number):
            if time.monotonic() >= until:
                return
            kind = self.kinds[step % len(self.kinds)]
            text = self.inputs[(step * 7 + self.number) % len(self.inputs)]
            started = time.monotonic()
            try:
                await getattr(self, f"_{kind}")(text, step)
            except (httpx.HTTPError, ValueError, KeyError) as error:
                self.report.errors.append(f"{kind}: {type(error).__name__}: {error}")
            self.report.counts[kind] += 1
            self.report.latencies_ms[kind].append((time.monotonic() - started) * 1000.0)

    def _body(self, text: str, **extra: Any) -> dict[str, Any]:
        return {"model": self.model, "prompt": text, "max_tokens": 8, "temperature": 0, **extra}

    def _check(self, kind: str, text: str, got: str | None, want: str | None) -> None:
        if got != want:
            self.report.wrong_prompts.append(f"{kind} {text!r}: got {got!r}, expected {want!r}")

    async def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        response = await self.http.post("/v1/completions", json=body)
        if response.status_code != 200:
            raise ValueError(f"HTTP {response.status_code}: {response.text[:200]}")
        return response.json()

    async def _dynamic(self, text: str, _: int) -> None:
        choice = (await self._post(self._body(text, idp={"bank": self.bank})))["choices"][0]
        self._check("dynamic", text, choice["idp"]["prompt"], self.expected[text])

    async def _forced(self, text: str, step: int) -> None:
        prompt = self.prompts[step % len(self.prompts)]
        choice = (await self._post(self._body(text, idp={"bank": self.bank, "prompt": prompt})))["choices"][0]
        self._check("forced", text, choice["idp"]["prompt"], prompt)

    async def _none(self, text: str, _: int) -> None:
        choice = (await self._post(self._body(text, idp={"mode": "none"})))["choices"][0]
        self._check("none", text, choice["idp"]["prompt"], None)

    async def _stream(self, text: str, _: int) -> None:
        await self._streamed("stream", text, read_all=True)

    async def _cancel(self, text: str, _: int) -> None:
        await self._streamed("cancel", text, read_all=False)

    async def _streamed(self, kind: str, text: str, read_all: bool) -> None:
        """A dynamic stream; `read_all=False` closes the connection after the first event (a client cancel).

        The cancelled stream asks for many tokens past end-of-sequence, so it is surely still decoding when the
        client leaves and only an abort can end it early.
        """
        extra = {} if read_all else {"max_tokens": self.cancel_max_tokens, "ignore_eos": True}
        body = self._body(text, stream=True, idp={"bank": self.bank}, **extra)
        async with self.http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            first = True
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise ValueError(f"error event: {event['error']}")
                if first:
                    self._check(kind, text, event["choices"][0]["idp"]["prompt"], self.expected[text])
                    first = False
                    if not read_all:
                        return
        if read_all:
            raise ValueError("stream ended without [DONE]")


_GAUGE = re.compile(r"^vllm:num_requests_(running|waiting)\{[^}]*\} ([0-9.eE+-]+)$", re.MULTILINE)
_FINISHED = re.compile(r'^vllm:request_success_total\{[^}]*finished_reason="(\w+)"[^}]*\} ([0-9.eE+-]+)$', re.MULTILINE)


async def engine_finished(http: httpx.AsyncClient) -> dict[str, float]:
    """vLLM's finished-request counters by reason (from /metrics)."""
    counts: dict[str, float] = {}
    for reason, value in _FINISHED.findall((await http.get("/metrics")).text):
        counts[reason] = counts.get(reason, 0.0) + float(value)
    return counts


async def engine_in_flight(http: httpx.AsyncClient) -> float:
    """Requests vLLM reports running or waiting (from /metrics)."""
    text = (await http.get("/metrics")).text
    return sum(float(value) for _, value in _GAUGE.findall(text))


async def wait_drained(http: httpx.AsyncClient, timeout_s: float = DRAIN_TIMEOUT_S) -> bool:
    """True once vLLM's running + waiting requests are 0 (within `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await engine_in_flight(http) == 0:
            return True
        await asyncio.sleep(0.5)
    return False


async def run_load(
    url: str,
    model: str,
    bank: str,
    prompts: Sequence[str],
    expected: dict[str, str],
    *,
    clients: int = 32,
    duration_s: float = 60.0,
    api_key: str | None = None,
    rss: Callable[[], tuple[float, float]] | None = None,
    warmup_fraction: float = 0.2,
    cancel_max_tokens: int = 400,
    kinds: Sequence[str] = KINDS,
) -> LoadReport:
    """Drive `clients` concurrent clients for `duration_s`, then check drain and memory (see the module doc)."""
    report = LoadReport(clients=clients, duration_s=duration_s)
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as http:
        finished_before = await engine_finished(http)
        start = time.monotonic()
        until = start + duration_s
        workers = [
            _Client(i, http, model, bank, prompts, expected, report, cancel_max_tokens, kinds) for i in range(clients)
        ]
        tasks = [asyncio.create_task(w.run(until)) for w in workers]
        if rss is not None:
            await asyncio.sleep(duration_s * warmup_fraction)
            while not all(t.done() for t in tasks):
                report.sample_rss(*rss())
                await asyncio.wait(tasks, timeout=1.0)
        await asyncio.gather(*tasks)
        report.duration_s = time.monotonic() - start
        report.drained = await wait_drained(http)
        finished_after = await engine_finished(http)
        report.finished = {k: v - finished_before.get(k, 0.0) for k, v in finished_after.items()}
        if rss is not None:
            report.sample_rss(*rss())
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", type=Path, required=True, help="The served model's folder (for selection).")
    parser.add_argument("--banks-dir", type=Path, required=True)
    parser.add_argument("--bank", help="Bank to load-test (default: the server's default bank).")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=60.0, help="Seconds of load.")
    parser.add_argument("--pid", type=int, help="Server pid, to watch its RSS (and its engine core's).")
    parser.add_argument("--api-key", default=os.environ.get("IDP_API_KEY"))
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    parser.add_argument(
        "--cancel-max-tokens",
        type=int,
        default=400,
        help="max_tokens of the streams clients cancel (long enough to be still running when cut)",
    )
    args = parser.parse_args()

    from server.core.banks import bank_dir, load_bank
    from server.core.selection import offline_choices

    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    card = httpx.get(f"{args.url}/v1/models", headers=headers, timeout=30).json()["data"][0]
    bank = args.bank or card["idp"]["default_bank"]
    prompts = next(b["prompts"] for b in card["idp"]["banks"] if b["name"] == bank)
    inputs, served_bank = load_inputs(), load_bank(bank_dir(args.banks_dir, bank))
    choices = offline_choices(args.model, served_bank.embeddings, served_bank.prompt_names, inputs)
    expected = dict(zip(inputs, choices, strict=True))
    report = asyncio.run(
        run_load(
            args.url,
            card["id"],
            bank,
            prompts,
            expected,
            clients=args.clients,
            duration_s=args.duration,
            api_key=args.api_key,
            rss=None if args.pid is None else process_rss(args.pid),
            kinds=args.kinds.split(","),
            cancel_max_tokens=args.cancel_max_tokens,
        )
    )
    print(json.dumps(report.summary(), indent=2))
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
