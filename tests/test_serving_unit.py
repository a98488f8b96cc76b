"""The serving logic over HTTP against a fake engine: OpenAI shapes, IDP modes, echo, logprobs, streams, limits,
errors and the fatal faults, in seconds and without vLLM or a prepared model.

`FakeEngine` is the real `Engine` class (its request checks, context arithmetic and vocabulary bounds) with vLLM
replaced by a decoder whose output says what it was given: choice c of an input decoded behind prompt row r
spells the alphabet from letter r + c + 1 (from 'a' + c without a prompt), so a test reads off the text which
soft prompt reached the engine. `FakeSelector` picks row len(input) % K, so a test knows the choice in advance.
The real-engine tests (tests/test_server.py, tests/test_reliability.py, marked slow) check the same endpoints on
vLLM itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import string
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from server.core.banks import BankError, PromptBank, make_bank
from server.core.identity import Fingerprint
from server.core.selection import Selection
from server.online.api.errors import install_error_handlers
from server.online.api.router import router
from server.online.api.serving_base import Limits, Speculation
from server.online.api.serving_chat import ChatServing
from server.online.api.serving_completion import CompletionServing
from server.online.api.serving_models import ModelsServing
from server.online.bank_registry import BankRegistry, BankSet
from server.online.engine import (
    ChoiceDelta,
    DecodeOutput,
    DecodeParams,
    Engine,
    EngineUnavailableError,
    Prefix,
    TokenLogprob,
)
from server.online.selection_queue import SelectionQueue

MODEL = "fake-model"
HIDDEN = 8
CONTEXT = 96
LIMITS = Limits(max_prompts=4, max_n=3, max_tokens=40)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character (+ newline), no special tokens added, a tiny chat template."""
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return tokenizer


TOKENIZER = char_tokenizer()
VOCAB = len(TOKENIZER)
FINGERPRINT = Fingerprint(
    config_sha256="0" * 64,
    embedding_sha256="0" * 64,
    hidden_size=HIDDEN,
    vocab_size=VOCAB,
    weights=MODEL,
    weights_sha256="0" * 64,
)


def spelled(first: int, count: int) -> str:
    """What the fake engine generates: `count` letters of the alphabet from letter number `first`."""
    return "".join(string.ascii_lowercase[(first + j) % 26] for j in range(count))


def expected_text(row: int | None, choice: int, count: int) -> str:
    return spelled((0 if row is None else row + 1) + choice, count)


class FakeEngine(Engine):
    """The real Engine's checks with a spelling decoder in place of vLLM (see the module doc)."""

    def __init__(self) -> None:
        super().__init__(None, torch.zeros(VOCAB, HIDDEN), CONTEXT, frozenset())
        self.dead = False
        self.die_after_tokens: int | None = None
        self.calls: list[tuple[list[int], Prefix | None, DecodeParams]] = []
        self.request_ids: list[str] = []
        self.aborted: list[str] = []
        self.busy = 0
        """What `unfinished_requests` answers: requests vLLM would hold besides the test's."""
        self.prefill_s = 0.0
        """How long a decode takes before its first output (its prefill)."""
        self.log: list[str] = []
        """'start <id>' and 'abort <id>', in the order the engine saw them."""

    def unfinished_requests(self) -> int:
        return self.busy

    @property
    def tokenizer(self) -> Any:
        return TOKENIZER

    @property
    def errored(self) -> bool:
        return self.dead

    async def is_healthy(self) -> bool:
        return not self.dead

    async def generate(
        self, request_id: str, token_ids: Sequence[int], prefix: Prefix | None, params: DecodeParams
    ) -> AsyncIterator[DecodeOutput]:
        token_ids = list(token_ids)
        self.check(token_ids, prefix, params.max_tokens)
        if self.dead:
            raise EngineUnavailableError("the engine core died")
        self.calls.append((token_ids, prefix, params))
        self.request_ids.append(request_id)
        self.log.append(f"start {request_id}")
        try:
            await asyncio.sleep(self.prefill_s)
            async for out in self._decode(token_ids, prefix, params):
                yield out
        except (asyncio.CancelledError, GeneratorExit):  # what vLLM's generate answers with an abort
            self.aborted.append(request_id)
            self.log.append(f"abort {request_id}")
            raise

    async def _decode(
        self, token_ids: list[int], prefix: Prefix | None, params: DecodeParams
    ) -> AsyncIterator[DecodeOutput]:
        count = max(params.max_tokens, 1)
        texts = [expected_text(None if prefix is None else prefix.index, c, count) for c in range(params.n)]
        prompt_logprobs = None
        if params.prompt_logprobs is not None:
            prompt_logprobs = (None, *(_logprob(t, -1.0) for t in token_ids[1:]))
        if not params.stream:
            choices = tuple(_delta(c, text, params) for c, text in enumerate(texts))
            yield DecodeOutput(choices, prompt_logprobs, finished=True)
            return
        for j in range(count):
            if self.die_after_tokens is not None and j == self.die_after_tokens:
                self.dead = True
                raise EngineUnavailableError("the engine core died mid-stream")
            last = j == count - 1
            choices = tuple(_delta(c, text[j], params, "length" if last else None) for c, text in enumerate(texts))
            yield DecodeOutput(choices, prompt_logprobs if j == 0 else None, finished=last)


