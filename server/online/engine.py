"""The one place that talks to vLLM: decode [chosen soft prompt | input tokens] and report tokens back.

Callers hand in token ids, an optional soft-prompt prefix (a bank and a row) and `DecodeParams`; they get back
`DecodeOutput`s made of plain dataclasses, so the HTTP layer never sees a vLLM or torch type and this module never
sees HTTP. One door is left open on purpose: `Engine.async_llm`, the raw vLLM engine, for tests that compare the
server's output with vLLM fed directly and read vLLM's request bookkeeping. Serving code never uses it (the
import contracts keep vLLM's imports to this module, but an attribute is not an import: this line is the rule).

How a prefix is decoded. vLLM V1 has no soft-prompt adapter, but it accepts `prompt_embeds`. We send the full
sequence embedded, [P_k | E(x)] (E = the model's own input embedding table, read from the weights), together with
the *mixed-mode* fields `prompt_token_ids` = [placeholder x m | x] and `prompt_is_token_ids` = [False x m |
True x n]. The mixed-mode ids are what lets the engine compute prompt logprobs for an embeds request (its model
runner skips prompt logprobs only when a request has no token ids), so `echo` needs no second model: the user's
tokens are scored by the very weights that decode them. The virtual positions are cut off every output here; no
caller ever sees a logprob or a token for them.

vLLM's docs warn that a prompt_embeds tensor of the wrong shape can crash the engine (a crash takes every
in-flight request with it), so `Engine` checks every prefix and token id before it reaches vLLM.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import vllm
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.logprobs import Logprob
from vllm.outputs import RequestOutput
from vllm.platforms import current_platform
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError

from server.core.banks import PromptBank
from server.core.identity import embedding_weight
from server.online.allocator import Allocator, engine_malloc
from server.online.cpus import pinned_by_children

VLLM_VERSION: str = vllm.__version__
PLACEHOLDER_TOKEN_ID = 0
"""Token id standing in for a virtual position in `prompt_token_ids`; never embedded (its embedding comes from
the prefix) and never reported."""

logger = logging.getLogger(__name__)


class EngineRequestError(ValueError):
    """The request cannot be decoded as given (bad token id, too long, a value vLLM refuses); a 400, not a crash."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class EngineUnavailableError(RuntimeError):
    """The engine is dead or shut down: nothing more can be served until the process restarts."""


@dataclass(frozen=True)
class EngineConfig:
    """What the engine is started with; everything not named here goes through `options` to vLLM untouched."""

    model: Path
    served_model_name: str
    dtype: str = "float32"
    max_model_len: int | None = None
    kv_cache_gib: float = 1.0
    enforce_eager: bool = True
    caller_uses_cuda: bool = False
    """This process initialises CUDA itself (the selection pass on the GPU), maybe while vLLM starts."""
    allocator: Allocator = "auto"
    """malloc of the engine's processes (server/online/allocator.py)."""
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Prefix:
    """A soft prompt to decode in front of the input: row `index` of `bank`."""

    bank: PromptBank
    index: int


@dataclass(frozen=True)
class DecodeParams:
    """Sampling controls, in OpenAI's terms. `prompt_logprobs` asks for the input tokens' logprobs (echo)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    stream: bool = False


@dataclass(frozen=True)
class TokenLogprob:
    """One position's logprob: the token there and vLLM's candidates (that token plus the top ones, by rank)."""

    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class ChoiceDelta:
    """New output of one choice: everything so far when not streaming, only what is new when streaming."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: str | None


@dataclass(frozen=True)
class DecodeOutput:
    """One step of a request's output. `prompt_logprobs` covers the input tokens only (first one None, as OpenAI
    reports it) and arrives once, with the first output, when asked for."""

    choices: tuple[ChoiceDelta, ...]
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None
    finished: bool


