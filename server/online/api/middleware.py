"""ASGI middleware guarding every route before FastAPI parses anything: body size limit and API key.

Both are plain ASGI (not `BaseHTTPMiddleware`) so streamed responses and client disconnects pass through them
untouched: a cancelled stream must still reach the route's generator, whose cancellation aborts the engine
request. Both answer in OpenAI's error shape, like every other error of the server.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from http import HTTPStatus

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.online.api.errors import ApiError


class BodyLimit:
    """Refuse a request body over `max_bytes` with a 413 before any of it is parsed.

    A declared Content-Length over the limit is refused without reading; a chunked body is read up to the limit
    and refused as soon as it passes it. An accepted body is replayed to the app, after which the client's own
    `receive` takes over again (so a disconnect during a stream is still seen).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = ApiError(
            f"request body exceeds the server's limit of {self.max_bytes} bytes",
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            code="body_too_large",
        )
        await error.response()(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands out `body` once, then defers to the client's own `receive`."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class ApiKey:
    """Require `Authorization: Bearer <key>` on every path except `open_paths` (and CORS preflights, which
    browsers send without credentials; CORS middleware, outside this one, answers them).

    The key is compared with `hmac.compare_digest` (constant time) on bytes, so its length and content cannot be
    probed by timing, and it is never logged or echoed.
    """

    def __init__(self, app: ASGIApp, key: str, open_paths: Iterable[str]) -> None:
        self.app = app
        self._expected = f"Bearer {key}".encode()
        self._open = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._open or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self._expected):
            await self.app(scope, receive, send)
            return
        error = ApiError(
            "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
            HTTPStatus.UNAUTHORIZED,
            code="invalid_api_key",
        )
        response = error.response()
        response.headers["www-authenticate"] = "Bearer"
        await response(scope, receive, send)
