"""The FastAPI app: ``create_app(settings)``; experts load in the background, ``/ready`` says when."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from router.coe.embedder import MAX_TOKENS, SentenceEmbedder
from server.admission import AdmissionQueue, QueueBounds
from server.cards import model_cards
from server.config import AUTO, ExpertConfig, Settings
from server.embeddings import EMBEDDING_MODEL, EmbeddingRequest, EmbeddingService
from server.error_handlers import install_error_handlers
from server.errors import APIError, still_loading
from server.experts import build_experts
from server.keys import KeyPolicy, KeyRing
from server.limits import RequestLimits
from server.metrics import Metrics
from server.openapi import GENERATING, TEXT, TRANSPORT, errors, install_openapi, probe, streaming
from server.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChunk,
    CompletionRequest,
    Health,
    ModelCard,
    ModelList,
    Ready,
)
from server.request_id import RequestIdMiddleware
from server.routing import RequestRouter, RouteDecision, build_router, route_headers
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
            lambda: self.serving.queues,
            lambda: self.keys.spend_now(),
        )
        self.serving = OpenAIServing(self.experts, self.metrics)
        self.load_error: str | None = None
        self.keys = KeyRing(None)  # create_app reads server.api_keys_file
        self.router: RequestRouter | None = None
        self.embeddings: EmbeddingService | None = None  # /v1/embeddings, once its model is loaded
        self.router_expected = False
        self.embeddings_expected = False

    def healthy(self, name: str) -> bool:
        expert = self.experts.get(name)
        return expert is not None and expert.engine.ready() and expert.engine.healthy()

    async def route(self, messages: list[dict[str, str]]) -> RouteDecision:
        if self.router is None:
            raise still_loading(f"The router behind '{AUTO}'")
        decision = await self.router.route(messages, self.healthy)
        self.metrics.route_decisions.labels(decision.category, decision.expert, decision.reason).inc()
        self.metrics.route_latency.observe(decision.latency_s)
        return decision


async def _stop(expert: Expert) -> None:
    """One expert's engine stops; a failure there does not keep the others running."""
    try:
        await expert.engine.stop()
    except Exception:
        log.exception("stopping %s failed", expert.name)


def _embedding_service(settings: Settings, router: RequestRouter | None) -> EmbeddingService | None:
    """/v1/embeddings: the router's embedder (and its lock) when there is one, else its own."""
    wanted = settings.server.embeddings
    if wanted is False or (router is None and not wanted):
        return None
    if router is not None:
        return EmbeddingService(router.router.embedder, router.lock)
    return EmbeddingService(SentenceEmbedder())


def _bounds(expert: ExpertConfig) -> QueueBounds:
    return QueueBounds(expert.max_batch_size, expert.max_waiting_requests, expert.max_waiting_tokens)


def create_app(
    settings: Settings,
    expert_factory: ExpertFactory = build_experts,
    on_load_error: Callable[[str], None] | None = None,
) -> FastAPI:
    """The app; experts load in its lifespan. ``on_load_error`` hears a configuration that failed
    to load (``turnout serve`` exits on it; without it the app stays up, answering 503)."""
    state = AppState()
    state.keys = KeyRing(settings.server.api_keys_file, state.metrics)  # a bad file fails here

    state.router_expected = settings.router.coe is not None
    wanted = settings.server.embeddings
    state.embeddings_expected = bool(wanted) or (wanted is None and state.router_expected)
    state.serving.router_name = AUTO if state.router_expected else None
    state.serving.configured = {e.name: e.max_model_len for e in settings.experts}
    state.serving.queues = {e.name: AdmissionQueue(e.name, _bounds(e)) for e in settings.experts}
    default_timeout = settings.server.request_timeout_s
    state.serving.timeouts = {e.name: e.request_timeout_s or default_timeout for e in settings.experts}

    async def load() -> None:
        started: list[Expert] = []
        try:
            experts = await asyncio.to_thread(expert_factory, settings)
            for expert in experts.values():
                await expert.engine.start()
                started.append(expert)
            state.experts.update(experts)
            router = await asyncio.to_thread(build_router, settings)  # loads and warms the embedder
            if router is not None:
                state.router, state.serving.fallback = RequestRouter(router), router.config.fallback
            state.embeddings = await asyncio.to_thread(_embedding_service, settings, state.router)
            log.info("ready: %s%s", ", ".join(experts), f", {AUTO}" if router else "")
        except BaseException as exc:  # a failure, or shutdown while loading
            if isinstance(exc, Exception):
                log.exception("loading experts failed")
                state.load_error = f"{type(exc).__name__}: {exc}"
                if on_load_error is not None:
                    on_load_error(state.load_error)
            for expert in started:  # e.g. a vLLM child started before another expert failed
                if expert.name not in state.experts:
                    await _stop(expert)
            if not isinstance(exc, Exception):
                raise

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(load())
        state.keys.attach()  # SIGHUP reloads the keys file
        yield
        loader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loader  # stops what it had started
        for expert in state.experts.values():
            await _stop(expert)
        state.keys.detach()  # the spend file written

    app = FastAPI(title="turnout", lifespan=lifespan)
    app.state.turnout = state
    install_error_handlers(app)
    install_openapi(app)

    app.add_middleware(RequestLimits, limits=settings.server)  # inside the counter: its 413/431/408 are counted
    app.add_middleware(_ErrorCounter, state=state)
    app.add_middleware(RequestIdMiddleware)  # outermost: every response the app sends has its id
    _add_routes(app, state)
    return app


