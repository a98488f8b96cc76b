"""The Grafana dashboard's queries, evaluated by Prometheus' own engine (`promtool test rules`).

One Prometheus scrapes two releases of the chart (different namespace, Service and served model), each with two
replicas. Every query of every panel and every variable is evaluated over synthetic series of all four pods,
with the variables set to release A, and must give exactly release A's numbers: summed over its replicas, never
mixed with release B, never a many-to-many error. tests/test_metrics.py checks the same queries against a live
server's /metrics; this file checks their arithmetic where more than one pod and release exist.

promtool comes with Debian's prometheus package (scripts/install-test-tools.sh installs it as root).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "idp-serve-dashboard.json"
PROMTOOL = shutil.which("promtool")

STEP_S, SAMPLES = 15, 40  # a scrape every 15 s for 10 minutes
EVAL_TIME = "10m"
# What Grafana puts in place of its built-ins and of the variables when release A is picked, banks and prompts "All".
VARIABLES = {
    "__rate_interval": "1m",
    "__range": "10m",
    "namespace": "llm",
    "model": "model-a",
    "service": "idp-a",
    "bank": ".*",
    "prompt": ".*",
}
RELEASES = {
    "A": {"namespace": "llm", "service": "idp-a", "model_name": "model-a"},
    "B": {"namespace": "lab", "service": "idp-b", "model_name": "model-b"},
}
SCOPE = {"namespace": "$namespace", "service": "$service"}  # matchers every selector carries (=~)
VLLM_SCOPE = {**SCOPE, "model_name": "$model"}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panel_queries(board: dict[str, Any]) -> dict[tuple[str, str], str]:
    """(panel title, refId) -> PromQL, for every target of every panel."""
    return {(p["title"], t["refId"]): t["expr"] for p in board["panels"] if p["type"] != "row" for t in p["targets"]}


def variable_queries(board: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """variable -> (series selector, label) of its `label_values(selector, label)` query."""
    found = {}
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"]["query"])
            assert match, f"variable {variable['name']}: expected label_values(selector, label)"
            found[variable["name"]] = (match.group(1), match.group(2))
    return found


def substitute(expr: str) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in VARIABLES, f"undefined dashboard variable ${name} in {expr!r}"
        return VARIABLES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", replace, expr)


# ----- synthetic series: two releases x two replicas ---------------------------------------------------------


class Scrape:
    """Series as a ServiceMonitor scrape labels them, built from per-second rates (counters) or values (gauges)."""

    def __init__(self) -> None:
        self.counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
        self.gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    @staticmethod
    def _key(name: str, release: str, replica: int, labels: dict[str, str]) -> tuple[str, tuple]:
        rel = RELEASES[release]
        pod = f"{rel['service']}-{replica}"
        scope = {
            "namespace": rel["namespace"],
            "service": rel["service"],
            "pod": pod,
            "instance": f"{pod}:8000",
            "job": rel["service"],
        }
        if name.startswith("vllm:"):
            scope |= {"model_name": rel["model_name"], "engine": "0"}
        return name, tuple(sorted((scope | labels).items()))

    def counter(self, name: str, release: str, replica: int, per_s: float, **labels: str) -> None:
        self.counters[self._key(name, release, replica, labels)] += per_s

    def gauge(self, name: str, release: str, replica: int, value: float, **labels: str) -> None:
        self.gauges[self._key(name, release, replica, labels)] = value

    def histogram(
        self, name: str, release: str, replica: int, bounds: tuple[float, ...], into: float, per_s: float, **labels: str
    ) -> None:
        """`per_s` observations a second, each in the bucket whose upper bound is `into` (cumulative buckets)."""
        assert into in bounds
        for le in bounds:
            self.counter(f"{name}_bucket", release, replica, per_s if le >= into else 0.0, le=repr(le), **labels)
        self.counter(f"{name}_bucket", release, replica, per_s, le="+Inf", **labels)
        self.counter(f"{name}_count", release, replica, per_s, **labels)

    def input_series(self) -> list[dict[str, str]]:
        def series(name: str, labels: tuple) -> str:
            return name + "{" + ", ".join(f'{k}="{v}"' for k, v in labels) + "}"

        out = [
            {"series": series(n, ls), "values": f"0+{rate * STEP_S!r}x{SAMPLES}"}
            for (n, ls), rate in self.counters.items()
        ]
        out += [{"series": series(n, ls), "values": f"{value!r}x{SAMPLES}"} for (n, ls), value in self.gauges.items()]
        return out


SELECTION_S = (0.01, 0.05, 0.1)
MARGIN = (0.01, 0.1)
HTTP_S = (0.5, 1.0, 2.5)
TTFT_S, ITL_S, E2E_S, QUEUE_S = (0.1, 0.5, 1.0), (0.01, 0.025, 0.05), (1.0, 2.5, 5.0), (0.001, 0.01, 0.1)


def two_releases() -> Scrape:
    s = Scrape()
    # Release A, replica 0 and 1: the numbers the expectations below are worked out from.
    for replica, (news, howto_dyn, howto_forced, none) in enumerate([(1, 1, 0, 1), (2, 0, 1, 0)]):
        s.counter("idp_selections_total", "A", replica, news, bank="default", prompt="news", mode="dynamic")
        s.counter("idp_selections_total", "A", replica, howto_dyn, bank="default", prompt="howto", mode="dynamic")
        s.counter("idp_selections_total", "A", replica, howto_forced, bank="default", prompt="howto", mode="forced")
        s.counter("idp_selections_total", "A", replica, 2, bank="qa", prompt="facts", mode="dynamic")
        s.counter("idp_selections_total", "A", replica, none, bank="", prompt="", mode="none")
        s.histogram("idp_selection_duration_seconds", "A", replica, SELECTION_S, 0.05, 1)
        s.counter("idp_selection_batch_size_sum", "A", replica, 2 * (replica + 1))
        s.counter("idp_selection_batch_size_count", "A", replica, 1)
        s.histogram("idp_selection_margin_ratio", "A", replica, MARGIN, 0.1, 1, bank="default")
        for bank, k, m in (("default", 2, 16), ("qa", 1, 8)):
            s.gauge(
                "idp_bank_info",
                "A",
                replica,
                1,
                bank=bank,
                k=str(k),
                m=str(m),
                hidden_size="576",
                model_weights="model-a",
                model_embedding_sha256="aaa",
            )
            s.gauge("idp_bank_prompts", "A", replica, k, bank=bank)
            s.counter("idp_bank_loads_total", "A", replica, 1 / 60 if bank == "default" else 0.0, bank=bank)
        s.counter("idp_bank_load_failures_total", "A", replica, 2 / 60 * replica)
        s.histogram("idp_http_request_duration_seconds", "A", replica, HTTP_S, 1.0, 2, handler="/v1/completions")
        s.gauge("vllm:kv_cache_usage_perc", "A", replica, (0.5, 0.25)[replica])
        s.gauge("vllm:num_requests_running", "A", replica, (3, 5)[replica])
        s.gauge("vllm:num_requests_waiting", "A", replica, (1, 0)[replica])
        s.counter("vllm:prefix_cache_hits_total", "A", replica, (1, 3)[replica])
        s.counter("vllm:prefix_cache_queries_total", "A", replica, 4)
        s.counter("idp_selection_cache_hits_total", "A", replica, (1, 0)[replica])
        s.counter("idp_selection_cache_queries_total", "A", replica, 2)
        s.counter("vllm:prompt_tokens_total", "A", replica, (30, 20)[replica])
        s.counter("vllm:generation_tokens_total", "A", replica, (60, 40)[replica])
        s.histogram("vllm:time_to_first_token_seconds", "A", replica, TTFT_S, 0.5, 1)
        s.histogram("vllm:inter_token_latency_seconds", "A", replica, ITL_S, 0.025, 2)
        s.histogram("vllm:e2e_request_latency_seconds", "A", replica, E2E_S, 2.5, 1)
        s.histogram("vllm:request_queue_time_seconds", "A", replica, QUEUE_S, 0.001, 1)
    s.histogram("idp_selection_margin_ratio", "A", 0, MARGIN, 0.01, 1, bank="qa")
    s.counter("idp_http_requests_total", "A", 0, 3, handler="/v1/completions", status="200")
    s.counter("idp_http_requests_total", "A", 0, 1, handler="/v1/completions", status="400")
    s.counter("idp_http_requests_total", "A", 1, 2, handler="/v1/completions", status="200")
    s.counter("idp_http_requests_total", "A", 1, 2, handler="/v1/chat/completions", status="500")
    s.histogram("idp_http_request_duration_seconds", "A", 1, HTTP_S, 2.5, 1, handler="/v1/chat/completions")
    s.counter("idp_requests_total", "A", 0, 3, endpoint="completions", mode="dynamic")
    s.counter("idp_requests_total", "A", 1, 1, endpoint="completions", mode="dynamic")
    s.counter("idp_requests_total", "A", 1, 2, endpoint="chat", mode="none")
    s.counter("idp_prompt_tokens_total", "A", 0, 30, endpoint="completions")
    s.counter("idp_prompt_tokens_total", "A", 1, 20, endpoint="chat")
    s.counter("idp_completion_tokens_total", "A", 0, 60, endpoint="completions")
    s.counter("idp_completion_tokens_total", "A", 1, 40, endpoint="completions")

    # Release B: same banks and prompts, other numbers and other latency buckets, so any query that let B in (or
    # summed the two) would give other values.
    for replica in (0, 1):
        s.counter("idp_selections_total", "B", replica, 10, bank="default", prompt="news", mode="dynamic")
        s.counter("idp_selections_total", "B", replica, 10 * replica, bank="default", prompt="howto", mode="dynamic")
        s.counter("idp_selections_total", "B", replica, 5, bank="", prompt="", mode="none")
        s.histogram("idp_selection_duration_seconds", "B", replica, SELECTION_S, 0.1, 4)
        s.counter("idp_selection_batch_size_sum", "B", replica, 40)
        s.counter("idp_selection_batch_size_count", "B", replica, 2)
        s.histogram("idp_selection_margin_ratio", "B", replica, MARGIN, 0.01, 5, bank="default")
        s.gauge(
            "idp_bank_info",
            "B",
            replica,
            1,
            bank="default",
            k="4",
            m="16",
            hidden_size="576",
            model_weights="model-b",
            model_embedding_sha256="bbb",
        )
        s.gauge("idp_bank_prompts", "B", replica, 4, bank="default")
        s.counter("idp_bank_loads_total", "B", replica, 1, bank="default")
        s.counter("idp_bank_load_failures_total", "B", replica, 1)
        s.counter("idp_http_requests_total", "B", replica, 8, handler="/v1/completions", status="500")
        s.histogram("idp_http_request_duration_seconds", "B", replica, HTTP_S, 0.5, 10, handler="/v1/completions")
        s.counter("idp_requests_total", "B", replica, 10, endpoint="completions", mode="dynamic")
        s.counter("idp_prompt_tokens_total", "B", replica, 100, endpoint="completions")
        s.counter("idp_completion_tokens_total", "B", replica, 100, endpoint="completions")
        s.gauge("vllm:kv_cache_usage_perc", "B", replica, 0.875)
        s.gauge("vllm:num_requests_running", "B", replica, 100)
        s.gauge("vllm:num_requests_waiting", "B", replica, 100)
        s.counter("vllm:prefix_cache_hits_total", "B", replica, 0)
        s.counter("vllm:prefix_cache_queries_total", "B", replica, 10)
        s.counter("idp_selection_cache_hits_total", "B", replica, 5)
        s.counter("idp_selection_cache_queries_total", "B", replica, 5)
        s.counter("vllm:prompt_tokens_total", "B", replica, 1000)
        s.counter("vllm:generation_tokens_total", "B", replica, 1000)
        s.histogram("vllm:time_to_first_token_seconds", "B", replica, TTFT_S, 1.0, 3)
        s.histogram("vllm:inter_token_latency_seconds", "B", replica, ITL_S, 0.05, 3)
        s.histogram("vllm:e2e_request_latency_seconds", "B", replica, E2E_S, 5.0, 3)
        s.histogram("vllm:request_queue_time_seconds", "B", replica, QUEUE_S, 0.1, 3)
    return s


# ----- what release A's panels must show ---------------------------------------------------------------------


def in_bucket(lower: float, upper: float, q: float, total: float) -> float:
    """histogram_quantile's answer when all `total` observations a second sit in (lower, upper]: linear
    interpolation inside the bucket, as Prometheus documents it."""
    return lower + (upper - lower) * (q * total / total)


def quantiles(title: str, lower: float, upper: float, total: float, **labels: str) -> dict:
    return {
        (title, ref): {_labels(**labels): in_bucket(lower, upper, q, total)}
        for ref, q in (("A", 0.5), ("B", 0.95), ("C", 0.99))
    }


def _labels(**labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


SELECTIONS = "Selections per prompt"
EXPECTED: dict[tuple[str, str], dict[tuple, float]] = {
    # Replica 0 + replica 1; forced selections count, mode "none" does not.
    (SELECTIONS, "A"): {
        _labels(bank="default", prompt="news"): 3.0,
        _labels(bank="default", prompt="howto"): 2.0,
        _labels(bank="qa", prompt="facts"): 4.0,
    },
    ("Prompt shares of selections", "A"): {
        _labels(bank="default", prompt="news"): 3 / 5,
        _labels(bank="default", prompt="howto"): 2 / 5,
        _labels(bank="qa", prompt="facts"): 1.0,
    },
    ("Prompt shares over the dashboard range", "A"): {
        _labels(bank="default", prompt="news"): 3.0 * 600,
        _labels(bank="default", prompt="howto"): 2.0 * 600,
        _labels(bank="qa", prompt="facts"): 4.0 * 600,
    },
    ("Inputs by IDP mode", "A"): {_labels(mode="dynamic"): 8.0, _labels(mode="forced"): 1.0, _labels(mode="none"): 1.0},
    **quantiles("Selection pass latency", 0.01, 0.05, 2.0),
    ("Selection batch size", "A"): {(): (2 + 4) / (1 + 1)},
    # increase over one minute: default 2/s in (0.01, 0.1], qa 1/s in (0, 0.01].
    ("Selection margin distribution", "A"): {
        _labels(le="0.01"): 60.0,
        _labels(le="0.1"): 180.0,
        _labels(le="+Inf"): 180.0,
    },
    **{
        key: {
            **quantiles("Selection margin quantiles", 0.01, 0.1, 2.0, bank="default")[key],
            **quantiles("Selection margin quantiles", 0.0, 0.01, 1.0, bank="qa")[key],
        }
        for key in quantiles("Selection margin quantiles", 0, 1, 1)
    },
    # One row per bank of the release (both replicas report it), valued K.
    ("Loaded banks", "A"): {
        _labels(
            bank="default", k="2", m="16", hidden_size="576", model_weights="model-a", model_embedding_sha256="aaa"
        ): 2.0,
        _labels(bank="qa", k="1", m="8", hidden_size="576", model_weights="model-a", model_embedding_sha256="aaa"): 1.0,
    },
    ("Bank loads and failures", "A"): {_labels(bank="default"): 2.0, _labels(bank="qa"): 0.0},
    ("Bank loads and failures", "B"): {(): 2.0},
    ("Request rate by handler and status", "A"): {
        _labels(handler="/v1/completions", status="200"): 5.0,
        _labels(handler="/v1/completions", status="400"): 1.0,
        _labels(handler="/v1/chat/completions", status="500"): 2.0,
    },
    ("Error ratio", "A"): {(): 2 / 8},
    ("Error ratio", "B"): {(): 1 / 8},
    **{
        key: {
            **quantiles("Request latency (HTTP, to the last byte)", 0.5, 1.0, 4.0, handler="/v1/completions")[key],
            **quantiles("Request latency (HTTP, to the last byte)", 1.0, 2.5, 1.0, handler="/v1/chat/completions")[key],
        }
        for key in quantiles("Request latency (HTTP, to the last byte)", 0, 1, 1)
    },
    ("Accepted requests by endpoint and IDP mode", "A"): {
        _labels(endpoint="completions", mode="dynamic"): 4.0,
        _labels(endpoint="chat", mode="none"): 2.0,
    },
    ("Tokens in and out", "A"): {_labels(endpoint="completions"): 30.0, _labels(endpoint="chat"): 20.0},
    ("Tokens in and out", "B"): {_labels(endpoint="completions"): 100.0},
    **quantiles("Time to first token", 0.1, 0.5, 2.0),
    **quantiles("Inter-token latency", 0.01, 0.025, 4.0),
    **quantiles("End-to-end request latency (engine)", 1.0, 2.5, 2.0),
    **quantiles("Engine queue time", 0.0, 0.001, 2.0),
    ("KV-cache usage", "A"): {_labels(instance="idp-a-0:8000"): 0.5, _labels(instance="idp-a-1:8000"): 0.25},
    ("Running and waiting requests", "A"): {(): 8.0},
    ("Running and waiting requests", "B"): {(): 1.0},
    ("Cache hit rates", "A"): {(): (1 + 3) / (4 + 4)},
    ("Cache hit rates", "B"): {(): (1 + 0) / (2 + 2)},
    ("Engine token throughput", "A"): {(): 50.0},
    ("Engine token throughput", "B"): {(): 100.0},
}
# What each variable offers once the ones before it are set to release A.
EXPECTED_OPTIONS = {
    "namespace": {"llm", "lab"},
    "model": {"model-a"},
    "service": {"idp-a"},
    "bank": {"default", "qa"},
    "prompt": {"news", "howto", "facts"},
}


# ----- tests ---------------------------------------------------------------------------------------------------


def selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """(metric, {label: regex}) of every selector in `expr`; a bare metric name gives an empty dict."""
    found = []
    for name, body in re.findall(r"\b((?:idp_|vllm:)[\w:]*)(\{[^}]*\})?", expr):
        matchers = dict(re.findall(r'(\w+)=~"([^"]*)"', body))
        found.append((name, matchers))
    return found


def test_every_query_is_scoped_to_one_release():
    """Every selector of every panel and variable (after the ones it depends on) names the namespace and
    Service, and vLLM's also the served model: two releases in one Prometheus are never summed."""
    board = dashboard()
    queries = list(panel_queries(board).values()) + [
        sel for name, (sel, _) in variable_queries(board).items() if name not in ("namespace", "model", "service")
    ]
    assert queries
    for expr in queries:
        for name, matchers in selectors(expr):
            wanted = VLLM_SCOPE if name.startswith("vllm:") else SCOPE
            assert matchers.items() >= wanted.items(), f"{name} in {expr!r} lacks {wanted}"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    for name in ("namespace", "model", "service"):
        # One release at a time: "All" would sum releases again.
        assert not variables[name]["multi"] and not variables[name]["includeAll"], name
    assert [n for n in variables] == ["datasource", "namespace", "model", "service", "bank", "prompt"]


