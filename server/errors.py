"""One error shape everywhere: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.protocol import ErrorDetail, ErrorResponse

log = logging.getLogger(__name__)


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

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


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


def _param(loc: Sequence[Any]) -> str | None:
    """``("body", "messages", 0, "content")`` -> ``"messages[0].content"``."""
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif isinstance(p, str) and not p.startswith(("function-", "list[", "str", "int")):
            out += f".{p}" if out else p
    return out or None


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        return APIError(400, f"Malformed JSON body: {first.get('msg')}", code="invalid_json")
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        return APIError(400, "Request body is required and must be a JSON object", code="invalid_json")
    ctx = first.get("ctx")  # a refused field (server.fields) names itself
    ctx = ctx if isinstance(ctx, dict) else {}
    param = ctx.get("param") or _param(first.get("loc", ()))
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    message = f"{param}: {msg}" if param else msg
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return APIError(400, message, param=param, code=ctx.get("code", "invalid_value"))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        # runs outside the request-id middleware (Starlette's outermost): the id is on the scope
        rid = request.scope.get("state", {}).get("request_id")
        log.exception("unhandled error in request %s", rid)
        headers = {"x-request-id": rid} if rid else None
        return APIError(500, f"internal error: {type(exc).__name__}", type="server_error", headers=headers).response()