class _ErrorCounter:
    """Counts /v1/ responses of status 400 and up by model. Plain ASGI: it watches the response's
    first message and passes every message on as it comes (an @app.middleware("http") wrapper
    relays a stream's every chunk through a memory stream and a task switch of its own)."""

    def __init__(self, app: Callable[..., Awaitable[None]], state: AppState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return

        async def counted(message: dict[str, Any]) -> None:
            # every response to a known key, by its name (set by _authorize) and status
            if message["type"] == "http.response.start" and (key := scope.get("state", {}).get("key_name")):
                self.state.metrics.key_requests.labels(key, str(message["status"])).inc()
            if message["type"] == "http.response.start" and message["status"] >= 400:
                model = scope.get("state", {}).get("model")  # None: the body did not parse
                if model not in self.state.experts and model != AUTO:  # no label per name a client makes up
                    model = "unknown"
                self.state.metrics.request_errors.labels(model, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


def _authorize(request: Request) -> KeyPolicy | None:
    """The caller's key policy (None: no keys configured); 401 for a missing or unknown key."""
    state: AppState = request.app.state.turnout
    policy = state.keys.authorize(request.headers.get("authorization", ""))
    if policy is not None:
        request.state.key_name = policy.name  # the per-key request counter's label
    return policy


Caller = Annotated[KeyPolicy | None, Depends(_authorize)]


def _add_routes(app: FastAPI, state: AppState) -> None:
    @app.get("/health", responses=probe(Health, "This process cannot serve (restart it)"), response_model=Health)
    async def health() -> JSONResponse:
        # 503 only when this process cannot serve (a load error, an engine of its own that died):
        # liveness probes restart on it. A remote expert's upstream being down is another
        # process's trouble; it is reported ("degraded") and routed around, not restarted for.
        sick = [n for n, e in state.experts.items() if not e.engine.healthy()]
        own = [n for n in sick if state.experts[n].engine.info.engine != "remote"]
        ok = state.load_error is None and not own
        status = "unhealthy" if not ok else "degraded" if sick else "ok"
        body = {"status": status, "error": state.load_error, "unhealthy_experts": sick}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/ready", responses=probe(Ready, "Still loading or unhealthy"), response_model=Ready)
    async def ready() -> JSONResponse:
        ok = bool(state.experts) and all(e.engine.ready() for e in state.experts.values())
        ok = ok and (state.router is not None or not state.router_expected)
        ok = ok and (state.embeddings is not None or not state.embeddings_expected)
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/metrics", responses=TEXT, response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses=errors(401, 431))
    async def models(policy: Caller) -> ModelList:
        return ModelList(data=[c for c in _cards(state) if policy is None or policy.allows(c.id)])

    @app.get("/v1/models/{model_id:path}", responses=errors(401, 404, 431))
    async def model(model_id: str, policy: Caller) -> ModelCard:
        for card in _cards(state):
            if card.id == model_id and (policy is None or policy.allows(card.id)):
                return card
        raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")

    @app.post("/v1/embeddings", responses=errors(400, 401, 403, 404, *TRANSPORT, 500, 503))
    async def embeddings(body: EmbeddingRequest, request: Request, policy: Caller) -> Any:
        request.state.model = body.model
        if policy is not None:
            policy.check_model(body.model)
        if state.embeddings is None or body.model != EMBEDDING_MODEL:
            if body.model == EMBEDDING_MODEL and state.embeddings_expected and state.load_error is None:
                raise still_loading(f"The model '{EMBEDDING_MODEL}'")
            served = EMBEDDING_MODEL if state.embeddings_expected else "none"
            message = f"The embedding model '{body.model}' does not exist. Available: {served}"
            raise APIError(404, message, param="model", code="model_not_found")
        return await state.embeddings.create(body)

    @app.post(
        "/v1/chat/completions", responses={**streaming(ChatCompletion, ChatCompletionChunk), **errors(*GENERATING)}
    )
    async def chat(body: ChatCompletionRequest, request: Request, policy: Caller) -> Any:
        request.state.model, route = body.model, None
        if policy is not None:
            policy.check_model(body.model)  # 403 before routing or generating anything
        if body.model == AUTO:
            route = await state.route([{"role": m.role, "content": m.text()} for m in body.messages])
        job = _admitted(state, policy, state.serving.prepare_chat(body, route), request)
        return await _respond(request, job, body.stream, state.serving)

    @app.post("/v1/completions", responses={**streaming(Completion, CompletionChunk), **errors(*GENERATING)})
    async def completions(body: CompletionRequest, request: Request, policy: Caller) -> Any:
        request.state.model, route = body.model, None
        if policy is not None:
            policy.check_model(body.model)
        if body.model == AUTO:
            route = await state.route([{"role": "user", "content": _routable_prompt(body)}])
        job = _admitted(state, policy, state.serving.prepare_completion(body, route), request)
        return await _respond(request, job, body.stream, state.serving)


def _admitted(state: AppState, policy: KeyPolicy | None, job: Job, request: Request) -> Job:
    """The key's limits (429), then the expert's queue (503) and the deadline, checked once the
    prompt's tokens are known and before any byte is sent; the job gives the key's in-flight slot
    and its queue place back, charged, when it ends (``job.finish``)."""
    if policy is not None:
        job.on_done.append(state.keys.admit(policy, job.prompt_tokens()).done)
    try:
        state.serving.admit(job, _requested_timeout(request))
    except APIError:
        job.finish()  # nothing ran: the key's slot back, nothing charged
        raise
    return job


TIMEOUT_HEADER = "x-request-timeout"


def _requested_timeout(request: Request) -> float | None:
    """A client's own deadline in seconds (``X-Request-Timeout``); the server's caps it."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise APIError(400, f"{TIMEOUT_HEADER} must be a positive number of seconds, got {raw!r}", param=TIMEOUT_HEADER)
    return seconds


def _routable_prompt(body: CompletionRequest) -> str:
    prompts = body.prompts()
    if not all(isinstance(p, str) for p in prompts):
        message = f"model '{AUTO}' routes on text: send the prompt as a string, not token ids"
        raise APIError(400, message, param="prompt")
    return "\n\n".join(str(p) for p in prompts)


def _cards(state: AppState) -> list[ModelCard]:
    serving = state.serving
    cards = model_cards(state.experts, serving.configured, state.router, state.router_expected)
    if state.embeddings is not None:
        card = {"ready": True, "embedding": True}
        cards.append(ModelCard(id=EMBEDDING_MODEL, max_model_len=MAX_TOKENS, turnout=card))
    return cards


async def _respond(request: Request, job: Job, stream: bool, serving: OpenAIServing) -> Any:
    if stream:  # headers go out before the first token, so they name the expert first chosen
        headers = route_headers(job.route, job.expert.name) if job.route is not None else {}
        return _JobStream(
            job,
            serving.stream(job),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
        )
    try:
        body = await _unless_disconnected(request, serving.complete(job))
    finally:
        job.finish()  # if complete() never ran (a client gone at once), still once
    return JSONResponse(body, headers=route_headers(job.route, job.expert.name)) if job.route is not None else body


class _JobStream(StreamingResponse):
    """A job's event stream that ends the job however the response ends: the stream's own end,
    the client gone (the stream is closed, so it reports what it produced), or gone before the
    first event (the job ends with nothing charged, its key's in-flight slot given back)."""

    def __init__(self, job: Job, events: AsyncGenerator[str, None], **kwargs: Any) -> None:
        super().__init__(events, **kwargs)
        self.job, self.events = job, events

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.events.aclose()
            self.job.finish()


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
