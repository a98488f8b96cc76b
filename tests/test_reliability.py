"""Reliability and security of the server, against a real uvicorn + vLLM on loopback (tiny random model).

- Bad input: schemathesis over the server's own OpenAPI schema (valid and invalid requests) plus hand-written
  hostile requests; every one gets a 4xx in OpenAI's error shape, never a 5xx, and the server keeps answering.
- Limits (body size, prompts per request, n, max_tokens) come from ServeSettings; the module's server sets small
  ones so each is hit.
- Security: API key (Bearer, /health and /metrics open), CORS off unless configured, no pickle, bank names
  confined to the banks directory, the key never in settings' repr or in logs.
- Bank reload under load is atomic, and a bad bank is refused while the old set keeps serving.
- The load test (bench/load.py, short), and `server.online.app.run` in its own process: SIGHUP reloads its banks,
  and when its engine dies /health is 503 at once, in-flight requests fail, and the process exits with status 3
  so its supervisor restarts it.
One in-process server for the module; the process test starts its own (it kills the engine). Every test that
needs an engine is marked slow; the fast ones (settings, pickle, bank names) need none.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from transformers import AutoTokenizer

from server.core.banks import BankError, PromptBank, bank_dir, check_name, make_bank, save_bank
from server.core.identity import fingerprint
from server.online.app import EXIT_ENGINE_DEAD, create_app
from server.online.settings import ServeSettings
from tests.helpers import ROOT, LiveServer, offline_selection, random_bank, varied_inputs

API_KEY = "sk-test-3f9a1c0e-do-not-log"
AUTH = {"authorization": f"Bearer {API_KEY}"}
ORIGIN = "https://ui.example"
LIMITS = {"max_body_bytes": 256 * 1024, "max_prompts": 32, "max_n": 4, "max_tokens_limit": 448}


def serve_settings(model: Path, home: Path, **overrides: Any) -> ServeSettings:
    return ServeSettings(
        home=home,
        model=str(model),
        banks_dir=home / "banks",
        max_model_len=512,
        kv_cache_gib=1,
        dtype="float32",
        **overrides,
    )


@pytest.fixture(scope="module")
def banks(tiny_llama: Path) -> list[PromptBank]:
    return [random_bank(tiny_llama, "alpha", k=3, m=4, seed=1), random_bank(tiny_llama, "beta", k=2, m=6, seed=2)]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, banks: list[PromptBank]) -> Path:
    home = tmp_path_factory.mktemp("rel-home")
    for bank in banks:
        save_bank(bank, home / "banks" / bank.name)
    return home


@pytest.fixture(scope="module")
def live(tiny_llama: Path, home: Path) -> Iterator[LiveServer]:
    settings = serve_settings(tiny_llama, home, default_bank="alpha", api_key=API_KEY, cors_origins=[ORIGIN], **LIMITS)
    with LiveServer(settings) as server:
        yield server


def post(live: LiveServer, path: str, content: bytes | str | dict[str, Any], **headers: str) -> httpx.Response:
    body = json.dumps(content) if isinstance(content, dict) else content
    return httpx.post(
        f"{live.url}{path}", content=body, headers={**AUTH, "content-type": "application/json", **headers}, timeout=120
    )


def assert_openai_error(response: httpx.Response, status: int | None = None) -> dict[str, Any]:
    """A 4xx (or exactly `status`) whose body is OpenAI's error object and nothing else."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    if status is not None:
        assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    return error


def still_serving(live: LiveServer, model: str) -> None:
    assert httpx.get(f"{live.url}/health").status_code == 200
    ok = post(live, "/v1/completions", {"model": model, "prompt": "Still here?", "max_tokens": 2})
    assert ok.status_code == 200, ok.text


# ----- bad input ----------------------------------------------------------------------------------------------

