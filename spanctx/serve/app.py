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
import itertools
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence

import attrs
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from .jobs import Delta, Done, TokenInfo, prompt_usage
from .local import Backend, raise_for
from .metrics import Metrics
from .protocol import (
    ApiError,
    GenRequest,
    chat_request,
    completion_request,
    context_from_json,
    span_request,
)

__all__ = ["UVICORN_OPTIONS", "create_app", "serving"]

# uvicorn's settings for this app (``spanctx serve`` and ``serving``): no access log (a line
# per request on the event loop); uvloop and httptools when installed (uvicorn's "auto").
UVICORN_OPTIONS = {"log_level": "warning", "access_log": False}


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

    def route(path: str, method: str):
        """Register a plain Starlette route: the handlers parse their own bodies, so FastAPI's
        per-request dependency solving (~0.1 ms of CPU per request) is skipped."""
        def register(handler):
            app.router.add_route(path, handler, methods=[method])
            return handler
        return register

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

    def generation(endpoint: str, parse: Callable[[Mapping], GenRequest], shape: type[_Shape]):
        async def handler(request: Request) -> Response:
            req = parse(await body_of(request))
            events = _Timed(backend.generate(req))
            first = await events.first()  # ApiError (refused) raises here, before any byte is sent
            if isinstance(first[1], Done) and first[1].error is not None:
                await events.aclose()
                raise_for(first[1])  # failed before its first token: an error status, not a stream
            if req.stream:
                return StreamingResponse(_sse(endpoint, req, first, events, shape, metrics, model_name),
                                         media_type="text/event-stream")
            choices = await _collect(request, req.n, first, events)
            for choice in choices:
                raise_for(choice.done)
            metrics.observe(endpoint, [c.done for c in choices], events.elapsed())
            return JSONResponse(shape.whole(_rid(endpoint), model_name, choices, req))

        route(endpoint, "POST")(handler)

    generation("/v1/chat/completions", chat_request, _Chat)
    generation("/v1/completions", completion_request, _Completion)
    generation("/v1/spanctx/generate", span_request, _Span)

    @route("/v1/spanctx/check", "POST")
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

    @route("/v1/models", "GET")
    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                                          "owned_by": "spanctx"}]})

    @route("/health", "GET")
    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"model": model_name, **await backend.health()})

    @route("/metrics", "GET")
    async def scrape(request: Request) -> Response:
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


@attrs.define
class _Choice:
    """One choice's reply so far: its text, its tokens' log-probabilities, its ``Done``."""

    text: list[str] = attrs.field(factory=list)
    logprobs: list[TokenInfo] = attrs.field(factory=list)
    done: Done | None = None
    offset: int = 0  # characters of its tokens' text so far (completions' text_offset)

    def add(self, event: Delta | Done) -> None:
        if isinstance(event, Done):
            self.done = event
        else:
            self.text.append(event)
            self.logprobs.extend(event.logprobs)


async def _collect(request: Request, n: int, first, events: _Timed) -> list[_Choice]:
    """All of a non-streamed reply's choices; a client that disconnects meanwhile cancels them."""
    async def gather() -> list[_Choice]:
        choices, (i, event) = [_Choice() for _ in range(n)], first
        while True:
            choices[i].add(event)
            if all(c.done is not None for c in choices):
                return choices
            i, event = await events.__anext__()

    task = asyncio.ensure_future(gather())
    while not task.done():
        await asyncio.wait([task], timeout=0.25)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            await events.aclose()
            raise ApiError(499, "client disconnected", code="cancelled")
    return task.result()


async def _sse(endpoint: str, req: GenRequest, first, events: _Timed, shape: type[_Shape], metrics: Metrics,
               model: str) -> AsyncIterator[str]:
    """The SSE body: each choice's chunks as its events come, one write per text event (a
    choice's finish chunk goes out with the next write), then usage and ``[DONE]``."""
    rid = _rid(endpoint)
    choices = [_Choice() for _ in range(req.n)]
    out = [_data(chunk) for chunk in shape.opening(rid, model, req.n)]
    i, event = first
    try:
        while True:
            choice = choices[i]
            if isinstance(event, Done):
                choice.add(event)
                try:
                    raise_for(event)
                except ApiError as exc:  # the others are cancelled as the stream closes
                    metrics.observe(endpoint, [event], events.elapsed())
                    yield "".join(out) + _data(exc.body()) + "data: [DONE]\n\n"
                    return
                out.append(_data(shape.chunk(rid, model, i, None, finish=event.finish_reason)))
                if all(c.done is not None for c in choices):
                    break
            else:
                logprobs = shape.logprobs(event.logprobs, choice.offset) if req.logprobs is not None else None
                choice.offset += sum(len(t.token) for t in event.logprobs)
                out.append(_data(shape.chunk(rid, model, i, event, logprobs=logprobs)))
                yield "".join(out)
                out.clear()
            i, event = await events.__anext__()
        dones = [c.done for c in choices]
        metrics.observe(endpoint, dones, events.elapsed())
        if req.include_usage:
            out.append(_data({**shape.chunk(rid, model, 0, None), "choices": [], "usage": _usage(dones)}))
        yield "".join(out) + "data: [DONE]\n\n"
    finally:
        await events.aclose()  # a disconnected client lands here: its jobs are cancelled


