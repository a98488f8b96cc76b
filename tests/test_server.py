"""The HTTP server end to end: a real uvicorn on loopback, a real vLLM engine, real selection, real clients.

Most tests run against a tiny random Llama (a byte-level BPE tokenizer trained in tests/helpers.py) with two
random banks whose rows are sampled from its embedding table: quick, and the numbers are still exact comparisons
(selection against `CachedSelector`, greedy text against vLLM fed [prompt | input] embeds directly, echo logprobs
against a transformers forward). The last test repeats the central checks on the real model. Every test here
starts an engine, so the module is marked slow; tests/test_serving_unit.py checks the same serving logic against
a fake engine in the fast suite. One server per module: starting an engine is the slow part.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import torch
from prometheus_client import REGISTRY
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.core.banks import PromptBank
from server.core.identity import embedding_weight
from server.core.selection import CachedSelector, load_selection_model
from server.online.allocator import find_library
from tests.helpers import LiveServer, idp, random_bank, start_server

pytestmark = pytest.mark.slow

LM_EVAL_PROMPTS = ["The capital of France is Paris", "Two plus two equals four, said the teacher"]


async def direct_greedy(live: LiveServer, prompt: dict[str, Any], max_tokens: int) -> str:
    """vLLM itself, no idp-serve code in between: greedy text for a raw vLLM prompt dict."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    last = None
    async for out in live.engine.async_llm.generate(prompt, params, f"direct-{uuid.uuid4().hex}"):
        last = out
    return last.outputs[0].text


# ----- the tiny-model server ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def srv_banks(tiny_llama: Path) -> list[PromptBank]:
    return [random_bank(tiny_llama, "alpha", k=3, m=4, seed=1), random_bank(tiny_llama, "beta", k=2, m=6, seed=2)]