HOSTILE: list[tuple[str, Any, int, str | None]] = [
    ("invalid JSON", b'{"model": "M", "prompt": ', 400, None),
    ("JSON array body", b"[1, 2, 3]", 400, None),
    ("wrong type", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("wrong nested type", {"prompt": "x", "idp": {"mode": 3}}, 400, "idp.mode"),
    ("empty prompt", {"prompt": ""}, 400, "prompt"),
    ("empty prompt list", {"prompt": []}, 400, None),
    ("prompt over the context", {"prompt": "word " * 700}, 400, "max_tokens"),
    ("token ids over the context", {"prompt": [[5] * 600]}, 400, "max_tokens"),
    ("huge max_tokens", {"prompt": "x", "max_tokens": 10**30}, 400, "max_tokens"),
    ("max_tokens over the limit", {"prompt": "x", "max_tokens": 449}, 400, "max_tokens"),
    ("n over the limit", {"prompt": "x", "n": 5}, 400, "n"),
    ("negative temperature", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("NaN temperature", b'{"model": "M", "prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("Infinity top_p", b'{"model": "M", "prompt": "x", "top_p": Infinity}', 400, "top_p"),
    ("negative presence_penalty", {"prompt": "x", "presence_penalty": -7}, 400, "presence_penalty"),
    ("top_k below -1", {"prompt": "x", "top_k": -2}, 400, "top_k"),
    ("seed beyond 64 bits", {"prompt": "x", "seed": 2**80}, 400, "seed"),
    ("token id beyond int32", {"prompt": [[1, 2**40]]}, 400, None),
    ("token id beyond the vocab", {"prompt": [[1, 10**8]]}, 400, "prompt"),
    ("unknown bank", {"prompt": "x", "idp": {"bank": "gamma"}}, 400, "idp.bank"),
    ("bank name escaping", {"prompt": "x", "idp": {"bank": "../alpha"}}, 400, "idp.bank"),
    ("unknown prompt", {"prompt": "x", "idp": {"prompt": "alpha-p7"}}, 400, "idp.prompt"),
    ("invalid UTF-8", b'{"model": "M", "prompt": "\xff\xfe bad \xc3\x28"}', 400, None),
    ("lone surrogate", b'{"model": "M", "prompt": "a\\ud800b"}', 400, None),
    ("10,000 prompts", {"prompt": ["hi"] * 10_000}, 400, "prompt"),
    ("oversize body", {"prompt": "x" * 300_000}, 413, None),
    ("unknown field", {"prompt": "x", "frobnicate": True}, 400, "frobnicate"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("case", "body", "status", "param"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_requests_get_openai_4xx(
    live: LiveServer, tiny_llama: Path, case: str, body: Any, status: int, param: str | None
) -> None:
    if isinstance(body, dict):
        body = {"model": tiny_llama.name, **body}
    else:
        body = body.replace(b'"M"', json.dumps(tiny_llama.name).encode())
    error = assert_openai_error(post(live, "/v1/completions", body), status)
    if param is not None:
        assert error["param"] == param, error


@pytest.mark.slow
def test_hostile_chat_and_chunked_oversize_body(live: LiveServer, tiny_llama: Path) -> None:
    model = tiny_llama.name
    long_chat = {"model": model, "messages": [{"role": "user", "content": "word " * 700}]}
    assert_openai_error(post(live, "/v1/chat/completions", long_chat), 400)
    over_n = {"model": model, "messages": [{"role": "user", "content": "hi"}], "n": 9}
    assert assert_openai_error(post(live, "/v1/chat/completions", over_n), 400)["param"] == "n"
    huge = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10**12}
    assert assert_openai_error(post(live, "/v1/chat/completions", huge), 400)["param"] == "max_completion_tokens"

    def chunks() -> Iterator[bytes]:
        """A body without Content-Length, larger than the limit: refused while it is read."""
        yield b'{"model": "x", "prompt": "'
        for _ in range(64):
            yield b"y" * 8192
        yield b'"}'

    chunked = httpx.post(f"{live.url}/v1/completions", content=chunks(), headers=AUTH, timeout=60)
    assert assert_openai_error(chunked, 413)["code"] == "body_too_large"
    still_serving(live, model)


@schemathesis.check
def openai_errors(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> bool | None:
    """Every 4xx is OpenAI's error object; no stream carries an internal error event."""
    if 400 <= response.status_code < 500:
        error = json.loads(response.content)["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
    if response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        assert b'"internal_error"' not in response.content, response.content[-500:]
    return None


@pytest.mark.slow
def test_schemathesis_fuzz(live: LiveServer, tiny_llama: Path) -> None:
    """Valid and invalid requests generated from /openapi.json, 50 of each per operation: no 5xx, 4xx in shape.

    Valid bodies get the served model's name (a random one would stop every request at the 404) and n and
    max_tokens within the server's limits, so more of them reach tokenization, selection and the engine.
    Derandomized: the same cases every run, so a failure reproduces.
    """
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json", headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/admin/banks/reload"}
    statuses: dict[int, int] = {}

    def served_model(case: schemathesis.Case) -> schemathesis.Case:
        if isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = tiny_llama.name
            for key, most in (("n", LIMITS["max_n"]), ("max_tokens", 32), ("max_completion_tokens", 32)):
                if isinstance(case.body.get(key), int):
                    case.body[key] = min(case.body[key], most)
        return case

    for operation in operations:
        strategies = [operation.as_strategy().map(served_model)]
        if "requestBody" in operation.definition.raw:  # nothing to make invalid in a request without a body
            strategies.append(operation.as_strategy(generation_mode=schemathesis.GenerationMode.NEGATIVE))
        for strategy in strategies:

            @settings(
                max_examples=50,
                deadline=None,
                database=None,
                phases=[Phase.generate],
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=strategy)
            def fuzz(case: schemathesis.Case) -> None:
                response = case.call(headers=AUTH, timeout=120)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                case.validate_response(response, checks=[not_a_server_error, openai_errors])

            fuzz()
    print("schemathesis statuses:", dict(sorted(statuses.items())))
    assert statuses.get(200, 0) >= 25 and sum(n for code, n in statuses.items() if 400 <= code < 500) >= 100
    still_serving(live, tiny_llama.name)


# ----- security -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_api_key_guards_all_but_open_paths(
    live: LiveServer, tiny_llama: Path, caplog: pytest.LogCaptureFixture
) -> None:
    body = {"model": tiny_llama.name, "prompt": "hi", "max_tokens": 2}
    url = f"{live.url}/v1/completions"
    with caplog.at_level(logging.DEBUG):
        for headers in (
            {},
            {"authorization": "Bearer wrong"},
            {"authorization": API_KEY},
            {"authorization": f"Bearer {API_KEY}x"},
            {"authorization": f"bearer {API_KEY}"},
        ):
            refused = httpx.post(url, json=body, headers=headers, timeout=60)
            assert assert_openai_error(refused, 401)["code"] == "invalid_api_key"
            assert refused.headers["www-authenticate"] == "Bearer"
        assert httpx.post(url, json=body, headers=AUTH, timeout=60).status_code == 200
        assert httpx.get(f"{live.url}/v1/models").status_code == 401
        assert httpx.get(f"{live.url}/openapi.json").status_code == 401
        assert httpx.post(f"{live.url}/admin/banks/reload").status_code == 401
        assert httpx.get(f"{live.url}/health").status_code == 200
        assert httpx.get(f"{live.url}/metrics").status_code == 200
    assert API_KEY not in caplog.text
    assert API_KEY not in repr({name: vars(part) for name, part in live.app.state._state.items()})


def test_settings_hide_the_key_and_defaults_are_closed(tiny_llama: Path, home: Path) -> None:
    """The key stays out of repr and dumps; without configuration there is no key check and no CORS."""
    keyed = serve_settings(tiny_llama, home, api_key=API_KEY)
    assert API_KEY not in repr(keyed) and API_KEY not in str(keyed) and API_KEY not in keyed.model_dump_json()
    assert keyed.api_key.get_secret_value() == API_KEY
    os.environ["IDP_API_KEY"] = API_KEY
    try:
        assert ServeSettings().api_key.get_secret_value() == API_KEY
    finally:
        del os.environ["IDP_API_KEY"]
    default = serve_settings(tiny_llama, home)
    assert (default.api_key, default.cors_origins, default.open_paths) == (None, [], ["/health", "/metrics"])
    names = [m.cls.__name__ for m in create_app(default).user_middleware]
    assert "ApiKey" not in names and "CORSMiddleware" not in names and "BodyLimit" in names
    names = [
        m.cls.__name__
        for m in create_app(serve_settings(tiny_llama, home, api_key="k", cors_origins=[ORIGIN])).user_middleware
    ]
    order = [names.index(name) for name in ("CORSMiddleware", "ApiKey", "BodyLimit")]
    assert order == sorted(order), "outermost first: CORS answers preflights, then the key, then the body limit"


@pytest.mark.slow
def test_cors_only_for_configured_origins(live: LiveServer) -> None:
    preflight = {"access-control-request-method": "POST", "access-control-request-headers": "authorization"}
    allowed = httpx.options(f"{live.url}/v1/completions", headers={"origin": ORIGIN, **preflight})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(f"{live.url}/v1/completions", headers={"origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers
    simple = httpx.get(f"{live.url}/health", headers={"origin": "https://evil.example"})
    assert "access-control-allow-origin" not in simple.headers


def test_no_pickle_anywhere() -> None:
    """Nothing the project runs may unpickle: banks and models are safetensors/JSON only."""
    root = Path(__file__).resolve().parents[1]
    pattern = re.compile(
        r"\bimport pickle\b|\bfrom pickle\b|\bpickle\.loads?\(|torch\.load\(|weights_only\s*=\s*False"
        r"|\bimport dill\b|\bjoblib\.load\(|cloudpickle"
    )
    offenders = [
        f"{path.relative_to(root)}:{n}"
        for folder in ("server", "bench")
        for path in (root / folder).rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


@pytest.mark.parametrize("name", ["../alpha", "/etc", ".hidden", "a/b", "..", "", "a\\b", "alpha\x00"])
def test_bank_names_cannot_escape(tmp_path: Path, name: str) -> None:
    with pytest.raises(BankError):
        bank_dir(tmp_path, name)
    with pytest.raises(BankError):
        check_name(name)


# ----- bank reload --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bank_reload_is_atomic_under_load_and_refuses_a_bad_bank(
    live: LiveServer, tiny_llama: Path, home: Path, banks: list[PromptBank]
) -> None:
    """Dynamic requests run while the bank is swapped: each answer is wholly old or wholly new bank (its scores'
    prompt names are one bank's, its prompt what that bank's selector picks offline). A damaged bank is then
    refused with a 409 and the new set keeps serving."""
    inputs = varied_inputs(12)
    old = banks[0]
    other = random_bank(tiny_llama, "alpha", k=4, m=5, seed=11)
    new = make_bank("alpha", other.embeddings, [f"alpha2-p{i}" for i in range(4)], fingerprint(tiny_llama))
    folder = home / "banks" / "alpha"
    expect_old = offline_selection(tiny_llama, folder, inputs)
    save_bank(new, home / "staged" / "alpha")
    expect_new = offline_selection(tiny_llama, home / "staged" / "alpha", inputs)
    names = {tuple(old.prompt_names): expect_old, tuple(new.prompt_names): expect_new}
    stop = threading.Event()

    def client(i: int) -> list[tuple[str, dict[str, Any]]]:
        seen = []
        while not stop.is_set():
            text = inputs[(i + len(seen)) % len(inputs)]
            response = post(live, "/v1/completions", {"model": tiny_llama.name, "prompt": text, "max_tokens": 2})
            assert response.status_code == 200, response.text
            seen.append((text, response.json()["choices"][0]["idp"]))
        return seen

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(client, i) for i in range(6)]
        time.sleep(1.5)
        save_bank(new, folder)
        reloaded = post(live, "/admin/banks/reload", b"")
        time.sleep(1.5)
        stop.set()
        seen = [item for future in futures for item in future.result()]
    assert reloaded.status_code == 200, reloaded.text
    assert reloaded.json()["banks"][0]["prompts"] == new.prompt_names
    versions = set()
    for text, info in seen:
        version = tuple(info["scores"])
        assert version in names, f"scores mix banks: {version}"
        assert info["prompt"] == names[version][text]
        versions.add(version)
    assert versions == set(names), "both the old and the new bank served during the run"

    broken = random_bank(tiny_llama, "gamma", k=2, m=4, seed=5)
    gamma = save_bank(broken, home / "banks" / "gamma")
    data = bytearray((gamma / "prompts.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (gamma / "prompts.safetensors").write_bytes(bytes(data))
    refused = post(live, "/admin/banks/reload", b"")
    error = assert_openai_error(refused, 409)
    assert error["code"] == "bank_reload_refused" and "gamma" in error["message"]
    card = httpx.get(f"{live.url}/v1/models", headers=AUTH).json()["data"][0]["idp"]
    assert [b["name"] for b in card["banks"]] == ["alpha", "beta"]
    assert card["banks"][0]["prompts"] == new.prompt_names
    answer = post(live, "/v1/completions", {"model": tiny_llama.name, "prompt": inputs[0], "max_tokens": 2})
    assert answer.json()["choices"][0]["idp"]["prompt"] == expect_new[inputs[0]]

    (gamma / "prompts.safetensors").unlink()
    (gamma / "bank.json").unlink()
    gamma.rmdir()
    save_bank(old, folder)
    assert post(live, "/admin/banks/reload", b"").json()["banks"][0]["prompts"] == old.prompt_names


# ----- load and faults (slow) ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_short_load(live: LiveServer, tiny_llama: Path, home: Path, banks: list[PromptBank]) -> None:
    """bench/load.py for 20 s with 8 clients: no errors, every prompt as selected offline, cancelled streams
    aborted (vLLM finishes only the others, and drains to 0 running/waiting), flat RSS of the server process
    (this one; vLLM's engine processes are reported, see bench/load.py)."""
    command = [
        sys.executable,
        str(ROOT / "bench" / "load.py"),
        "--url",
        live.url,
        "--model",
        str(tiny_llama),
        "--banks-dir",
        str(home / "banks"),
        "--bank",
        "alpha",
        "--clients",
        "8",
        "--duration",
        "20",
        "--pid",
        str(os.getpid()),
        "--api-key",
        API_KEY,
        "--cancel-max-tokens",
        "440",
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    summary = json.loads(run.stdout)
    assert all(count > 0 for count in summary["counts"].values()), summary
    processor = live.engine.async_llm.output_processor
    assert processor.get_num_unfinished_requests() == 0


def _engine_core(pid: int) -> psutil.Process:
    (core,) = [p for p in psutil.Process(pid).children(recursive=True) if "EngineCore" in " ".join(p.cmdline())]
    return core


@pytest.mark.slow
def test_process_reloads_on_sighup_and_exits_when_the_engine_dies(
    tiny_llama: Path, tmp_path: Path, banks: list[PromptBank]
) -> None:
    """`server.online.app.run` in its own process, as Kubernetes runs it. SIGHUP reloads the banks. Then the engine core
    is killed mid-decode: /health is 503 within a second or two, in-flight requests (plain and streamed) end with
    an error instead of hanging, new ones get 503, and after engine_death_exit_s the process exits with status 3
    for its supervisor to restart it."""
    save_bank(banks[0], tmp_path / "banks" / "alpha")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "IDP_HOME": str(tmp_path),
        "IDP_MODEL": str(tiny_llama),
        "IDP_BANKS_DIR": str(tmp_path / "banks"),
        "IDP_PORT": str(port),
        "IDP_MAX_MODEL_LEN": "512",
        "IDP_DTYPE": "float32",
        "IDP_LOG_LEVEL": "warning",
        "IDP_ENGINE_DEATH_EXIT_S": "3",
    }
    code = "from server.online.app import run; from server.online.settings import ServeSettings; run(ServeSettings())"
    log = tmp_path / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[1],
        )
    try:
        _exercise_process(process, url, tiny_llama, tmp_path, banks)
    except BaseException:
        process.kill()
        print(log.read_text()[-5000:])
        raise
    finally:
        process.wait(30)


def _exercise_process(
    process: subprocess.Popen[bytes], url: str, tiny_llama: Path, home: Path, banks: list[PromptBank]
) -> None:
    deadline = time.monotonic() + 240
    while True:
        assert process.poll() is None, "the server exited during start-up"
        assert time.monotonic() < deadline, "the server did not start"
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.5)

    renamed = make_bank("alpha", banks[0].embeddings, ["hup-0", "hup-1", "hup-2"], fingerprint(tiny_llama))
    save_bank(renamed, home / "banks" / "alpha")
    process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/v1/models").json()["data"][0]["idp"]["banks"][0]["prompts"] != renamed.prompt_names:
        assert time.monotonic() < deadline, "SIGHUP did not reload the banks"
        time.sleep(0.2)

    body = {"model": tiny_llama.name, "prompt": "Keep talking", "max_tokens": 480, "ignore_eos": True}
    assert len(AutoTokenizer.from_pretrained(tiny_llama).encode("Keep talking")) + 4 + 480 <= 512
    results: dict[str, Any] = {}
    first_event = threading.Event()

    def plain(key: str) -> None:
        results[key] = httpx.post(f"{url}/v1/completions", json=body, timeout=60)

    def streamed(key: str) -> None:
        events = []
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    first_event.set()
        results[key] = events

    threads = [threading.Thread(target=plain, args=(f"plain{i}",)) for i in range(2)]
    threads += [threading.Thread(target=streamed, args=(f"stream{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    assert first_event.wait(60), "the streams never started"
    _engine_core(process.pid).kill()
    killed = time.monotonic()
    while httpx.get(f"{url}/health").status_code != 503:
        assert time.monotonic() - killed < 3, "/health still 200 3 s after the engine died"
        time.sleep(0.05)
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive(), "an in-flight request hangs after the engine died"
    assert time.monotonic() - killed < 3, "in-flight requests took longer than the exit delay to fail"
    for i in range(2):
        response = results[f"plain{i}"]
        assert response.status_code == 503 and response.json()["error"]["code"] == "engine_unavailable"
        events = results[f"stream{i}"]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "engine_unavailable"
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=10).status_code == 503
    assert process.wait(30) == EXIT_ENGINE_DEAD
    assert time.monotonic() - killed >= 3.0, "the process exited before engine_death_exit_s"
