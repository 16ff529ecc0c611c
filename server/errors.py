"""One error shape everywhere: ``{"error": {"message", "type", "param", "code"}}``. No web
framework here: the serving layer raises these, ``server.error_handlers`` turns them into responses."""

from __future__ import annotations

from typing import Any

from server.protocol import ErrorDetail, ErrorResponse


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        detail = ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=detail).model_dump()


LOADING_RETRY_S = 5  # Retry-After of a 503 for a model (or the router) still loading


def retry_later(message: str, code: str, seconds: int, type: str = "server_error") -> APIError:
    """A 503 a client should retry after ``seconds`` (the official SDKs honour Retry-After)."""
    return APIError(503, message, type=type, code=code, headers={"Retry-After": str(seconds)})


def still_loading(what: str) -> APIError:
    """A configured model, or the router, that is not loaded yet: 503 with Retry-After (a client
    retries; a 404 would tell it the model does not exist)."""
    return retry_later(f"{what} is still loading; retry shortly.", "model_not_ready", LOADING_RETRY_S)


def unavailable(what: str) -> APIError:
    """An expert whose engine failed and is recovering: 503, retry."""
    message = f"{what} is unavailable: its engine failed and is recovering; retry shortly."
    return retry_later(message, "model_unavailable", LOADING_RETRY_S)
