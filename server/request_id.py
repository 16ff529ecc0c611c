"""``x-request-id`` on every response, and in the log lines written while serving its request.

A client's own id is echoed when it is sane (1 to 128 visible ASCII characters), else one is
made. The id lives in a context variable for the request's task (and the tasks it starts), which
``RequestIdFilter`` copies onto each log record as ``request_id`` ("-" outside a request).
"""

from __future__ import annotations

import copy
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

HEADER = "x-request-id"
_SANE = re.compile(r"[\x21-\x7e]{1,128}")
REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="-")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def request_id(sent: str | None) -> str:
    """The client's id if it is sane, else a new one."""
    if sent is not None and _SANE.fullmatch(sent):
        return sent
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Plain ASGI: sets the id (on ``scope["state"]`` too, for the 500 handler outside this
    middleware) and adds the header to the response's start."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = next((v for k, v in scope.get("headers", ()) if k == HEADER.encode()), None)
        rid = request_id(sent.decode("latin-1") if sent is not None else None)
        scope.setdefault("state", {})["request_id"] = rid

        async def with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != HEADER.encode()]
                message = {**message, "headers": [*headers, (HEADER.encode(), rid.encode())]}
            await send(message)

        token = REQUEST_ID.set(rid)
        try:
            await self.app(scope, receive, with_id)
        finally:
            REQUEST_ID.reset(token)


class RequestIdFilter(logging.Filter):
    """Stamps each record with the request id of the task that logs it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


def configure_logging(level: str) -> None:
    """turnout's log lines carry the request id (``turnout serve``)."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's logging, its access lines (one per request) ending with the request id."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["request_id"] = {"()": RequestIdFilter}
    config["handlers"]["access"]["filters"] = ["request_id"]
    access = config["formatters"]["access"]
    access["fmt"] = access["fmt"] + " [%(request_id)s]"
    return config
