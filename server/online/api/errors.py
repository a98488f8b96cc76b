"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the status OpenAI would use.

Serving code raises `ApiError`; the handlers installed by `install_error_handlers` turn it, FastAPI's schema
errors (422 -> 400 naming the field, as OpenAI does), unknown routes and anything unexpected into that shape.
An unexpected exception fails its own request with a 500 and a log line; it never reaches other requests.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ApiError(Exception):
    """A request that cannot be served, with the HTTP status and OpenAI error fields to answer it with."""

    def __init__(
        self,
        message: str,
        status: int = HTTPStatus.BAD_REQUEST,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = int(status)
        self.type = type
        self.param = param
        self.code = code

    def response(self) -> JSONResponse:
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=self.status)


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 invalid_request_error: the request is well-formed JSON but asks for something we cannot do."""
    return ApiError(message, param=param, code=code)


def model_not_found(model: str) -> ApiError:
    return ApiError(f"The model '{model}' does not exist", HTTPStatus.NOT_FOUND, param="model", code="model_not_found")


def unavailable(message: str, code: str = "engine_unavailable") -> ApiError:
    """A 503: a part this process cannot serve without (the engine, the selection worker) has died; another
    replica, or this one once restarted, can serve the request."""
    return ApiError(message, HTTPStatus.SERVICE_UNAVAILABLE, type="service_unavailable", code=code)


def internal(message: str = "internal server error", code: str | None = None) -> ApiError:
    """A 500: a fault of this server, never the caller's (log its traceback where it is raised)."""
    return ApiError(message, HTTPStatus.INTERNAL_SERVER_ERROR, type="internal_error", code=code)


def _field_path(loc: tuple) -> str | None:
    """'idp.mode' from pydantic's ('body', 'idp', 'mode'); None for the body itself."""
    return ".".join(str(part) for part in loc[1:]) or None


async def _api_error(_: Request, error: ApiError) -> JSONResponse:
    return error.response()


async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    param = _field_path(tuple(first.get("loc", ())))
    message = f"{param}: {first['msg']}" if param else first["msg"]
    return invalid(message, param=param).response()


async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if error.status_code == HTTPStatus.NOT_FOUND else "invalid_request_error"
    return ApiError(str(error.detail), error.status_code, type=kind).response()


async def _unexpected(request: Request, error: Exception) -> JSONResponse:
    logger.exception("unhandled error serving %s %s", request.method, request.url.path)
    return internal().response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