def _logprob(token_id: int, logprob: float) -> TokenLogprob:
    token = TOKENIZER.decode([token_id])
    return TokenLogprob(token_id, token, logprob, ((token, logprob), ("~", -5.0)))


def _delta(index: int, text: str, params: DecodeParams, finish: str | None = "length") -> ChoiceDelta:
    ids = tuple(TOKENIZER.encode(text))
    logprobs = None if params.logprobs is None else tuple(_logprob(t, -0.5) for t in ids)
    return ChoiceDelta(index, text, ids, logprobs, finish)


class FakeSelector:
    """Chooses row len(input) % K; every score 0 but the chosen one's."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.scored: list[list[int]] = []

    def select(self, batch: Sequence[Sequence[int]]) -> list[Selection]:
        self.scored.extend(list(ids) for ids in batch)
        return [self._one(len(ids) % self.k) for ids in batch]

    def _one(self, index: int) -> Selection:
        scores = tuple(1.0 if i == index else 0.0 for i in range(self.k))
        return Selection(index=index, scores=scores, margin=1.0, seconds=0.002)


class BrokenSelector(FakeSelector):
    """A selector with a bug: it raises on inputs the engine accepted."""

    def select(self, batch: Sequence[Sequence[int]]) -> list[Selection]:
        raise ValueError("shape mismatch in the selector (a bug, not the caller's input)")


class KillingSelector(FakeSelector):
    """A selector whose answer breaks the queue's own bookkeeping (no selection at all): the worker dies."""

    def select(self, batch: Sequence[Sequence[int]]) -> list[Selection]:
        return []


def bank(name: str, k: int, m: int, measured: dict[str, float] | None = None) -> PromptBank:
    return make_bank(
        name,
        torch.randn(k, m, HIDDEN, generator=torch.Generator().manual_seed(k * m)),
        [f"{name}-p{i}" for i in range(k)],
        FINGERPRINT,
        measured=measured,
    )


def bank_set(selector_type: type[FakeSelector] = FakeSelector, default: str | None = "alpha") -> BankSet:
    banks = {"alpha": bank("alpha", 3, 4), "beta": bank("beta", 2, 6)}
    return BankSet(banks, {name: selector_type(b.k) for name, b in banks.items()}, default)


class Server:
    """The router and error handlers over the fake engine, with a real SelectionQueue and BankRegistry."""

    def __init__(
        self, banks: BankSet, loader: Any = None, speculation: Speculation = "off", min_guess_rate: float = 0.0
    ) -> None:
        self.engine = FakeEngine()
        self.banks = BankRegistry(loader or (lambda: banks), banks)

        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            self.queue = SelectionQueue(max_batch=8, wait_s=0.001, cache_size=16)
            self.queue.start()
            shared = (self.engine, MODEL, self.banks, self.queue, LIMITS, speculation, min_guess_rate)
            app.state.completion_serving = CompletionServing(*shared)
            app.state.chat_serving = ChatServing(*shared)
            app.state.models_serving = ModelsServing(self.engine, MODEL, "/models/fake", self.banks, self.queue)
            yield
            await self.queue.stop()

        self.app = FastAPI(lifespan=lifespan)
        install_error_handlers(self.app)
        self.app.include_router(router)