def test_every_query_has_an_expectation():
    board = dashboard()
    assert set(panel_queries(board)) == set(EXPECTED)
    assert set(variable_queries(board)) == set(EXPECTED_OPTIONS)


def promtool_tests(board: dict[str, Any]) -> dict[str, Any]:
    tests = []
    for key, expr in panel_queries(board).items():
        samples = [
            {"labels": "{" + ", ".join(f'{k}="{v}"' for k, v in labels) + "}", "value": value}
            for labels, value in EXPECTED[key].items()
        ]
        tests.append({"expr": substitute(expr), "eval_time": EVAL_TIME, "exp_samples": samples})
    for name, (selector, label) in variable_queries(board).items():
        tests.append(
            {
                "expr": f"group by ({label}) ({substitute(selector)})",
                "eval_time": EVAL_TIME,
                "exp_samples": [{"labels": f'{{{label}="{v}"}}', "value": 1.0} for v in sorted(EXPECTED_OPTIONS[name])],
            }
        )
    return {
        "evaluation_interval": f"{STEP_S}s",
        "tests": [{"interval": f"{STEP_S}s", "input_series": two_releases().input_series(), "promql_expr_test": tests}],
    }


@pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed (Debian: apt-get install prometheus; "
    "scripts/install-test-tools.sh does it as root)",
)
def test_promtool_evaluates_every_query_for_one_release_of_two(tmp_path: Path):
    spec = tmp_path / "dashboard_test.yml"
    spec.write_text(yaml.safe_dump(promtool_tests(dashboard()), sort_keys=False, width=10_000))
    proc = subprocess.run([PROMTOOL, "test", "rules", str(spec)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")
def test_promtool_catches_a_query_that_mixes_releases(tmp_path: Path):
    """The check can fail: a shares query without the release matchers sums A and B and is reported."""
    board = dashboard()
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            target["expr"] = target["expr"].replace('namespace=~"$namespace", service=~"$service", ', "")
    spec = tmp_path / "dashboard_test.yml"
    spec.write_text(yaml.safe_dump(promtool_tests(board), sort_keys=False, width=10_000))
    proc = subprocess.run([PROMTOOL, "test", "rules", str(spec)], capture_output=True, text=True, timeout=120)
    report = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert 'sum by (bank, prompt) (rate(idp_selections_total{bank=~\\".*\\"' in report, report[-2000:]
