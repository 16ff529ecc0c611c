"""uvicorn as turnout runs it: h11 with a header-read timeout, 431 for an oversized head, and the
connection settings of ``ServerConfig`` (``uvicorn_options``, used by `turnout serve` and the tests)."""

from __future__ import annotations

import asyncio
import http
import json
from typing import Any

import h11
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE  # as uvicorn imports it
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.config import ServerConfig
from server.limits import refusal

GRACEFUL_SHUTDOWN_S = 30  # on SIGTERM, in-flight streams get this long to finish


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the bounds it lacks on a request's head (request line and
    headers). uvicorn arms no timer on a new connection, and any byte disarms its keep-alive timer,
    so a client sending a head a byte at a time holds its connection forever; here the head must be
    complete within ``header_timeout_s`` of the connection opening or, on a kept-alive connection,
    of the head's first byte (408 and closed; an idle new connection is closed without a word).
    And a head still incomplete past h11's buffer limit (``h11_max_incomplete_event_size``) gets
    431, where uvicorn answers 400."""

    header_timeout_s = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0  # bytes received of the head not yet complete
        limit = self.config.h11_max_incomplete_event_size
        self._head_limit = DEFAULT_MAX_INCOMPLETE_EVENT_SIZE if limit is None else limit
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def data_received(self, data: bytes) -> None:
        if self._awaiting_head():
            self._head_bytes += len(data)
            if self._head_timer is None:  # the first byte of a kept-alive connection's next request
                self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)
        super().data_received(data)
        if not self._awaiting_head():
            self._head_done()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_done()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        if self._head_bytes > self._head_limit:  # h11's "Receive buffer too long" on an incomplete head
            message = f"Request line and headers exceed {self._head_limit} bytes"
            self._refuse(431, message, "request_header_fields_too_large")
        else:
            super().send_400_response(msg)

    def _awaiting_head(self) -> bool:
        return self.conn.their_state is h11.IDLE  # no complete request yet in this cycle

    def _head_done(self) -> None:
        self._head_bytes = 0
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._awaiting_head():
            return
        if self._head_bytes:  # a request was begun: say why it ends
            self.logger.warning("Request head not complete within %g s; closing the connection.", self.header_timeout_s)
            self._refuse(408, f"Request headers not complete within {self.header_timeout_s:g} s", "request_timeout")
        else:
            self.conn.send(h11.ConnectionClosed())
            self.transport.close()

    def _refuse(self, status: int, message: str, code: str) -> None:
        """An OpenAI-shaped error written straight through h11 (the app never saw this request), then close."""
        body = json.dumps(refusal(status, message, code).body()).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        response = h11.Response(status_code=status, headers=headers, reason=http.HTTPStatus(status).phrase)
        for event in (response, h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event) or b"")
        self.transport.close()


def limited_h11(header_timeout_s: float) -> type[LimitedH11Protocol]:
    """The protocol class uvicorn instantiates per connection, with this header timeout."""
    return type("LimitedH11Protocol", (LimitedH11Protocol,), {"header_timeout_s": header_timeout_s})


def uvicorn_options(server: ServerConfig) -> dict[str, Any]:
    """``uvicorn.Config`` keyword arguments for ``server``: what `turnout serve` runs, and the tests."""
    return {
        "host": server.host,
        "port": server.port,
        "http": limited_h11(server.header_timeout_s),  # h11 always (httptools is not used even if installed)
        "h11_max_incomplete_event_size": server.max_header_bytes,
        "timeout_keep_alive": server.keep_alive_timeout_s,
        "limit_concurrency": server.limit_concurrency,
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
    }