@pytest.fixture
def server() -> Iterator[tuple[Server, TestClient]]:
    srv = Server(bank_set())
    with TestClient(srv.app, raise_server_exceptions=False) as client:
        yield srv, client


def complete(client: TestClient, **body: Any) -> Any:
    return client.post("/v1/completions", json={"model": MODEL, **body})


def events(response: Any) -> list[Any]:
    """The `data:` events of an SSE body, JSON-decoded, up to (not including) [DONE], which must end it."""
    lines = [line[len("data: ") :] for line in response.text.split("\n\n") if line]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# ----- completions ---------------------------------------------------------------------------------------------


def test_dynamic_completion_decodes_behind_the_selected_prompt_and_reports_it(
    server: tuple[Server, TestClient],
) -> None:
    srv, client = server
    response = complete(client, prompt="Hello", max_tokens=5)
    assert response.status_code == 200, response.text
    (choice,) = response.json()["choices"]
    row = len(TOKENIZER.encode("Hello")) % 3
    assert choice["text"] == expected_text(row, 0, 5)
    assert choice["idp"]["mode"] == "dynamic" and choice["idp"]["bank"] == "alpha"
    assert choice["idp"]["prompt"] == f"alpha-p{row}" and choice["idp"]["scores"][f"alpha-p{row}"] == 1.0
    assert response.headers["x-idp-mode"] == "dynamic" and response.headers["x-idp-prompt"] == f"alpha-p{row}"
    assert response.json()["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    ((_, prefix, _),) = srv.engine.calls
    assert prefix is not None and prefix.bank.name == "alpha" and prefix.index == row


def test_a_one_prompt_bank_decodes_behind_its_prompt_without_a_selection_pass() -> None:
    banks = {"alpha": bank("alpha", 3, 4), "single": bank("single", 1, 4)}
    selectors = {name: FakeSelector(b.k) for name, b in banks.items()}
    srv = Server(BankSet(banks, selectors, "single"))
    with TestClient(srv.app, raise_server_exceptions=False) as client:
        response = complete(client, prompt="Hello", max_tokens=5)
    assert response.status_code == 200, response.text
    (choice,) = response.json()["choices"]
    assert choice["idp"] == {
        "mode": "dynamic",
        "bank": "single",
        "prompt": "single-p0",
        "scores": None,
        "margin": None,
        "selection_ms": 0.0,
    }
    assert selectors["single"].scored == []  # no pass ran
    ((_, prefix, _),) = srv.engine.calls
    assert prefix is not None and prefix.bank.name == "single" and prefix.index == 0


def test_several_inputs_and_n_choices_are_numbered_input_major(server: tuple[Server, TestClient]) -> None:
    _, client = server
    prompts = ["ab", "abcd"]
    response = complete(client, prompt=prompts, max_tokens=3, n=2, idp={"bank": "beta"})
    choices = response.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    rows = [len(p) % 2 for p in prompts]
    assert [c["text"] for c in choices] == [expected_text(rows[i], c, 3) for i in range(2) for c in range(2)]
    assert response.headers["x-idp-prompt"] == ",".join(f"beta-p{r}" for r in rows)
    assert response.headers["x-idp-bank"] == "beta,beta"


def test_forced_and_none_modes(server: tuple[Server, TestClient]) -> None:
    srv, client = server
    forced = complete(client, prompt="Hello", max_tokens=3, idp={"prompt": "alpha-p2"}).json()["choices"][0]
    assert forced["text"] == expected_text(2, 0, 3)
    assert forced["idp"] == {
        "mode": "forced",
        "bank": "alpha",
        "prompt": "alpha-p2",
        "scores": None,
        "margin": None,
        "selection_ms": None,
    }
    alone = complete(client, prompt="Hello", max_tokens=3, idp={"mode": "none"})
    assert alone.json()["choices"][0]["text"] == expected_text(None, 0, 3)
    assert alone.headers["x-idp-bank"] == "-" and alone.headers["x-idp-selection-ms"] == "-"
    assert srv.engine.calls[-1][1] is None


def test_echo_with_logprobs_reports_the_callers_tokens_first_one_null(server: tuple[Server, TestClient]) -> None:
    _, client = server
    ids = TOKENIZER.encode("Paris")
    response = complete(client, prompt=[ids], max_tokens=2, echo=True, logprobs=1, idp={"mode": "none"})
    choice = response.json()["choices"][0]
    assert choice["text"] == "Paris" + expected_text(None, 0, 2)
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == list("Paris") + list(expected_text(None, 0, 2))
    assert logprobs["token_logprobs"] == [None, -1.0, -1.0, -1.0, -1.0, -0.5, -0.5]
    assert logprobs["top_logprobs"][0] is None and logprobs["top_logprobs"][1] == {"a": -1.0, "~": -5.0}
    assert logprobs["text_offset"] == list(range(7))


def test_echo_without_generation_scores_the_prompt_and_generates_nothing(server: tuple[Server, TestClient]) -> None:
    _, client = server
    response = complete(client, prompt="Hi", max_tokens=0, echo=True, logprobs=0)
    choice = response.json()["choices"][0]
    assert choice["text"] == "Hi" and choice["logprobs"]["tokens"] == ["H", "i"]
    assert response.json()["usage"]["completion_tokens"] == 0


def test_a_stream_says_what_the_answer_says(server: tuple[Server, TestClient]) -> None:
    _, client = server
    body = {"prompt": ["ab", "abc"], "max_tokens": 4, "n": 2}
    whole = complete(client, **body).json()
    streamed = events(complete(client, **body, stream=True, stream_options={"include_usage": True}))
    texts: dict[int, str] = {}
    idp_seen: dict[int, int] = {}
    for chunk in streamed[:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        idp_seen[choice["index"]] = idp_seen.get(choice["index"], 0) + (choice["idp"] is not None)
    assert texts == {c["index"]: c["text"] for c in whole["choices"]}
    assert set(idp_seen.values()) == {1}, "each choice reports its idp once, on its first chunk"
    assert streamed[-1]["choices"] == [] and streamed[-1]["usage"] == whole["usage"]


# ----- chat ----------------------------------------------------------------------------------------------------


def test_chat_selects_on_the_rendered_conversation(server: tuple[Server, TestClient]) -> None:
    srv, client = server
    messages = [{"role": "user", "content": "Say hi"}]
    response = client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": messages, "max_tokens": 3, "logprobs": True, "top_logprobs": 1},
    )
    rendered = "<user>Say hi\n<assistant>"
    row = len(rendered) % 3
    choice = response.json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected_text(row, 0, 3)}
    assert choice["idp"]["prompt"] == f"alpha-p{row}"
    assert [p["token"] for p in choice["logprobs"]["content"]] == list(expected_text(row, 0, 3))
    assert all(len(p["top_logprobs"]) == 1 for p in choice["logprobs"]["content"])
    assert srv.engine.calls[-1][0] == TOKENIZER.encode(rendered, add_special_tokens=False)


