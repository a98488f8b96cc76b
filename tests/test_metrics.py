"""Metrics end to end: a real server (tiny random Llama, real vLLM engine, real selection) scraped over HTTP, the
Grafana dashboard's queries checked against that scrape, and a real Prometheus scraping the server.

Counts are asserted as differences between two scrapes around the requests a test sends, because the registry is
the process's default one and other test modules' servers count into it too; bank names are unique to this module.
One server for the module: an engine takes ~20-30 s to start.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.core.banks import PromptBank, save_bank
from server.core.identity import fingerprint
from tests.helpers import LiveServer, idp, random_bank, start_server

pytestmark = pytest.mark.slow

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "idp-serve-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GRAFANA_BUILTINS = {"__rate_interval": "5m", "__range": "5m", "__interval": "15s"}
"""Grafana's own variables, with the values the queries are evaluated with here (windows covering the whole test)."""

PROMETHEUS = shutil.which("prometheus")
"""Debian's `prometheus` package (apt-get install prometheus) provides it."""
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# ----- helpers ------------------------------------------------------------------------------------------------


def scrape(live: LiveServer) -> Samples:
    """Every sample of the server's /metrics, keyed by sample name (with _total/_bucket/... suffix) and labels."""
    response = httpx.get(f"{live.url}/metrics", timeout=30)
    assert response.status_code == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels` (0 when there is none)."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


def series(samples: Samples, name: str, **labels: str) -> list[dict[str, str]]:
    wanted = set(labels.items())
    return [dict(have) for (n, have) in samples if n == name and wanted <= have]


def wait_for(check: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    """Poll `check` until it returns something truthy (vLLM records its stats just after a request returns)."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)
    return result


def substitute(expr: str, variables: dict[str, str]) -> str:
    """A Grafana query with its variables (`$name`, `${name}`) replaced, as Grafana sends it to Prometheus."""
    values = {**GRAFANA_BUILTINS, **variables}

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"undefined dashboard variable ${name} in {expr!r}"
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", replace, expr)


_PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "and",
    "or",
    "unless",
    "inf",
    "nan",
}


def metric_names(expr: str) -> set[str]:
    """Metric (sample) names a PromQL expression selects: identifiers left once strings, label matchers, range
    windows and grouping clauses are removed, other than function names and keywords."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"' + r"|'(?:[^'\\]|\\.)*'", '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    found = re.findall(r"(?<![\w:.])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", expr)
    return set(found) - _PROMQL_WORDS


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panel_queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel (rows hold no queries)."""
    return [(p["title"], t["expr"]) for p in board["panels"] if p["type"] != "row" for t in p["targets"]]


def variable_selectors(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(variable, the series selector of its `label_values(selector, label)` query)."""
    found = []
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", variable["query"]["query"])
            assert match, f"variable {variable['name']}: expected label_values(selector, label)"
            found.append((variable["name"], match.group(1)))
    return found


def dashboard_metric_names(board: dict[str, Any]) -> dict[str, set[str]]:
    """Metric name -> where it is used (panel titles, variables)."""
    placeholders = {v["name"]: ".*" for v in board["templating"]["list"]}
    used: dict[str, set[str]] = {}
    for where, expr in panel_queries(board) + [(f"${n}", s) for n, s in variable_selectors(board)]:
        names = metric_names(substitute(expr, placeholders))
        assert names, f"{where}: no metric found in {expr!r}"
        for name in names:
            used.setdefault(name, set()).add(where)
    return used


# ----- the server ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def banks(tiny_llama: Path) -> dict[str, PromptBank]:
    """m-alpha: the default, for request tests; m-tally: only the Prometheus test; m-idle: never requested."""
    made = [
        random_bank(tiny_llama, "m-alpha", k=3, m=4, seed=11),
        random_bank(tiny_llama, "m-tally", k=2, m=4, seed=12),
        random_bank(tiny_llama, "m-idle", k=2, m=5, seed=13),
    ]
    return {bank.name: bank for bank in made}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's home; its banks directory is `home / "banks"`."""
    return tmp_path_factory.mktemp("metrics-home")


@pytest.fixture(scope="module")
def live(tiny_llama: Path, banks: dict[str, PromptBank], home: Path) -> Iterator[LiveServer]:
    with start_server(tiny_llama, home, list(banks.values())) as server:
        yield server


def complete(live: LiveServer, model: str, **body: Any) -> dict[str, Any]:
    response = live.post("/v1/completions", {"model": model, **body})
    assert response.status_code == 200, response.text
    return response.json()


# ----- banks --------------------------------------------------------------------------------------------------


def test_banks_are_described_and_zeroed_at_load(
    live: LiveServer, banks: dict[str, PromptBank], tiny_llama: Path
) -> None:
    samples = scrape(live)
    model = fingerprint(tiny_llama)
    info = {
        "bank": "m-idle",
        "k": "2",
        "m": "5",
        "hidden_size": "128",
        "model_weights": tiny_llama.name,
        "model_embedding_sha256": model.embedding_sha256,
    }
    assert series(samples, "idp_bank_info", bank="m-idle") == [info]
    assert value(samples, "idp_bank_info", bank="m-idle") == 1
    assert value(samples, "idp_bank_prompts", bank="m-idle") == 2
    assert value(samples, "idp_bank_loads_total", bank="m-idle") == 1
    zeroed = series(samples, "idp_selections_total", bank="m-idle")
    assert sorted((s["prompt"], s["mode"]) for s in zeroed) == [
        ("m-idle-p0", "dynamic"),
        ("m-idle-p0", "forced"),
        ("m-idle-p1", "dynamic"),
        ("m-idle-p1", "forced"),
    ]
    assert value(samples, "idp_selections_total", bank="m-idle") == 0
    assert series(samples, "idp_selection_margin_ratio_count", bank="m-idle")
    assert series(samples, "idp_selections_total", mode="none") == [{"bank": "", "prompt": "", "mode": "none"}]


def test_bank_reloads_and_refused_reloads_are_counted(
    live: LiveServer, banks: dict[str, PromptBank], home: Path, tiny_llama: Path
) -> None:
    before = scrape(live)
    assert live.post("/admin/banks/reload", {}).status_code == 200
    reloaded = scrape(live)
    for name in banks:
        loads = value(before, "idp_bank_loads_total", bank=name)
        assert value(reloaded, "idp_bank_loads_total", bank=name) == loads + 1

    broken = home / "banks" / "m-zbroken"  # loads last, after every good bank
    save_bank(random_bank(tiny_llama, "m-zbroken", k=2, m=3, seed=15), broken)
    tensor = broken / "prompts.safetensors"
    tensor.write_bytes(tensor.read_bytes()[:-8] + b"\x00" * 8)
    try:
        assert live.post("/admin/banks/reload", {}).status_code == 409
    finally:
        shutil.rmtree(broken)
    refused = scrape(live)
    assert value(refused, "idp_bank_load_failures_total") == value(reloaded, "idp_bank_load_failures_total") + 1
    for name in banks:  # a refused reload swaps nothing in, so it describes and counts none of its banks
        assert value(refused, "idp_bank_loads_total", bank=name) == value(reloaded, "idp_bank_loads_total", bank=name)
    assert not series(refused, "idp_bank_info", bank="m-zbroken")


# ----- requests and selection ---------------------------------------------------------------------------------


def test_request_and_selection_metrics(live: LiveServer, tiny_llama: Path) -> None:
    model, client = tiny_llama.name, live.client()
    before = scrape(live)

    dynamic = complete(
        live, model, prompt=["Metrics count inputs", "one by one"], max_tokens=3, idp={"bank": "m-alpha"}
    )
    forced = complete(
        live, model, prompt=["Forced twice", "and again"], max_tokens=2, idp={"bank": "m-alpha", "prompt": "m-alpha-p1"}
    )
    plain = complete(live, model, prompt="No prompt here", max_tokens=4, idp={"mode": "none"})
    echoed = complete(live, model, prompt="Only scored", max_tokens=0, echo=True, logprobs=0, idp={"mode": "none"})
    stream = client.completions.create(
        model=model,
        prompt="Streamed",
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"idp": {"bank": "m-alpha", "prompt": "m-alpha-p2"}},
    )
    (stream_usage,) = [chunk.usage for chunk in stream if chunk.usage]  # read to the end: the request ends
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Count me"}],
        max_tokens=3,
        extra_body={"idp": {"bank": "m-alpha"}},
    )
    probe = uuid.uuid4().hex
    assert live.post("/v1/completions", {"model": model, "prompt": "x", "idp": {"bank": probe}}).status_code == 400
    assert live.post("/v1/completions", {"model": probe, "prompt": "x"}).status_code == 404
    assert httpx.get(f"{live.url}/v1/{probe}").status_code == 404

    after = scrape(live)  # each request was counted before the server's loop could take the next one

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    selected = [c["idp"] for c in dynamic["choices"]] + [idp(chat.choices[0])]
    for prompt, count in Counter(info["prompt"] for info in selected).items():
        assert delta("idp_selections_total", bank="m-alpha", prompt=prompt, mode="dynamic") == count
    assert delta("idp_selections_total", bank="m-alpha", mode="dynamic") == 3
    assert delta("idp_selections_total", bank="m-alpha", prompt="m-alpha-p1", mode="forced") == 2, "per input"
    assert delta("idp_selections_total", bank="m-alpha", prompt="m-alpha-p2", mode="forced") == 1
    assert delta("idp_selections_total", bank="m-alpha", prompt="m-alpha-p0", mode="forced") == 0
    assert delta("idp_selections_total", mode="none") == 2

    assert delta("idp_selection_margin_ratio_count", bank="m-alpha") == 3
    assert delta("idp_selection_margin_ratio_sum", bank="m-alpha") == pytest.approx(
        sum(info["margin"] for info in selected), abs=1e-9
    )
    passes = {info["selection_ms"] for info in selected}  # inputs of one pass share its time
    assert delta("idp_selection_duration_seconds_count") == len(passes)
    assert delta("idp_selection_duration_seconds_sum") == pytest.approx(sum(passes) / 1000, abs=1e-6)
    assert delta("idp_selection_batch_size_sum") == 3
    assert delta("idp_selection_cache_queries_total") == 3, "every dynamically selected input, and only those"
    assert delta("idp_selection_cache_hits_total") == 0, "no input was seen before"

    assert delta("idp_requests_total", endpoint="completions", mode="dynamic") == 1
    assert delta("idp_requests_total", endpoint="completions", mode="forced") == 2
    assert delta("idp_requests_total", endpoint="completions", mode="none") == 2
    assert delta("idp_requests_total", endpoint="chat", mode="dynamic") == 1
    completions = [dynamic["usage"], forced["usage"], plain["usage"], echoed["usage"]]
    assert delta("idp_prompt_tokens_total", endpoint="completions") == (
        sum(u["prompt_tokens"] for u in completions) + stream_usage.prompt_tokens
    )
    assert delta("idp_completion_tokens_total", endpoint="completions") == (
        sum(u["completion_tokens"] for u in completions) + stream_usage.completion_tokens
    )
    assert echoed["usage"]["completion_tokens"] == 0
    assert delta("idp_prompt_tokens_total", endpoint="chat") == chat.usage.prompt_tokens
    assert delta("idp_completion_tokens_total", endpoint="chat") == chat.usage.completion_tokens

    assert delta("idp_http_requests_total", handler="/v1/completions", status="200") == 5
    assert delta("idp_http_requests_total", handler="/v1/completions", status="400") == 1
    assert delta("idp_http_requests_total", handler="/v1/completions", status="404") == 1
    assert delta("idp_http_requests_total", handler="/v1/chat/completions", status="200") == 1
    assert delta("idp_http_requests_total", handler="other", status="404") == 1
    assert delta("idp_http_request_duration_seconds_count", handler="/v1/completions") == 7
    assert delta("idp_http_request_duration_seconds_count", handler="/v1/chat/completions") == 1


def test_a_repeated_input_reuses_its_selection_and_counts_a_cache_hit(live: LiveServer, tiny_llama: Path) -> None:
    model, text = tiny_llama.name, f"Asked again {uuid.uuid4().hex}"
    before = scrape(live)
    first = complete(live, model, prompt=text, max_tokens=1, idp={"bank": "m-alpha"})
    again = complete(live, model, prompt=[text, text], max_tokens=1, idp={"bank": "m-alpha"})
    after = scrape(live)

    def delta(name: str) -> float:
        return value(after, name) - value(before, name)

    assert delta("idp_selection_cache_queries_total") == 3
    assert delta("idp_selection_cache_hits_total") == 2
    assert delta("idp_selection_duration_seconds_count") == 1, "one pass, for the first request"
    chosen = first["choices"][0]["idp"]
    for choice in again["choices"]:
        assert {k: choice["idp"][k] for k in ("prompt", "scores", "margin")} == {
            k: chosen[k] for k in ("prompt", "scores", "margin")
        }
        assert choice["idp"]["selection_ms"] == 0.0, "no time was spent selecting it"


def test_label_values_never_come_from_requests(live: LiveServer, tiny_llama: Path) -> None:
    """Unknown banks, prompts, models and paths are refused without a trace in any label."""
    probe = f"probe{uuid.uuid4().hex}"
    refused = [
        {"model": tiny_llama.name, "prompt": "x", "idp": {"bank": probe}},
        {"model": tiny_llama.name, "prompt": "x", "idp": {"bank": "m-alpha", "prompt": probe}},
        {"model": tiny_llama.name, "prompt": "x", "idp": {"mode": probe}},
        {"model": probe, "prompt": "x"},
    ]
    for body in refused:
        assert live.post("/v1/completions", body).status_code in (400, 404)
    assert httpx.get(f"{live.url}/{probe}").status_code == 404
    before = scrape(live)
    assert httpx.delete(f"{live.url}/v1/completions").status_code == 405
    text = httpx.get(f"{live.url}/metrics").text
    assert probe not in text
    samples = scrape(live)
    wrong_method = {"handler": "/v1/completions", "status": "405"}
    assert (
        value(samples, "idp_http_requests_total", **wrong_method)
        == value(before, "idp_http_requests_total", **wrong_method) + 1
    ), "a wrong method keeps its route"
    handlers = {s["handler"] for s in series(samples, "idp_http_requests_total")}
    routes = {route.path for route in live.app.routes}
    assert handlers <= routes | {"other"}, handlers - routes


def test_vllm_families_share_the_exposition(live: LiveServer, tiny_llama: Path) -> None:
    """vLLM's default stat loggers register in the default registry, so its families ride on our /metrics."""
    before = scrape(live)
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
    ):
        assert series(before, name), f"{name} missing from /metrics"
    out = complete(live, tiny_llama.name, prompt="Engine stats", max_tokens=6, idp={"mode": "none"})

    def recorded() -> Samples | None:
        samples = scrape(live)
        counted = value(samples, "vllm:e2e_request_latency_seconds_count") - value(
            before, "vllm:e2e_request_latency_seconds_count"
        )
        return samples if counted >= 1 else None

    after = wait_for(recorded, what="vLLM to record the request")
    assert (
        value(after, "vllm:e2e_request_latency_seconds_count") - value(before, "vllm:e2e_request_latency_seconds_count")
        == 1
    )
    assert (
        value(after, "vllm:generation_tokens_total") - value(before, "vllm:generation_tokens_total")
        == (out["usage"]["completion_tokens"])
    )
    assert (
        value(after, "vllm:prompt_tokens_total") - value(before, "vllm:prompt_tokens_total")
        == (out["usage"]["prompt_tokens"])
    )


# ----- the Grafana dashboard ----------------------------------------------------------------------------------


def test_metric_name_parser() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, bank) (rate(a_bucket{bank=~"x|y", le!="1e3"}[5m]))) / on (bank) '
        "group_left sum without (instance) (vllm:b_total offset 1m) > bool 0.5 and max(c) or vector(1)"
    )
    assert metric_names(expr) == {"a_bucket", "vllm:b_total", "c"}
    assert substitute('rate(x{b=~"$bank"}[$__rate_interval])', {"bank": ".*"}) == 'rate(x{b=~".*"}[5m])'


def test_dashboard_is_importable_and_templated() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("bank", "prompt"):
        assert variables[name]["type"] == "query" and variables[name]["datasource"] == DATASOURCE
        assert variables[name]["multi"] and variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
    assert "$bank" in variables["prompt"]["query"]["query"], "prompts follow the chosen banks"
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        xs, ys = range(grid["x"], grid["x"] + grid["w"]), range(grid["y"], grid["y"] + grid["h"])
        area = {(x, y) for x in xs for y in ys}
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE and panel["targets"], panel["title"]
        assert all(t["datasource"] == DATASOURCE and t["expr"] for t in panel["targets"]), panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]
    for _, expr in panel_queries(board):
        substitute(expr, {name: ".*" for name in variables})  # every variable used is defined
    used = dashboard_metric_names(board)
    for needed in (
        "idp_selections_total",
        "idp_selection_duration_seconds_bucket",
        "idp_selection_margin_ratio_bucket",
        "idp_http_requests_total",
        "idp_http_request_duration_seconds_bucket",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket",
        "vllm:kv_cache_usage_perc",
    ):
        assert needed in used, f"no panel plots {needed}"


def test_every_dashboard_metric_is_served(live: LiveServer, tiny_llama: Path) -> None:
    complete(live, tiny_llama.name, prompt="Fill every family", max_tokens=2)
    served = {name for name, _ in scrape(live)}
    missing = {name: sorted(where) for name, where in dashboard_metric_names(dashboard()).items() if name not in served}
    assert not missing, f"metrics the dashboard queries but /metrics lacks: {missing}"


# ----- a real Prometheus --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def prometheus(live: LiveServer, tmp_path: Path) -> Iterator[str]:
    """Prometheus on loopback scraping the live server every second; its base URL."""
    assert PROMETHEUS is not None
    target = live.url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs:\n  - job_name: idp-serve\n    static_configs: [{{targets: ['{target}']}}]\n"
    )
    url = f"http://127.0.0.1:{_free_port()}"
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address={url.removeprefix('http://')}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def ready() -> bool:
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, what="Prometheus to be ready")
        yield url
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert response["status"] == "success", f"{expr!r}: {response}"
    return response["data"]["result"]


def tally(prometheus: str) -> dict[tuple[str, str], float]:
    result = query(prometheus, 'sum by (prompt, mode) (idp_selections_total{job="idp-serve", bank="m-tally"})')
    return {(r["metric"]["prompt"], r["metric"]["mode"]): float(r["value"][1]) for r in result}


@pytest.mark.skipif(
    PROMETHEUS is None, reason="the prometheus binary is not installed (Debian: apt-get install prometheus)"
)
def test_prometheus_scrapes_selection_counts(live: LiveServer, prometheus: str, tiny_llama: Path) -> None:
    zero = {(f"m-tally-p{i}", mode): 0.0 for i in (0, 1) for mode in ("dynamic", "forced")}
    assert wait_for(lambda: tally(prometheus), what="the first scrape") == zero, "label sets exist from the start"

    for _ in range(3):
        complete(
            live, tiny_llama.name, prompt="Tally one", max_tokens=1, idp={"bank": "m-tally", "prompt": "m-tally-p0"}
        )
    complete(
        live,
        tiny_llama.name,
        prompt=["Tally two", "and three"],
        max_tokens=1,
        idp={"bank": "m-tally", "prompt": "m-tally-p1"},
    )
    expected = {**zero, ("m-tally-p0", "forced"): 3.0, ("m-tally-p1", "forced"): 2.0}
    wait_for(lambda: tally(prometheus) == expected, what=f"Prometheus to see {expected}, last {tally(prometheus)}")
    time.sleep(2.5)  # a few more scrapes, so rate() has samples after the last increase too

    board = dashboard()
    anything = {v["name"]: ".*" for v in board["templating"]["list"]}  # every release, service and model
    (shares,) = [expr for title, expr in panel_queries(board) if title == "Prompt shares of selections"]
    result = query(prometheus, substitute(shares, {**anything, "bank": "m-tally"}))
    got = {r["metric"]["prompt"]: float(r["value"][1]) for r in result}
    assert got == pytest.approx({"m-tally-p0": 0.6, "m-tally-p1": 0.4}, rel=1e-9)

    (loaded,) = [expr for title, expr in panel_queries(board) if title == "Loaded banks"]
    (row,) = query(prometheus, substitute(loaded, {**anything, "bank": "m-tally"}))
    assert (row["metric"]["k"], row["metric"]["m"], float(row["value"][1])) == ("2", "4", 2.0)

    for _, expr in panel_queries(board):
        query(prometheus, substitute(expr, anything))  # valid PromQL, evaluated by Prometheus itself
    for name, selector in variable_selectors(board):
        assert query(prometheus, substitute(selector, anything)), f"${name} would offer no values"
