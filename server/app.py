"""The FastAPI app: ``create_app(settings)``; experts load in the background, ``/ready`` says when."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.config import Settings
from server.errors import APIError, install_error_handlers
from server.experts import build_experts
from server.metrics import Metrics
from server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from server.serving import Expert, Job, OpenAIServing

log = logging.getLogger(__name__)
T = TypeVar("T")
ExpertFactory = Callable[[Settings], dict[str, Expert]]


class AppState:
    def __init__(self) -> None:
        self.experts: dict[str, Expert] = {}
        self.metrics = Metrics(
            lambda: {n: e.engine.stats() for n, e in self.experts.items()},
            lambda: {n: e.engine.info for n, e in self.experts.items()},
        )
        self.serving = OpenAIServing(self.experts, self.metrics)
        self.load_error: str | None = None
        self.api_keys: frozenset[str] = frozenset()


def _read_keys(path: Path | None) -> frozenset[str]:
    if path is None:
        return frozenset()
    return frozenset(line.strip() for line in path.read_text().splitlines() if line.strip())


def create_app(settings: Settings, expert_factory: ExpertFactory = build_experts) -> FastAPI:
    state = AppState()
    state.api_keys = _read_keys(settings.server.api_keys_file)

    async def load() -> None:
        try:
            experts = await asyncio.to_thread(expert_factory, settings)
            for expert in experts.values():
                await expert.engine.start()
            state.experts.update(experts)
            log.info("ready: %s", ", ".join(experts))
        except Exception as exc:
            log.exception("loading experts failed")
            state.load_error = f"{type(exc).__name__}: {exc}"

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(load())
        yield
        loader.cancel()
        for expert in state.experts.values():
            await expert.engine.stop()

    app = FastAPI(title="turnout", lifespan=lifespan)
    app.state.turnout = state
    install_error_handlers(app)
    _add_routes(app, state)
    return app


def _add_routes(app: FastAPI, state: AppState) -> None:
    def authorize(request: Request) -> None:
        if not state.api_keys:
            return
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer ") or header.removeprefix("Bearer ").strip() not in state.api_keys:
            raise APIError(401, "Invalid or missing API key", type="authentication_error", code="invalid_api_key")

    auth = [Depends(authorize)]

    @app.get("/health")
    async def health() -> JSONResponse:
        sick = [n for n, e in state.experts.items() if not e.engine.healthy()]
        ok = state.load_error is None and not sick
        body = {"status": "ok" if ok else "unhealthy", "error": state.load_error, "unhealthy_experts": sick}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/ready")
    async def ready() -> JSONResponse:
        ok = bool(state.experts) and all(e.engine.ready() for e in state.experts.values())
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> ModelList:
        cards = [
            ModelCard(
                id=n,
                max_model_len=e.engine.info.max_model_len,
                turnout={"dtype": e.engine.info.dtype, **e.engine.info.features},
            )
            for n, e in state.experts.items()
        ]
        return ModelList(data=cards)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(body: ChatCompletionRequest, request: Request) -> Any:
        return await _respond(request, state.serving.prepare_chat(body), body.stream, state.serving)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await _respond(request, state.serving.prepare_completion(body), body.stream, state.serving)


async def _respond(request: Request, job: Job, stream: bool, serving: OpenAIServing) -> Any:
    if stream:
        return StreamingResponse(
            serving.stream(job),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await _unless_disconnected(request, serving.complete(job))


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run ``work``; if the client goes away first, cancel it so its engine slots are freed."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while not task.done():
            message = await request.receive()
            if message["type"] == "http.disconnect":
                task.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    finally:
        watcher.cancel()