def test_chat_without_max_tokens_gets_the_context_left_and_streams_alike(server: tuple[Server, TestClient]) -> None:
    srv, client = server
    messages = [{"role": "user", "content": "Hi"}]
    whole = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages}).json()
    (tokens, prefix, params) = srv.engine.calls[-1]
    assert params.max_tokens == min(CONTEXT - prefix.bank.m - len(tokens), LIMITS.max_tokens)
    streamed = events(client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "stream": True}))
    assert streamed[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert streamed[0]["choices"][0]["idp"]["prompt"] == whole["choices"][0]["idp"]["prompt"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in streamed[1:])
    assert text == whole["choices"][0]["message"]["content"]


# ----- what the caller gets wrong: 4xx, nothing decoded ---------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "param", "needle"),
    [
        ({"model": "other"}, 404, "model", "other"),
        ({"n": 4}, 400, "n", "limit of 3"),
        ({"max_tokens": 41}, 400, "max_tokens", "limit of 40"),
        ({"prompt": ["a"] * 5}, 400, "prompt", "at most 4"),
        ({"prompt": [[5, VOCAB]]}, 400, "prompt", f"token id {VOCAB}"),
        ({"prompt": "x" * 90}, 400, "max_tokens", "exceeds the model's context of 96"),
        ({"idp": {"bank": "gamma"}}, 400, "idp.bank", "gamma"),
        ({"idp": {"prompt": "alpha-p9"}}, 400, "idp.prompt", "alpha-p9"),
        ({"idp": {"mode": "forced"}}, 400, "idp.prompt", "forced"),
        ({"idp": {"mode": "none", "prompt": "alpha-p0"}}, 400, "idp.prompt", "none"),
    ],
)
def test_refused_requests_name_what_is_wrong_and_reach_no_engine(
    server: tuple[Server, TestClient], body: dict[str, Any], status: int, param: str, needle: str
) -> None:
    srv, client = server
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 8, **body})
    error = error_of(response, status)
    assert error["param"] == param and needle in error["message"]
    assert srv.engine.calls == [] and srv.banks.current.selectors["alpha"].scored == []