def _data(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _rid(endpoint: str) -> str:
    return {"/v1/chat/completions": "chatcmpl-", "/v1/completions": "cmpl-"}.get(endpoint, "span-") + uuid.uuid4().hex


def _usage(dones: list[Done]) -> dict:
    (prompt, cached), completion = prompt_usage(dones), sum(d.completion_tokens for d in dones)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


class _Shape:
    """How an endpoint writes replies: ``whole`` (a non-streamed reply), ``opening`` (the
    chunks a stream starts with), ``chunk`` (one choice's text or finish), ``logprobs``
    (tokens' log-probabilities in the endpoint's format; ``offset``: the characters before them)."""

    @staticmethod
    def logprobs(infos: Sequence[TokenInfo], offset: int) -> dict:
        """The completions format: tokens, their log-probabilities, the top alternatives
        (the token itself among them) and each token's character offset in the text."""
        offsets = list(itertools.accumulate((len(t.token) for t in infos[:-1]), initial=offset)) if infos else []
        return {"tokens": [t.token for t in infos], "token_logprobs": [t.logprob for t in infos],
                "top_logprobs": [{**dict(t.top), t.token: t.logprob} for t in infos], "text_offset": offsets}

    @staticmethod
    def opening(rid: str, model: str, n: int) -> list[dict]:
        return []


class _Chat(_Shape):
    @staticmethod
    def whole(rid: str, model: str, choices: list[_Choice], req: GenRequest) -> dict:
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": "".join(c.text)},
                             "finish_reason": c.done.finish_reason,
                             "logprobs": None if req.logprobs is None else _Chat.logprobs(c.logprobs, 0)}
                            for i, c in enumerate(choices)], "usage": _usage([c.done for c in choices])}

    @staticmethod
    def opening(rid: str, model: str, n: int) -> list[dict]:
        return [_Chat.chunk(rid, model, i, None, role=True) for i in range(n)]

    @staticmethod
    def chunk(rid: str, model: str, index: int, text: str | None, *, role: bool = False, finish: str | None = None,
              logprobs: dict | None = None) -> dict:
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]}

    @staticmethod
    def logprobs(infos: Sequence[TokenInfo], offset: int) -> dict:
        """The chat format: per token its text, log-probability, UTF-8 bytes and top alternatives."""
        def entry(token: str, logprob: float) -> dict:
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

        return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(*alt) for alt in t.top]}
                            for t in infos], "refusal": None}


class _Completion(_Shape):
    @staticmethod
    def whole(rid: str, model: str, choices: list[_Choice], req: GenRequest) -> dict:
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
                "choices": [{"index": i, "text": "".join(c.text), "finish_reason": c.done.finish_reason,
                             "logprobs": None if req.logprobs is None else _Completion.logprobs(c.logprobs, 0)}
                            for i, c in enumerate(choices)], "usage": _usage([c.done for c in choices])}

    @staticmethod
    def chunk(rid: str, model: str, index: int, text: str | None, *, role: bool = False, finish: str | None = None,
              logprobs: dict | None = None) -> dict:
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
                "choices": [{"index": index, "text": text or "", "finish_reason": finish, "logprobs": logprobs}]}


class _Span(_Completion):
    @staticmethod
    def whole(rid: str, model: str, choices: list[_Choice], req: GenRequest) -> dict:
        (choice,) = choices
        return {"id": rid, "object": "spanctx.generation", "model": model, "text": "".join(choice.text),
                "finish_reason": choice.done.finish_reason, "usage": _usage([choice.done]),
                "logprobs": None if req.logprobs is None else _Span.logprobs(choice.logprobs, 0),
                **(choice.done.value or {})}


@contextlib.contextmanager
def serving(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` with uvicorn in a thread (``port=0``: a free one); yields its base URL
    and stops the server on exit. For tests, benchmarks and notebooks."""
    import uvicorn

    if port == 0:
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, **UVICORN_OPTIONS))
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
