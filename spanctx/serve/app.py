"""The HTTP layer: an OpenAI-compatible FastAPI app over a ``Backend``.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (OpenAI bodies, SSE with
``stream: true`` ending in ``data: [DONE]``), ``POST /v1/spanctx/generate`` (a context as
JSON, see ``protocol``), ``POST /v1/spanctx/check`` (requirements, optional adapter),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text). Errors are
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status (5xx: the server's
fault). A client that disconnects cancels its request (``scheduler`` policy).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from .local import Backend, raise_for
from .metrics import Metrics
from .protocol import ApiError, GenRequest, chat_request, completion_request, context_from_json, span_request
from .scheduler import Done

__all__ = ["create_app", "serving"]


def create_app(backend: Backend, model_name: str) -> FastAPI:
    """The app serving ``backend`` under the model name ``model_name``."""
    app = FastAPI(title="spanctx", docs_url=None, redoc_url=None)
    metrics = Metrics(backend.gauges)
    app.state.backend, app.state.metrics = backend, metrics

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        metrics.requests.labels(request.url.path, f"http_{exc.status}").inc()
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(ApiError(400, str(exc)).body(), status_code=400)

    async def body_of(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != model_name:
            raise ApiError(404, f"model {model!r} is not served here; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        return body

    def generation(endpoint: str, parse: Callable[[Mapping], GenRequest], shape: Callable):
        async def handler(request: Request) -> Response:
            req = parse(await body_of(request))
            events = _Timed(backend.generate(req))
            first = await events.first()  # ApiError (refused) raises here, before any byte is sent
            if isinstance(first, Done):
                raise_for(first)  # failed before its first token: an error status, not a stream
            if req.stream:
                return StreamingResponse(_sse(endpoint, req, first, events, shape, metrics, model_name),
                                         media_type="text/event-stream")
            pieces, done = await _collect(request, first, events)
            raise_for(done)
            metrics.observe(endpoint, done, events.elapsed())
            return JSONResponse(shape.whole(_rid(endpoint), model_name, "".join(pieces), done))

        app.post(endpoint)(handler)

    generation("/v1/chat/completions", chat_request, _Chat)
    generation("/v1/completions", completion_request, _Completion)
    generation("/v1/spanctx/generate", span_request, _Span)

    @app.post("/v1/spanctx/check")
    async def check(request: Request) -> JSONResponse:
        body = await body_of(request)
        unknown = sorted(set(body) - {"model", "context", "requirements", "adapter"})
        if unknown:
            raise ApiError(400, f"unknown field(s) {unknown}", param=unknown[0], code="unknown_parameter")
        requirements = body.get("requirements")
        if not isinstance(requirements, list) or not requirements or not all(isinstance(r, str) for r in requirements):
            raise ApiError(400, "'requirements' must be a non-empty list of strings", param="requirements")
        verdicts = await backend.check(context_from_json(body.get("context")), requirements, body.get("adapter"))
        metrics.requests.labels("/v1/spanctx/check", "stop").inc()
        return JSONResponse({"object": "spanctx.check", "model": model_name, "verdicts": verdicts})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                                          "owned_by": "spanctx"}]})

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"model": model_name, **await backend.health()})

    @app.get("/metrics")
    async def scrape() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


class _Timed:
    """A backend's event stream and when the request arrived."""

    def __init__(self, events: AsyncIterator) -> None:
        self.events, self.started = events, time.perf_counter()

    async def first(self):
        return await self.__anext__()

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.events.__anext__()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    async def aclose(self) -> None:
        await self.events.aclose()


async def _collect(request: Request, first, events: _Timed) -> tuple[list[str], Done]:
    """All of a non-streamed reply; a client that disconnects meanwhile cancels it."""
    async def gather() -> tuple[list[str], Done]:
        pieces, event = [], first
        while not isinstance(event, Done):
            pieces.append(event)
            event = await events.__anext__()
        return pieces, event

    task = asyncio.ensure_future(gather())
    while not task.done():
        await asyncio.wait([task], timeout=0.25)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            await events.aclose()
            raise ApiError(499, "client disconnected", code="cancelled")
    return task.result()


async def _sse(endpoint: str, req: GenRequest, first, events: _Timed, shape, metrics: Metrics,
               model: str) -> AsyncIterator[str]:
    rid = _rid(endpoint)
    event = first
    try:
        yield _data(shape.chunk(rid, model, None, role=True))
        while not isinstance(event, Done):
            yield _data(shape.chunk(rid, model, event))
            event = await events.__anext__()
        metrics.observe(endpoint, event, events.elapsed())
        try:
            raise_for(event)
        except ApiError as exc:
            yield _data(exc.body())
        else:
            yield _data(shape.chunk(rid, model, None, finish=event.finish_reason))
            if req.include_usage:
                yield _data({**shape.chunk(rid, model, None), "choices": [], "usage": _usage(event)})
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()  # a disconnected client lands here: its job is cancelled


def _data(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _rid(endpoint: str) -> str:
    return {"/v1/chat/completions": "chatcmpl-", "/v1/completions": "cmpl-"}.get(endpoint, "span-") + uuid.uuid4().hex


def _usage(done: Done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}


class _Chat:
    @staticmethod
    def whole(rid: str, model: str, text: str, done: Done) -> dict:
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": done.finish_reason, "logprobs": None}], "usage": _usage(done)}

    @staticmethod
    def chunk(rid: str, model: str, text: str | None, *, role: bool = False, finish: str | None = None) -> dict:
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}


class _Completion:
    @staticmethod
    def whole(rid: str, model: str, text: str, done: Done) -> dict:
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": done.finish_reason, "logprobs": None}],
                "usage": _usage(done)}

    @staticmethod
    def chunk(rid: str, model: str, text: str | None, *, role: bool = False, finish: str | None = None) -> dict:
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]}


class _Span(_Completion):
    @staticmethod
    def whole(rid: str, model: str, text: str, done: Done) -> dict:
        return {"id": rid, "object": "spanctx.generation", "model": model, "text": text,
                "finish_reason": done.finish_reason, "usage": _usage(done), **(done.value or {})}


@contextlib.contextmanager
def serving(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` with uvicorn in a thread (``port=0``: a free one); yields its base URL
    and stops the server on exit. For tests, benchmarks and notebooks."""
    import uvicorn

    if port == 0:
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="spanctx-uvicorn", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