def test_without_banks_idp_is_off_and_asking_for_it_is_a_400() -> None:
    srv = Server(BankSet({}, {}, None))
    with TestClient(srv.app) as client:
        assert client.get("/v1/models").json()["data"][0]["idp"] == {"default_bank": None, "banks": []}
        assert complete(client, prompt="Hi", max_tokens=1).json()["choices"][0]["idp"]["mode"] == "none"
        error = error_of(complete(client, prompt="Hi", idp={"mode": "dynamic"}), 400)
        assert error["param"] == "idp.bank"


# ----- our faults: 5xx, logged -------------------------------------------------------------------------------


def test_a_selector_bug_is_a_500_logged_with_its_traceback_never_the_callers_400(
    caplog: pytest.LogCaptureFixture,
) -> None:
    srv = Server(bank_set(BrokenSelector))
    with TestClient(srv.app, raise_server_exceptions=False) as client, caplog.at_level(logging.ERROR):
        error = error_of(complete(client, prompt="Hello", max_tokens=2), 500)
        assert error["type"] == "internal_error" and "shape mismatch" not in error["message"]
        assert "shape mismatch" in caplog.text and "Traceback" in caplog.text
        assert client.get("/health").status_code == 200, "one failed pass is not a dead worker"
        ok = complete(client, prompt="Hello", max_tokens=2, idp={"mode": "none"})
        assert ok.status_code == 200


def test_a_dead_selection_worker_fails_dynamic_requests_with_503_and_health_with_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    srv = Server(bank_set(KillingSelector))
    with TestClient(srv.app, raise_server_exceptions=False) as client, caplog.at_level(logging.CRITICAL):
        assert client.get("/health").status_code == 200
        first = error_of(complete(client, prompt="Hello", max_tokens=2), 503)
        assert first["code"] == "selection_unavailable" and first["type"] == "service_unavailable"
        assert "selection worker died" in caplog.text and "Traceback" in caplog.text
        later = error_of(complete(client, prompt="Other", max_tokens=2), 503)
        assert later["code"] == "selection_unavailable"
        assert error_of(client.get("/health"), 503)["code"] == "selection_unavailable"
        forced = complete(client, prompt="Hello", max_tokens=2, idp={"prompt": "alpha-p1"})
        assert forced.status_code == 200, "a forced prompt needs no selection"


def test_a_dead_engine_is_503_before_a_stream_and_an_error_event_inside_one(server: tuple[Server, TestClient]) -> None:
    srv, client = server
    srv.engine.die_after_tokens = 2
    streamed = events(complete(client, prompt="Hello", max_tokens=6, stream=True))
    row = len("Hello") % 3
    assert "".join(c["choices"][0]["text"] for c in streamed[:-1]) == expected_text(row, 0, 6)[:2]
    assert streamed[-1]["error"]["code"] == "engine_unavailable"
    for stream in (False, True):
        assert (
            error_of(complete(client, prompt="Hello", max_tokens=2, stream=stream), 503)["code"] == "engine_unavailable"
        )
    assert error_of(client.get("/health"), 503)["code"] == "engine_unavailable"


# ----- speculation: a decode started behind a guessed prompt while the pass runs ------------------------------


class FailsOnSevenSelector(FakeSelector):
    """Selects as FakeSelector, but raises (a selector bug) on an input of seven tokens."""

    def select(self, batch: Sequence[Sequence[int]]) -> list[Selection]:
        if any(len(ids) == 7 for ids in batch):
            raise ValueError("a selector bug")
        return super().select(batch)