class Engine:
    """An in-process vLLM `AsyncLLM` (its engine core runs in a child process) serving [prefix | tokens]."""

    def __init__(
        self, llm: AsyncLLM, embedding_table: torch.Tensor, max_model_len: int, worker_cpus: frozenset[int]
    ) -> None:
        self._llm = llm
        self._table = embedding_table
        self.max_model_len = max_model_len
        self.worker_cpus = worker_cpus
        """CPUs vLLM pinned its worker threads to (its CPU build binds OpenMP threads), read right after start;
        empty if none."""

    @classmethod
    def start(cls, config: EngineConfig) -> Engine:
        """Start vLLM; call from inside the event loop that will serve (vLLM binds its output task to it)."""
        args = AsyncEngineArgs(
            model=str(config.model),
            served_model_name=config.served_model_name,
            dtype=config.dtype,
            max_model_len=config.max_model_len,
            enforce_eager=config.enforce_eager,
            kv_cache_memory_bytes=int(config.kv_cache_gib * 2**30),
            enable_prompt_embeds=True,
            **config.options,
        )
        if config.caller_uses_cuda:
            # vLLM forks its engine core unless CUDA is already initialised when it checks; a CUDA context made
            # by another thread of this process after that check would leave a forked child unable to use CUDA.
            os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
        with engine_malloc(config.allocator, current_platform.is_cpu()):  # for the processes vLLM spawns here
            llm = AsyncLLM.from_engine_args(args)
        table = embedding_weight(config.model)
        return cls(llm, table, llm.model_config.max_model_len, pinned_by_children())

    @property
    def tokenizer(self) -> Any:
        """The tokenizer vLLM detokenizes with (a transformers tokenizer); tokenizing with it keeps ids consistent."""
        return self._llm.get_tokenizer()

    @property
    def vocab_size(self) -> int:
        return int(self._table.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self._table.shape[1])

    @property
    def errored(self) -> bool:
        """True once the engine core has died (it is not restarted in-process)."""
        return self._llm.errored

    def unfinished_requests(self) -> int:
        """Requests vLLM holds now, running or waiting to run: its frontend's own count (`AsyncLLM.
        get_num_unfinished_requests`), which grows when a request is added and shrinks when it finishes or is
        aborted. Unlike the scheduler's running/waiting gauges it needs no stats logging and never lags an
        engine step, so 0 means the worker cores have nothing to do now (read on the event loop)."""
        return self._llm.get_num_unfinished_requests()

    @property
    def async_llm(self) -> AsyncLLM:
        """The raw vLLM engine, for tests only (see the module doc); serving code goes through the methods here."""
        return self._llm

    def embed(self, token_ids: Sequence[int], prefix: Prefix | None) -> torch.Tensor:
        """[P | E(x)] as one float32 tensor [m + n, d]; exactly what the engine is given for a prefixed request."""
        embedded = self._table[torch.tensor(list(token_ids), dtype=torch.long)]
        if prefix is None:
            return embedded
        return torch.cat([prefix.bank.embeddings[prefix.index], embedded])

    def check(self, token_ids: Sequence[int], prefix: Prefix | None, max_tokens: int) -> None:
        """Refuse what would crash or confuse vLLM: empty input, unknown ids, a bad prefix, too many tokens."""
        if not token_ids:
            raise EngineRequestError("the prompt is empty (no tokens)", param="prompt")
        bad = next((t for t in token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise EngineRequestError(f"token id {bad} is out of range [0, {self.vocab_size})", param="prompt")
        virtual = 0 if prefix is None else self._check_prefix(prefix)
        total = virtual + len(token_ids) + max(max_tokens, 1)
        if total > self.max_model_len:
            raise EngineRequestError(
                f"{len(token_ids)} prompt tokens + {virtual} soft-prompt tokens + {max(max_tokens, 1)} "
                f"max_tokens = {total} exceeds the model's context of {self.max_model_len} tokens",
                param="max_tokens",
            )

    def _check_prefix(self, prefix: Prefix) -> int:
        """Length m of a valid prefix; a bank for another hidden size is a server fault.

        Finite values are not re-checked here: `PromptBank` refuses non-finite prompts when it is built, once per
        bank, so checking every request's rows again would only repeat that work on the hot path."""
        rows = prefix.bank.embeddings
        if rows.dim() != 3 or rows.shape[2] != self.hidden_size or not 0 <= prefix.index < rows.shape[0]:
            raise ValueError(
                f"bank {prefix.bank.name!r}: prompt {prefix.index} of a {list(rows.shape)} bank cannot prefix "
                f"a model of hidden size {self.hidden_size}"
            )
        return int(rows.shape[1])

    async def generate(
        self, request_id: str, token_ids: Sequence[int], prefix: Prefix | None, params: DecodeParams
    ) -> AsyncIterator[DecodeOutput]:
        """Decode [prefix | token_ids]; yield deltas when `params.stream`, else one final output."""
        token_ids = list(token_ids)
        self.check(token_ids, prefix, params.max_tokens)
        virtual = 0 if prefix is None else prefix.bank.m
        prompt = self._engine_prompt(token_ids, prefix)
        first = True
        try:
            # aclosing: a caller that stops early (a disconnect, a speculative decode not kept) closes vLLM's
            # generator now, which aborts the request, rather than whenever the garbage collector gets to it.
            async with aclosing(self._llm.generate(prompt, _sampling_params(params), request_id)) as outputs:
                async for out in outputs:
                    yield _convert(out, virtual, include_prompt=first)
                    first = False
        except EngineDeadError as error:
            raise EngineUnavailableError(str(error)) from error
        except VLLMClientError as error:
            raise EngineRequestError(str(error), param=getattr(error, "parameter", None)) from error

    def _engine_prompt(self, token_ids: list[int], prefix: Prefix | None) -> dict[str, Any]:
        """Plain token ids without a prefix (native echo, shared prefix cache); else mixed-mode embeds."""
        if prefix is None:
            return {"prompt_token_ids": token_ids}
        m = prefix.bank.m
        return {
            "prompt_embeds": self.embed(token_ids, prefix),
            "prompt_token_ids": [PLACEHOLDER_TOKEN_ID] * m + token_ids,
            "prompt_is_token_ids": [False] * m + [True] * len(token_ids),
        }

    async def wait_dead(self, poll_s: float = 0.2) -> None:
        """Return once the engine core has died. vLLM notices a dead core process at once (it watches the process
        sentinel) and fails every in-flight request; polling its flag is all that is left to do here."""
        while not self.errored:
            await asyncio.sleep(poll_s)

    async def is_healthy(self) -> bool:
        """False once the engine core has died or stops answering its health probe."""
        if self.errored:
            return False
        try:
            await self._llm.check_health()
        except Exception:  # any failure of the health probe means "not serving"
            logger.exception("engine health check failed")
            return False
        return True

    def shutdown(self) -> None:
        self._llm.shutdown()


def _sampling_params(params: DecodeParams) -> SamplingParams:
    return SamplingParams(
        n=params.n,
        max_tokens=max(params.max_tokens, 1),
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        stop=list(params.stop),
        seed=params.seed,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        ignore_eos=params.ignore_eos,
        logprobs=params.logprobs,
        prompt_logprobs=params.prompt_logprobs,
        output_kind=RequestOutputKind.DELTA if params.stream else RequestOutputKind.FINAL_ONLY,
    )


def _convert(out: RequestOutput, virtual: int, include_prompt: bool) -> DecodeOutput:
    """vLLM's output without its first `virtual` prompt positions, as our own dataclasses."""
    choices = tuple(
        ChoiceDelta(
            index=c.index,
            text=c.text,
            token_ids=tuple(c.token_ids),
            logprobs=None if c.logprobs is None else tuple(_logprobs(c.token_ids, c.logprobs)),
            finish_reason=c.finish_reason,
        )
        for c in out.outputs
    )
    prompt_logprobs = None
    if include_prompt and out.prompt_logprobs is not None:
        ids = out.prompt_token_ids[virtual:]
        # Position 0 of the input follows the soft prompt, so vLLM scored it; OpenAI reports the first prompt
        # token's logprob as null and clients (lm-eval) rely on it, so it is dropped like the virtual ones.
        prompt_logprobs = (None, *_logprobs(ids[1:], out.prompt_logprobs[virtual + 1 :]))
    return DecodeOutput(choices=choices, prompt_logprobs=prompt_logprobs, finished=out.finished)


def _logprobs(token_ids: Sequence[int], positions: Sequence[dict[int, Logprob] | None]) -> list[TokenLogprob]:
    result = []
    for token_id, candidates in zip(token_ids, positions, strict=True):
        chosen = candidates[token_id]
        top = tuple(
            (lp.decoded_token or "", lp.logprob) for _, lp in sorted(candidates.items(), key=lambda kv: kv[1].rank)
        )
        result.append(TokenLogprob(token_id, chosen.decoded_token or "", chosen.logprob, top))
    return result


def engine_options_from_cli(argv: list[str]) -> dict[str, Any]:
    """vLLM engine flags (`--max-num-seqs 8 ...`) parsed by vLLM's own parser, as AsyncEngineArgs fields.

    Only the options given are returned, so they override nothing else. Flags idp-serve sets itself (model,
    dtype, prompt embeds, ...) are refused: they have their own settings, and two sources would disagree.
    """
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(prog="idp-serve serve --"))
    given, defaults = vars(parser.parse_args(argv)), vars(parser.parse_args([]))
    options = {k: v for k, v in given.items() if v != defaults[k]}
    owned = sorted(options.keys() & _OWNED_OPTIONS)
    if owned:
        raise ValueError(f"set {', '.join(owned)} with idp-serve's own flags, not as vLLM flags after '--'")
    return options


_OWNED_OPTIONS = frozenset(
    {
        "model",
        "served_model_name",
        "dtype",
        "max_model_len",
        "enforce_eager",
        "kv_cache_memory_bytes",
        "enable_prompt_embeds",
    }
)
