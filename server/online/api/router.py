"""FastAPI routes only: parse the body, call the endpoint's serving, wrap what it returns. No serving logic here.

Each route gets its serving from the app state, where the app lifespan put it (see server.online.app), as vLLM's
router gets its `OpenAIServing*` objects.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server import __version__
from server.online import metrics
from server.online.api.errors import ErrorResponse, unavailable
from server.online.api.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelIdp,
    ModelList,
)
from server.online.api.serving_base import Served
from server.online.api.serving_chat import ChatServing
from server.online.api.serving_completion import CompletionServing
from server.online.api.serving_models import ModelsServing
from server.online.engine import VLLM_VERSION

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 500, 503)}
IDP_HEADERS = {
    "x-idp-mode": {"description": "IDP mode per input, comma-separated in input order.", "schema": {"type": "string"}},
    "x-idp-bank": {"description": "Bank per input ('-' for none).", "schema": {"type": "string"}},
    "x-idp-prompt": {"description": "Chosen soft prompt per input ('-' for none).", "schema": {"type": "string"}},
    "x-idp-selection-ms": {
        "description": "Selection pass time per input ('-' unless dynamic).",
        "schema": {"type": "string"},
    },
}
GENERATE_RESPONSES = {**ERRORS, 200: {"headers": IDP_HEADERS}}

router = APIRouter()


def _completion(request: Request) -> CompletionServing:
    return request.app.state.completion_serving


def _chat(request: Request) -> ChatServing:
    return request.app.state.chat_serving


def _models(request: Request) -> ModelsServing:
    return request.app.state.models_serving


Completions = Annotated[CompletionServing, Depends(_completion)]
Chat = Annotated[ChatServing, Depends(_chat)]
Models = Annotated[ModelsServing, Depends(_models)]


def _respond(served: Served) -> Response:
    if isinstance(served.body, ChatCompletionResponse | CompletionResponse):
        return JSONResponse(served.body.model_dump(mode="json"), headers=served.headers)
    return StreamingResponse(served.body, media_type="text/event-stream", headers=served.headers)


@router.post("/v1/completions", response_model=CompletionResponse, responses=GENERATE_RESPONSES)
async def create_completion(body: CompletionRequest, service: Completions) -> Response:
    """OpenAI completions, with `idp` to steer prompt selection; `stream=true` answers with server-sent events."""
    return _respond(await service.create(body))


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=GENERATE_RESPONSES)
async def create_chat_completion(body: ChatCompletionRequest, service: Chat) -> Response:
    """OpenAI chat completions; the prompt is selected on the chat-templated input."""
    return _respond(await service.create(body))


@router.get("/v1/models", response_model=ModelList)
async def list_models(service: Models) -> ModelList:
    """The served model, with its prompt banks and their prompts under `idp`."""
    return service.models()


@router.get("/health", responses={503: {"model": ErrorResponse}})
async def health(service: Models) -> Response:
    """200 while the engine and the selection worker serve, 503 once either has died."""
    problem = await service.unhealthy()
    if problem is not None:
        raise unavailable(*problem)
    return Response(status_code=200)


@router.post(
    "/admin/banks/reload",
    response_model=ModelIdp,
    responses={
        **ERRORS,
        409: {"model": ErrorResponse, "description": "A bank failed to load; the previous banks keep serving."},
    },
)
async def reload_banks(service: Models) -> ModelIdp:
    """Load the banks directory again and swap the whole set in atomically (requests see old or new, never a
    mix); behind the API key when one is set."""
    return await service.reload_banks()


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__, "vllm_version": VLLM_VERSION}


@router.get("/metrics")
async def prometheus_metrics() -> Response:
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)