def row_of(text: str) -> int:
    """The row FakeSelector picks in bank alpha (3 prompts) for this input."""
    return len(TOKENIZER.encode(text)) % 3


def speculations(outcome: str) -> float:
    return REGISTRY.get_sample_value("idp_speculations_total", {"outcome": outcome}) or 0.0


@pytest.mark.parametrize("stream", [False, True])
def test_a_right_guess_keeps_the_decode_started_before_the_selection_answered(stream: bool) -> None:
    srv = Server(bank_set(), speculation="always")
    with TestClient(srv.app) as client:
        complete(client, prompt="Hello", max_tokens=5)  # the bank's first selection: nothing to guess from
        assert srv.engine.request_ids[-1].endswith("-0")
        hits = speculations("hit")
        assert row_of("World") == row_of("Hello")
        response = complete(client, prompt="World", max_tokens=5, stream=stream)
    text = (
        "".join(e["choices"][0]["text"] for e in events(response)) if stream else response.json()["choices"][0]["text"]
    )
    assert text == expected_text(row_of("World"), 0, 5)
    assert srv.engine.request_ids[-1].endswith("-0-guess") and len(srv.engine.calls) == 2, "one decode, kept"
    assert srv.engine.aborted == [] and speculations("hit") == hits + 1


def test_a_wrong_guess_is_aborted_and_the_input_decoded_behind_the_selected_prompt() -> None:
    srv = Server(bank_set(), speculation="always")
    with TestClient(srv.app) as client:
        complete(client, prompt="Hello", max_tokens=5)
        misses = speculations("miss")
        srv.engine.prefill_s = 0.2  # the guess is still prefilling when the pass answers
        assert row_of("Hey!") != row_of("Hello")
        response = complete(client, prompt="Hey!", max_tokens=5)
    (choice,) = response.json()["choices"]
    assert (
        choice["text"] == expected_text(row_of("Hey!"), 0, 5) and choice["idp"]["prompt"] == f"alpha-p{row_of('Hey!')}"
    )
    guess, kept = srv.engine.calls[-2:]
    assert guess[1] is not None and guess[1].index == row_of("Hello")
    assert kept[1] is not None and kept[1].index == row_of("Hey!")
    guess_id, kept_id = srv.engine.request_ids[-2:]
    assert guess_id.endswith("-guess") and srv.engine.aborted == [guess_id]
    assert srv.engine.log[-3:] == [f"start {guess_id}", f"abort {guess_id}", f"start {kept_id}"], "aborted first"
    assert speculations("miss") == misses + 1


def test_idle_speculation_waits_for_an_idle_engine_and_off_never_speculates() -> None:
    srv = Server(bank_set(), speculation="idle")
    with TestClient(srv.app) as client:
        complete(client, prompt="Hello", max_tokens=2)
        srv.engine.busy = 1
        complete(client, prompt="World", max_tokens=2)
        assert not srv.engine.request_ids[-1].endswith("-guess"), "vLLM holds a request: no speculation"
        srv.engine.busy = 0
        complete(client, prompt="World", max_tokens=2)
        assert srv.engine.request_ids[-1].endswith("-guess")
    off = Server(bank_set())
    with TestClient(off.app) as client:
        for text in ("Hello", "World"):
            complete(client, prompt=text, max_tokens=2)
    assert not any(i.endswith("-guess") for i in off.engine.request_ids)


