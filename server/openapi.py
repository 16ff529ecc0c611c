"""The OpenAPI schema as the app behaves: each route's error statuses with the one error body,
event streams and /metrics' text, and no 422 (validation errors are 400s here)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from server.protocol import ErrorResponse

WHY = {
    400: "Invalid request (validation, malformed JSON, a prompt longer than the context)",
    401: "Missing or invalid API key",
    403: "The API key may not use this model",
    404: "No such model",
    408: "The request body stalled",
    413: "The request body is larger than max_body_bytes",
    429: "A rate limit or budget of the API key",
    431: "Too many or too large header fields",
    500: "Generation failed in the engine",
    502: "An upstream server failed",
    503: "Loading, overloaded, or recovering (Retry-After)",
    504: "Past the request's deadline",
}
TRANSPORT = (408, 413, 431)  # any request with a body (server/limits.py)
KEYED = (401,)  # with a keys file
GENERATING = (400, 401, 403, 404, *TRANSPORT, 429, 500, 502, 503, 504)  # chat and completions


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: each status with its description and the error body."""
    return {code: {"model": ErrorResponse, "description": WHY[code]} for code in codes}


def streaming(body: type, chunk: type) -> dict[int | str, dict[str, Any]]:
    """A 200 that is ``body`` as JSON, or server-sent events when ``stream`` is true: each event's
    data one ``chunk`` as JSON (or an error body), then ``[DONE]``."""
    event = {
        "type": "object",
        "properties": {
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": {"$ref": f"#/components/schemas/{chunk.__name__}"},
            }
        },
        "required": ["data"],
        "description": f"data: a {chunk.__name__} (or an error body), then [DONE]",
    }
    CHUNKS[chunk.__name__] = chunk
    content = {"text/event-stream": {"schema": event}}
    return {200: {"model": body, "description": "The response, or its events when stream is true", "content": content}}


def probe(model: type, unready: str) -> dict[int | str, dict[str, Any]]:
    """/health and /ready: the same body with 200 or 503."""
    return {200: {"model": model, "description": "OK"}, 503: {"model": model, "description": unready}}


CHUNKS: dict[str, type[BaseModel]] = {}  # stream events' models by name, added to the schema's components


TEXT: dict[int | str, dict[str, Any]] = {
    200: {"description": "Prometheus text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}}
}


def install_openapi(app: FastAPI) -> None:
    """FastAPI's schema without the 422 it documents for every body (those are 400s here)."""

    def schema() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path in spec.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            components = spec.get("components", {}).get("schemas", {})
            components.pop("HTTPValidationError", None)
            components.pop("ValidationError", None)
            models = [(m, "serialization") for m in CHUNKS.values()]
            _, defs = models_json_schema(models, ref_template="#/components/schemas/{model}")  # type: ignore[arg-type]
            for name, definition in defs.get("$defs", {}).items():
                components.setdefault(name, definition)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = schema  # type: ignore[method-assign]
