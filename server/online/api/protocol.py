"""Request and response models of the OpenAI-compatible API, plus the `idp` extension (like vLLM's protocol.py).

Only shapes and value ranges live here; what the values mean is the servings' business (serving_*.py). Unknown
request fields are refused (400 naming the field) rather than ignored, so a misspelt option never silently changes
an answer.
OpenAI fields we do not implement are declared and refused unless left at their neutral value, for the same reason.

Integers that travel to the engine are bounded here (seed, top_k, token ids): Python ints are unbounded, vLLM's
are not, and a value that fails deep inside the engine would be a 500 instead of the caller's 400. Limits an
operator may tune (`n`, the number of prompts, max_tokens) are ServeSettings, enforced by serving_base.py.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

IdpMode = Literal["dynamic", "forced", "none"]
FinishReason = Literal["stop", "length"]
INT32_MAX = 2**31 - 1
TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=INT32_MAX)]], Field(min_length=1)]


def _lone_surrogate(value: Any, path: str = "") -> str | None:
    """Path of the first string in `value` that is not valid Unicode (JSON's "\\ud800" escapes decode to lone
    surrogates, which no tokenizer or JSON encoder accepts), else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _lone_surrogate(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


class IdpRequest(BaseModel):
    """Per-request control of Inference-time Dynamic Prompting (extension to OpenAI's API).

    `mode` defaults to `forced` when `prompt` is given, else to `dynamic` when a bank is available, else `none`.
    """

    model_config = ConfigDict(extra="forbid")

    bank: str | None = Field(None, description="Prompt bank to use (default: the server's default bank).")
    prompt: str | None = Field(None, description="Force this prompt of the bank (by name) instead of selecting.")
    mode: IdpMode | None = Field(
        None,
        description="dynamic: select a prompt per input; forced: use `prompt`; none: decode the input alone.",
    )


class IdpInfo(BaseModel):
    """What IDP did for one choice: which prompt was decoded in front of the input and why."""

    mode: IdpMode
    bank: str | None = None
    prompt: str | None = Field(None, description="Name of the soft prompt decoded before the input.")
    scores: dict[str, float] | None = Field(None, description="Selection score of every prompt of the bank.")
    margin: float | None = Field(None, description="Best score minus the second best.")
    selection_ms: float | None = Field(
        None,
        description="Wall time of the selection pass this input was in; 0 when the selection of an identical "
        "earlier input was reused (the selection cache).",
    )


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid")

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(
        0, ge=-1, le=INT32_MAX, description="vLLM extension: sample from the k most likely tokens (0/-1: all)."
    )
    n: int = Field(1, ge=1, description="Choices per input, up to the server's max_n (IDP_MAX_N, default 16).")
    stop: str | Annotated[list[str], Field(max_length=4)] | None = Field(
        None, description="Up to 4 sequences where generation stops."
    )
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past end-of-sequence tokens.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = Field(None, description="Not supported; only null or {} is accepted.")
    idp: IdpRequest | None = Field(None, description="IDP control (extension); see IdpRequest.")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        path = _lone_surrogate(data)
        if path is not None:
            raise ValueError(f"{path}: strings must be valid Unicode (found a lone surrogate)")
        return data

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    @property
    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions. `prompt` is a string, a list of strings, a token-id list or a list of them."""

    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    echo: bool = Field(
        False,
        description="Return the prompt before the completion, with logprobs if asked: one entry per prompt token "
        "(the first null, as OpenAI reports it), scored after the chosen soft prompt, whose virtual tokens are "
        "never reported.",
    )
    max_tokens: int = Field(16, ge=0, description="0 is allowed with echo: score the prompt, generate nothing.")
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = Field(None, description="Not supported; only null is accepted.")
    best_of: int | None = Field(None, description="Only null or equal to n is accepted.")

    @field_validator("max_tokens")
    @classmethod
    def _zero_needs_echo(cls, value: int, info: ValidationInfo) -> int:
        if value == 0 and not info.data.get("echo"):
            raise ValueError("max_tokens=0 is only allowed with echo=true")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError("suffix is not supported")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != info.data.get("n"):
            raise ValueError("best_of different from n is not supported")
        return value


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs: parallel lists, one entry per reported token."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    idp: IdpInfo | None = None


class Usage(BaseModel):
    """Token counts. `prompt_tokens` counts the caller's tokens only, never the soft prompt's virtual tokens."""

    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message; content as a string or as text parts (other part types are not supported)."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions. The chat template is applied; selection runs on the rendered prompt's tokens."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Deprecated alias of max_completion_tokens.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Default: the rest of the context.")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs=true")
        return value


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    idp: IdpInfo | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatDelta(BaseModel):
    """A streamed message delta: carries only what changed (OpenAI omits the role after the first chunk)."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _omit_unchanged(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    idp: IdpInfo | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


class BankCard(BaseModel):
    name: str
    k: int
    m: int
    prompts: list[str]
    measured: dict[str, float] = Field(
        default_factory=dict, description="What the bank's manifest records it measured (e.g. test_fgr)."
    )


class ModelIdp(BaseModel):
    default_bank: str | None
    banks: list[BankCard]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "idp-serve"
    root: str
    max_model_len: int
    idp: ModelIdp


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
