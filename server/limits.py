"""Request limits at the ASGI edge: header fields (431), body size (413), a stalled body (408).

Plain ASGI, like ``_ErrorCounter``: it reads the body itself before the app runs, so an oversized
or stalled upload is refused without the app ever holding it, then hands the app the body as one
message followed by the server's own ``receive`` (so ``http.disconnect`` still reaches the app
while it works). Every refusal closes the connection: the rest of an upload is never read.
FastAPI's own ``max_body_size`` is not used: it answers a plain 413 and keeps the connection,
reading and discarding the rest of the upload.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from server.config import ServerConfig
from server.error_handlers import error_response
from server.errors import APIError

Message = MutableMapping[str, Any]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def refusal(status: int, message: str, code: str) -> APIError:
    """An OpenAI-shaped error that also ends the connection (``Connection: close``)."""
    return APIError(status, message, code=code, headers={"Connection": "close"})


def too_large(limit: int) -> APIError:
    return refusal(413, f"Request body is larger than {limit} bytes", "request_too_large")


class RequestLimits:
    def __init__(self, app: ASGIApp, limits: ServerConfig) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self._check_head(scope)
            body = await self._read_body(scope, receive)
        except APIError as error:
            await error_response(error)(scope, receive, send)
            return
        if body is not None:  # None: the client went away before its body was complete
            await self.app(scope, _replay(body, receive), send)

    def _check_head(self, scope: Scope) -> None:
        """A head that arrived whole in one read passes h11's buffer limit (it only bounds a head
        still incomplete), so its size and field count are checked here."""
        fields, limits = len(scope["headers"]), self.limits
        if fields > limits.max_headers:
            message = f"Request has {fields} header fields; at most {limits.max_headers} are accepted"
            raise refusal(431, message, "request_header_fields_too_large")
        if (size := _head_size(scope)) > limits.max_header_bytes:
            message = f"Request line and headers are {size} bytes; at most {limits.max_header_bytes} are accepted"
            raise refusal(431, message, "request_header_fields_too_large")

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        limit = self.limits.max_body_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:  # before a byte of it is read
            raise too_large(limit)
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                async with asyncio.timeout(self.limits.body_timeout_s):
                    message = await receive()
            except TimeoutError:
                timeout = self.limits.body_timeout_s
                raise refusal(408, f"No request body data for {timeout:g} s", "request_timeout") from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:  # a chunked body (no Content-Length), or one longer than it said
                raise too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body as one message, then the server's ``receive`` (which reports a disconnect)."""
    pending = True

    async def replayed() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None  # h11 refuses a malformed one first
    return None


def _head_size(scope: Scope) -> int:
    """Bytes of the request line and header fields as sent (less optional whitespace)."""
    query = scope.get("query_string", b"")
    target = len(scope.get("raw_path") or scope["path"].encode()) + (len(query) + 1 if query else 0)
    line = len(scope["method"]) + 1 + target + len(" HTTP/1.1\r\n")
    return line + sum(len(name) + len(value) + len(": \r\n") for name, value in scope["headers"]) + 2