@pytest.fixture(scope="module")
def srv_live(
    tiny_llama: Path, srv_banks: list[PromptBank], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    with start_server(tiny_llama, tmp_path_factory.mktemp("srv-home"), srv_banks) as live:
        yield live


@pytest.fixture(scope="module")
def srv_tokenizer(tiny_llama: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def srv_selector(tiny_llama: Path, srv_banks: list[PromptBank]) -> CachedSelector:
    return CachedSelector(load_selection_model(tiny_llama), srv_banks[0].embeddings)


def test_models_health_version_metrics(srv_live: LiveServer, tiny_llama: Path) -> None:
    models = srv_live.client().models.list()
    (card,) = models.data
    assert card.id == tiny_llama.name
    assert card.model_extra["idp"]["default_bank"] == "alpha"
    assert [b["name"] for b in card.model_extra["idp"]["banks"]] == ["alpha", "beta"]
    assert card.model_extra["idp"]["banks"][1]["prompts"] == ["beta-p0", "beta-p1"]
    assert httpx.get(f"{srv_live.url}/health").status_code == 200
    assert "vllm_version" in httpx.get(f"{srv_live.url}/version").json()
    srv_live.client().completions.create(model=card.id, prompt="Hi", max_tokens=2)
    text = httpx.get(f"{srv_live.url}/metrics").text
    assert "idp_selection_duration_seconds_count" in text and 'idp_requests_total{endpoint="completions"' in text
    assert "vllm:num_requests_running" in text, "vLLM's own metrics share the registry"
    assert (
        "idp"
        in httpx.get(f"{srv_live.url}/openapi.json").json()["components"]["schemas"]["CompletionRequest"]["properties"]
    )


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: nothing to split")
def test_server_threads_run_off_the_vllm_worker_cores(srv_live: LiveServer) -> None:
    """vLLM's CPU build pins its workers' threads; every thread of the server's process (here the test process,
    which serves from a thread) runs on the other CPUs, so HTTP and selection work never stall a decode step."""
    workers = srv_live.engine.worker_cpus
    assert workers, "vLLM's CPU build pins its workers' OpenMP threads"
    for tid in os.listdir("/proc/self/task"):
        assert os.sched_getaffinity(int(tid)).isdisjoint(workers), f"thread {tid} may run on a vLLM worker core"


def test_selection_matches_cached_selector(
    srv_live: LiveServer, srv_selector: CachedSelector, srv_tokenizer: Any, tiny_llama: Path
) -> None:
    prompts = ["The quick brown fox jumps over the lazy dog", "def main():\n    return 0", "Bonjour"]
    response = srv_live.client().completions.create(model=tiny_llama.name, prompt=prompts, max_tokens=1)
    expected = srv_selector.select([srv_tokenizer.encode(p) for p in prompts])
    assert [c.index for c in response.choices] == [0, 1, 2]
    for choice, selection in zip(response.choices, expected, strict=True):
        info = idp(choice)
        assert info["mode"] == "dynamic" and info["bank"] == "alpha"
        assert info["prompt"] == f"alpha-p{selection.index}"
        assert list(info["scores"].values()) == pytest.approx(list(selection.scores), abs=1e-5)
        assert info["margin"] == pytest.approx(selection.margin, abs=1e-5)
        assert info["selection_ms"] > 0


def test_greedy_text_equals_direct_vllm_from_embeds(
    srv_live: LiveServer, srv_banks: list[PromptBank], srv_tokenizer: Any, tiny_llama: Path
) -> None:
    prompt = "Once upon a time"
    raw = srv_live.client().completions.with_raw_response.create(
        model=tiny_llama.name, prompt=prompt, max_tokens=12, temperature=0
    )
    choice = raw.parse().choices[0]
    index = srv_banks[0].index(idp(choice)["prompt"])
    assert raw.headers["x-idp-prompt"] == idp(choice)["prompt"]
    assert float(raw.headers["x-idp-selection-ms"]) > 0
    ids = srv_tokenizer.encode(prompt)
    embeds = torch.cat([srv_banks[0].embeddings[index], embedding_weight(tiny_llama)[ids]])
    assert choice.text == srv_live.call(direct_greedy(srv_live, {"prompt_embeds": embeds}, 12))
    assert choice.finish_reason == "length"
    assert raw.parse().usage.prompt_tokens == len(ids) and raw.parse().usage.completion_tokens == 12


def test_forced_and_none_modes(
    srv_live: LiveServer, srv_banks: list[PromptBank], srv_tokenizer: Any, tiny_llama: Path
) -> None:
    client, prompt = srv_live.client(), "A long time ago"
    ids = srv_tokenizer.encode(prompt)
    forced = client.completions.with_raw_response.create(
        model=tiny_llama.name,
        prompt=prompt,
        max_tokens=8,
        temperature=0,
        extra_body={"idp": {"bank": "beta", "prompt": "beta-p1"}},
    )
    info = idp(forced.parse().choices[0])
    assert (info["mode"], info["bank"], info["prompt"], info["scores"]) == ("forced", "beta", "beta-p1", None)
    assert forced.headers["x-idp-bank"] == "beta" and forced.headers["x-idp-selection-ms"] == "-"
    embeds = torch.cat([srv_banks[1].embeddings[1], embedding_weight(tiny_llama)[ids]])
    assert forced.parse().choices[0].text == srv_live.call(direct_greedy(srv_live, {"prompt_embeds": embeds}, 8))

    plain = client.completions.create(
        model=tiny_llama.name, prompt=prompt, max_tokens=8, temperature=0, extra_body={"idp": {"mode": "none"}}
    )
    assert idp(plain.choices[0]) == {
        "mode": "none",
        "bank": None,
        "prompt": None,
        "scores": None,
        "margin": None,
        "selection_ms": None,
    }
    assert plain.choices[0].text == srv_live.call(direct_greedy(srv_live, {"prompt_token_ids": ids}, 8))


def test_token_prompts_n_and_seed(srv_live: LiveServer, srv_tokenizer: Any, tiny_llama: Path) -> None:
    client = srv_live.client()
    ids = [srv_tokenizer.encode("Hello there"), srv_tokenizer.encode("General Kenobi")]
    by_ids = client.completions.create(model=tiny_llama.name, prompt=ids, max_tokens=5, temperature=0)
    by_text = client.completions.create(
        model=tiny_llama.name, prompt=["Hello there", "General Kenobi"], max_tokens=5, temperature=0
    )
    assert [c.text for c in by_ids.choices] == [c.text for c in by_text.choices]
    single = client.completions.create(model=tiny_llama.name, prompt=ids[0], max_tokens=5, temperature=0)
    assert single.choices[0].text == by_ids.choices[0].text

    def sample(seed: int) -> list[str]:
        out = client.completions.create(
            model=tiny_llama.name, prompt=ids, max_tokens=6, temperature=1.0, n=3, seed=seed
        )
        assert [c.index for c in out.choices] == list(range(6))
        return [c.text for c in out.choices]

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first
    assert len(set(first[:3])) > 1, "n=3 samples of a random model should differ"


def test_stop_sequences(srv_live: LiveServer, tiny_llama: Path) -> None:
    client = srv_live.client()
    full = client.completions.create(model=tiny_llama.name, prompt="Count: one", max_tokens=10, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2 :][:3]
    assert stop.strip(), f"need a non-blank stop string from {text!r}"
    cut = client.completions.create(
        model=tiny_llama.name, prompt="Count: one", max_tokens=10, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_streaming_matches_non_streaming(srv_live: LiveServer, tiny_llama: Path) -> None:
    client = srv_live.client()
    kwargs = dict(model=tiny_llama.name, prompt="Streams of", max_tokens=10, temperature=0, logprobs=2)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert idp(next(c for c in chunks if c.choices).choices[0])["prompt"] == idp(whole.choices[0])["prompt"]
    streamed_logprobs = [
        lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs
    ]
    assert streamed_logprobs == pytest.approx(whole.choices[0].logprobs.token_logprobs, abs=1e-5)
    raw = (
        httpx.post(f"{srv_live.url}/v1/completions", json={**kwargs, "stream": True}, timeout=120)
        .text.strip()
        .split("\n\n")
    )
    assert raw[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in raw)


def test_streaming_n_with_echo(srv_live: LiveServer, tiny_llama: Path) -> None:
    """n=2 sampled streams, echoed with logprobs, reassemble into exactly the non-streamed choices."""
    body = {
        "model": tiny_llama.name,
        "prompt": ["Echo me", "And me"],
        "max_tokens": 5,
        "n": 2,
        "seed": 3,
        "temperature": 1.0,
        "echo": True,
        "logprobs": 1,
    }
    whole = srv_live.post("/v1/completions", body).json()["choices"]
    events = srv_live.post("/v1/completions", {**body, "stream": True}).text.strip().split("\n\n")
    texts: dict[int, str] = {}
    tokens: dict[int, list[str]] = {}
    for event in events[:-1]:
        for choice in json.loads(event.removeprefix("data: "))["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
            tokens.setdefault(choice["index"], []).extend(choice["logprobs"]["tokens"])
    assert sorted(texts) == [0, 1, 2, 3]
    for choice in whole:
        assert texts[choice["index"]] == choice["text"]
        assert tokens[choice["index"]] == choice["logprobs"]["tokens"]
        assert choice["text"].startswith("Echo me" if choice["index"] < 2 else "And me")


def _reference_logprobs(model_dir: Path, prefix: torch.Tensor, ids: list[int]) -> list[float]:
    """log p(x_i | P, x_<i) for i >= 1 from a transformers forward over [P | E(x)]."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    embeds = torch.cat([prefix, model.get_input_embeddings().weight[ids]]).detach()
    with torch.no_grad():
        logprobs = model(inputs_embeds=embeds[None]).logits[0].log_softmax(-1)
    m = prefix.shape[0]
    return [logprobs[m + i - 1, ids[i]].item() for i in range(1, len(ids))]


def test_lm_eval_loglikelihood_payload(
    srv_live: LiveServer, srv_banks: list[PromptBank], srv_tokenizer: Any, tiny_llama: Path
) -> None:
    """lm-evaluation-harness local-completions: token-id prompts, echo, max_tokens=1, logprobs=1."""
    ids = [srv_tokenizer.encode(p) for p in LM_EVAL_PROMPTS]
    body = {
        "model": tiny_llama.name,
        "prompt": ids,
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": 1,
        "seed": 1234,
        "echo": True,
    }
    response = srv_live.post("/v1/completions", body)
    assert response.status_code == 200, response.text
    choices = sorted(response.json()["choices"], key=lambda c: c["index"])
    for choice, prompt_ids, text in zip(choices, ids, LM_EVAL_PROMPTS, strict=True):
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(prompt_ids) + 1
        assert len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == len(logprobs["text_offset"])
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        assert choice["text"].startswith(text)
        assert "".join(logprobs["tokens"]) == choice["text"]
        prefix = srv_banks[0].embeddings[srv_banks[0].index(choice["idp"]["prompt"])]
        expected = _reference_logprobs(tiny_llama, prefix, prompt_ids)
        assert logprobs["token_logprobs"][1:-1] == pytest.approx(expected, abs=2e-3)
        reported = zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True)
        for token, lp, top in list(reported)[1:]:
            assert top[token] == pytest.approx(lp) and 1 <= len(top) <= 2
        generated_top = logprobs["top_logprobs"][-1]
        assert max(generated_top, key=generated_top.get) == logprobs["tokens"][-1], "greedy token is the top one"


def test_echo_without_generation(srv_live: LiveServer, srv_tokenizer: Any, tiny_llama: Path) -> None:
    body = {"model": tiny_llama.name, "prompt": "Just score me", "max_tokens": 0, "echo": True, "logprobs": 0}
    choice = srv_live.post("/v1/completions", body).json()["choices"][0]
    assert choice["text"] == "Just score me"
    assert len(choice["logprobs"]["tokens"]) == len(srv_tokenizer.encode("Just score me"))
    none_mode = srv_live.post("/v1/completions", {**body, "idp": {"mode": "none"}}).json()
    assert none_mode["usage"]["completion_tokens"] == 0
    assert len(none_mode["choices"][0]["logprobs"]["tokens"]) == len(choice["logprobs"]["tokens"])


def test_chat_selects_on_rendered_prompt(
    srv_live: LiveServer, srv_selector: CachedSelector, srv_tokenizer: Any, tiny_llama: Path
) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is IDP?"}]
    client = srv_live.client()
    raw = client.chat.completions.with_raw_response.create(
        model=tiny_llama.name, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    response = raw.parse()
    rendered = srv_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    (expected,) = srv_selector.select([srv_tokenizer.encode(rendered, add_special_tokens=False)])
    assert raw.headers["x-idp-prompt"] == f"alpha-p{expected.index}"
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert len(choice.logprobs.content) == 6 and all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    stream = client.chat.completions.create(
        model=tiny_llama.name,
        messages=messages,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-1].usage.completion_tokens == 6


def test_concurrent_requests_keep_their_own_prompt(srv_live: LiveServer, tiny_llama: Path) -> None:
    client = srv_live.client()
    plan = [("alpha", f"alpha-p{i % 3}") for i in range(6)] + [("beta", f"beta-p{i % 2}") for i in range(4)]

    def run(bank_prompt: tuple[str, str]) -> tuple[str, str]:
        bank, prompt = bank_prompt
        out = client.completions.with_raw_response.create(
            model=tiny_llama.name,
            prompt="Same input for all",
            max_tokens=6,
            temperature=0,
            extra_body={"idp": {"bank": bank, "prompt": prompt}},
        )
        assert out.headers["x-idp-prompt"] == prompt
        return idp(out.parse().choices[0])["prompt"], out.parse().choices[0].text

    sequential = {p: run((b, p))[1] for b, p in set(plan)}
    dynamic = [f"Input number {i} is here" for i in range(6)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(run, plan))
        dynamic_results = list(
            pool.map(lambda p: client.completions.create(model=tiny_llama.name, prompt=p, max_tokens=2), dynamic)
        )
    assert [r[0] for r in results] == [p for _, p in plan]
    assert all(text == sequential[prompt] for prompt, text in results)
    alone = client.completions.create(model=tiny_llama.name, prompt=dynamic, max_tokens=2)
    assert [idp(r.choices[0])["prompt"] for r in dynamic_results] == [idp(c)["prompt"] for c in alone.choices]


def test_speculation_answers_exactly_as_without_it_and_aborts_the_decodes_it_does_not_keep(
    srv_live: LiveServer, srv_selector: CachedSelector, srv_tokenizer: Any, tiny_llama: Path
) -> None:
    ids = torch.randint(10, srv_tokenizer.vocab_size, (40, 12), generator=torch.Generator().manual_seed(7)).tolist()
    rows = [s.index for s in srv_selector.select(ids)]  # fresh inputs (token ids), so no selection is remembered
    first = 0
    same = next(i for i in range(1, len(ids)) if rows[i] == rows[first])  # guessed right from `first`
    other = next(i for i in range(1, len(ids)) if rows[i] != rows[first])  # guessed wrong from `same`
    client = srv_live.client()
    serving = srv_live.app.state.completion_serving
    before = {o: REGISTRY.get_sample_value("idp_speculations_total", {"outcome": o}) or 0.0 for o in ("hit", "miss")}
    default, serving.speculation = serving.speculation, "always"
    assert default == "idle", "a server speculates while vLLM is idle unless told otherwise"
    try:
        answers = [
            client.completions.create(model=tiny_llama.name, prompt=ids[i], max_tokens=8, temperature=0)
            for i in (first, same, other)
        ]
    finally:
        serving.speculation = default
    after = {o: REGISTRY.get_sample_value("idp_speculations_total", {"outcome": o}) or 0.0 for o in ("hit", "miss")}
    assert after["hit"] >= before["hit"] + 1 and after["miss"] >= before["miss"] + 1
    for i, answer in zip((first, same, other), answers, strict=True):
        chosen = idp(answer.choices[0])["prompt"]
        assert chosen == f"alpha-p{rows[i]}"
        forced = client.completions.create(
            model=tiny_llama.name, prompt=ids[i], max_tokens=8, temperature=0, extra_body={"idp": {"prompt": chosen}}
        )
        assert answer.choices[0].text == forced.choices[0].text
    deadline = time.monotonic() + 10
    while srv_live.engine.unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert srv_live.engine.unfinished_requests() == 0, "an aborted guess left a request in vLLM"


@pytest.mark.parametrize(
    ("body", "status", "param", "needle"),
    [
        ({"model": "nope", "prompt": "x"}, 404, "model", "nope"),
        ({"prompt": "x"}, 400, "model", "model"),
        ({"model": "{m}", "prompt": "x", "temperature": 3}, 400, "temperature", "temperature"),
        ({"model": "{m}", "prompt": "x", "idp": {"bank": "gamma"}}, 400, "idp.bank", "gamma"),
        ({"model": "{m}", "prompt": "x", "idp": {"prompt": "alpha-p9"}}, 400, "idp.prompt", "alpha-p9"),
        ({"model": "{m}", "prompt": "x", "idp": {"mode": "forced"}}, 400, "idp.prompt", "forced"),
        ({"model": "{m}", "prompt": "x", "idp": {"mode": "sometimes"}}, 400, "idp.mode", "idp.mode"),
        ({"model": "{m}", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "echo"),
        ({"model": "{m}", "prompt": "x", "max_tokens": 600}, 400, "max_tokens", "512"),
        ({"model": "{m}", "prompt": [[1, 99999999]]}, 400, "prompt", "99999999"),
        ({"model": "{m}", "prompt": ""}, 400, "prompt", "empty"),
        ({"model": "{m}", "prompt": "x", "frobnicate": 1}, 400, "frobnicate", "frobnicate"),
        ({"model": "{m}", "prompt": "x", "logit_bias": {"1": 5}}, 400, "logit_bias", "logit_bias"),
    ],
)
def test_error_shapes(srv_live: LiveServer, tiny_llama: Path, body: dict, status: int, param: str, needle: str) -> None:
    body = json.loads(json.dumps(body).replace("{m}", tiny_llama.name))
    response = srv_live.post("/v1/completions", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and needle in error["message"]
    assert error["type"] == "invalid_request_error"


def test_malformed_json_unknown_route_and_server_survives(srv_live: LiveServer, tiny_llama: Path) -> None:
    assert srv_live.post("/v1/completions", "{not json").status_code == 400
    missing = httpx.get(f"{srv_live.url}/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    chat = srv_live.post("/v1/chat/completions", {"model": tiny_llama.name, "messages": []})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
    ok = srv_live.client().completions.create(model=tiny_llama.name, prompt="Still alive?", max_tokens=2)
    assert ok.choices[0].finish_reason == "length"
    assert httpx.get(f"{srv_live.url}/health").status_code == 200


@pytest.mark.skipif(
    find_library("jemalloc") is None,
    reason="jemalloc is not installed (Debian libjemalloc2; scripts/install-test-tools.sh installs it as root)",
)
def test_vllms_engine_processes_run_on_jemalloc_and_the_server_keeps_its_environment(srv_live: LiveServer) -> None:
    """On CPU the server preloads jemalloc for the processes vLLM starts (server/online/allocator.py), not for
    itself or anything it starts later."""
    engine = [p for p in psutil.Process().children(recursive=True) if "VLLM" in " ".join(p.cmdline())]
    assert {"VLLM::EngineCore", "VLLM::Worker"} <= {" ".join(p.cmdline()).strip() for p in engine}  # proc titles
    for process in engine:
        maps = Path(f"/proc/{process.pid}/maps").read_text()
        assert "libjemalloc" in maps, f"{process.cmdline()} runs without jemalloc"
    assert "libjemalloc" not in os.environ.get("LD_PRELOAD", ""), "put back once the engine started"


def _engine_cores() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if "EngineCore" in " ".join(p.cmdline())}


def test_without_banks_and_after_engine_death(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No banks: IDP is off by default and asking for it is a 400. A dead engine: 503 everywhere, no crash."""
    before = _engine_cores()
    with start_server(tiny_llama, tmp_path_factory.mktemp("srv-bare"), []) as live:
        assert live.client().models.list().data[0].model_extra["idp"] == {"default_bank": None, "banks": []}
        out = live.client().completions.create(model=tiny_llama.name, prompt="Hi", max_tokens=2)
        assert idp(out.choices[0])["mode"] == "none"
        refused = live.post("/v1/completions", {"model": tiny_llama.name, "prompt": "Hi", "idp": {"mode": "dynamic"}})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "idp.bank"

        (core,) = _engine_cores() - before
        psutil.Process(core).kill()
        psutil.Process(core).wait(30)
        deadline = time.monotonic() + 30
        while httpx.get(f"{live.url}/health").status_code != 503:
            assert time.monotonic() < deadline, "/health still 200 30 s after the engine died"
            time.sleep(0.2)
        body = {"model": tiny_llama.name, "prompt": "Hi", "max_tokens": 2}
        for stream in (False, True):
            response = live.post("/v1/completions", {**body, "stream": stream})
            assert response.status_code == 503 and response.json()["error"]["code"] == "engine_unavailable"


# ----- the real model -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def srv_real(base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, PromptBank]]:
    bank = random_bank(base_model, "real", k=3, m=8, seed=3)
    with start_server(base_model, tmp_path_factory.mktemp("srv-real"), [bank]) as live:
        yield live, bank


def test_real_model_end_to_end(srv_real: tuple[LiveServer, PromptBank], base_model: Path) -> None:
    live, bank = srv_real
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    client = live.client()
    prompt = "The capital of France is"
    response = client.completions.create(model=base_model.name, prompt=prompt, max_tokens=8, temperature=0)
    choice = response.choices[0]
    ids = tokenizer.encode(prompt)
    (expected,) = CachedSelector(load_selection_model(base_model), bank.embeddings).select([ids])
    assert idp(choice)["prompt"] == f"real-p{expected.index}"
    embeds = torch.cat([bank.embeddings[expected.index], embedding_weight(base_model)[ids]])
    assert choice.text == live.call(direct_greedy(live, {"prompt_embeds": embeds}, 8))

    plain = client.completions.create(
        model=base_model.name, prompt=prompt, max_tokens=8, temperature=0, extra_body={"idp": {"mode": "none"}}
    )
    assert "Paris" in plain.choices[0].text

    body = {"model": base_model.name, "prompt": [ids], "temperature": 0, "max_tokens": 1, "logprobs": 1, "echo": True}
    logprobs = live.post("/v1/completions", body).json()["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(ids) + 1 and logprobs["token_logprobs"][0] is None
    assert all(lp <= 0 for lp in logprobs["token_logprobs"][1:])

    chat = client.chat.completions.create(
        model=base_model.name,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        temperature=0,
        extra_body={"idp": {"mode": "none"}},
    )
    assert chat.choices[0].message.content