def test_speculation_pauses_while_the_banks_guesses_mostly_miss_and_resumes_once_they_hit() -> None:
    srv = Server(bank_set(), speculation="always", min_guess_rate=0.5)

    def text(n: int, row: int) -> str:
        """A new input (never remembered) that FakeSelector sends to `row`."""
        body = f"input {n:03d} "
        return body + "x" * ((row - len(body)) % 3)

    def guessed(n: int, row: int) -> bool:
        """Send input n; whether a decode was started on a guess (the answer is right either way)."""
        before = len(srv.engine.request_ids)
        choice = complete(client, prompt=text(n, row), max_tokens=1).json()["choices"][0]
        assert choice["idp"]["prompt"] == f"alpha-p{row}" and choice["text"] == expected_text(row, 0, 1)
        return any(i.endswith("-guess") for i in srv.engine.request_ids[before:])

    with TestClient(srv.app) as client:
        complete(client, prompt=text(0, 0), max_tokens=1)  # the bank's first selection: nothing to guess from
        skipped = speculations("skipped")
        # rows 1, 2, 0, 1, ...: every guess (the row before) is wrong; 0.9^n of the optimistic start drops
        # under 0.5 after 7 misses, and from then on the decode waits for the pass
        acted = [guessed(n, n % 3) for n in range(1, 11)]
        assert acted == [True] * 7 + [False] * 3
        assert speculations("skipped") == skipped + 3
        # the same row again and again: the guesses are still scored, and the first right one lifts the rate
        # back over 0.5 (0.9^10 = 0.35 -> 0.41, 0.47, 0.52)
        acted = [guessed(n, 1) for n in range(11, 16)]
    assert acted == [False, False, False, True, True], "resumes once the guesses hit again"


def test_a_failed_selection_aborts_the_speculative_decode_and_answers_as_without_speculation() -> None:
    srv = Server(bank_set(FailsOnSevenSelector), speculation="always")
    with TestClient(srv.app, raise_server_exceptions=False) as client:
        complete(client, prompt="Hello", max_tokens=2)
        srv.engine.prefill_s = 1.0  # the guess is still prefilling when the pass fails
        error = error_of(complete(client, prompt="Goodbye", max_tokens=2), 500)
        guess_id = srv.engine.request_ids[-1]
        assert guess_id.endswith("-guess") and srv.engine.aborted == [guess_id], "aborted before the 500 went out"
    assert error["type"] == "internal_error"


# ----- models and bank reload -------------------------------------------------------------------------------


def test_models_lists_the_banks_with_what_they_measured_and_a_reload_swaps_them_whole() -> None:
    new = BankSet({"gamma": bank("gamma", 2, 4, {"test_fgr": 0.5})}, {"gamma": FakeSelector(2)}, "gamma")
    srv = Server(bank_set(), loader=lambda: new)
    with TestClient(srv.app) as client:
        card = client.get("/v1/models").json()["data"][0]
        assert card["id"] == MODEL and card["max_model_len"] == CONTEXT
        assert card["idp"]["default_bank"] == "alpha"
        assert [(b["name"], b["k"], b["m"]) for b in card["idp"]["banks"]] == [("alpha", 3, 4), ("beta", 2, 6)]
        reloaded = client.post("/admin/banks/reload")
        assert reloaded.json() == {
            "default_bank": "gamma",
            "banks": [
                {"name": "gamma", "k": 2, "m": 4, "prompts": ["gamma-p0", "gamma-p1"], "measured": {"test_fgr": 0.5}}
            ],
        }
        assert complete(client, prompt="Hi", max_tokens=1).json()["choices"][0]["idp"]["bank"] == "gamma"


def _raise(error: Exception) -> Any:
    def loader() -> BankSet:
        raise error

    return loader


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (BankError("bank 'gamma': prompts.safetensors does not match its sha256"), 409, "bank_reload_refused"),
        (BankError("default bank 'alpha' is not among the loaded banks ['beta']"), 409, "bank_reload_refused"),
        (RuntimeError("out of memory while loading the selection model"), 500, "bank_reload_failed"),
        (ValueError("a bug in the loader"), 500, "bank_reload_failed"),
    ],
)
def test_a_refused_reload_is_409_a_failed_one_500_and_the_old_banks_keep_serving(
    error: Exception, status: int, code: str, caplog: pytest.LogCaptureFixture
) -> None:
    srv = Server(bank_set(), loader=_raise(error))
    with TestClient(srv.app, raise_server_exceptions=False) as client, caplog.at_level(logging.WARNING):
        failed = error_of(client.post("/admin/banks/reload"), status)
        assert failed["code"] == code
        assert (str(error) in failed["message"]) == (status == 409), "our own faults are not detailed to callers"
        assert ("Traceback" in caplog.text) == (status == 500)
        assert complete(client, prompt="Hi", max_tokens=1).json()["choices"][0]["idp"]["bank"] == "alpha"
