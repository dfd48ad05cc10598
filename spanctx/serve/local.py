"""What the HTTP layer talks to: a ``Backend`` turns a parsed request into an async stream of
``(choice, event)`` pairs (text ``Delta``s, then one ``Done`` per choice). ``LocalBackend`` runs them on this process's
scheduler; ``ray_app.RayBackend`` sends them to a Ray Serve replica. ``RuntimeSpec`` says
how a server (or each replica) builds its runtime.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Protocol

import attrs

from .jobs import Delta, Done, Job
from .protocol import ApiError, GenRequest
from .scheduler import Scheduler

if TYPE_CHECKING:
    from ..core.spans import Context
    from ..runtime import Runtime


@attrs.frozen
class RuntimeSpec:
    """How a server (or each Ray replica) builds its runtime. ``tiers``: tier URLs shared
    by the replicas (``Runtime(..., tiers=...)``); ``adapters``: ``(name, path)`` pairs."""

    model: str
    device: str | None = None
    dtype: str | None = None
    store_bytes: int | None = None
    tiers: tuple[str, ...] = ()
    adapters: tuple[tuple[str, str], ...] = ()

    def build(self):
        from ..loading import load_model
        from ..runtime import Runtime

        model, tokenizer = load_model(self.model, device=self.device, dtype=self.dtype)
        extra = {"tiers": list(self.tiers)} if self.tiers else {}
        try:
            rt = Runtime(model, tokenizer, self.store_bytes, **extra)
        except TypeError as exc:
            if self.tiers and "tiers" in str(exc):
                raise SystemExit("--tier needs a spanctx with tiered span sharing (Runtime(tiers=...))") from None
            raise
        for name, path in self.adapters:
            rt.add_adapter(name, path)
        return rt


class Backend(Protocol):
    def generate(self, request: GenRequest) -> AsyncIterator[tuple[int, Delta | Done]]:
        """``(i, event)`` for choice ``i`` of ``request.choices()``: its deltas, then one
        ``Done`` (choices interleave); raises ``ApiError`` before the first event when the
        request is refused (bad options, queue full). Closing it early cancels them all."""

    async def check(self, ctx: Context, requirements: Sequence[str], adapter: str | None) -> list[dict]: ...

    async def health(self) -> dict: ...

    def gauges(self) -> dict[str, float]: ...


class LocalBackend:
    """The model in this process, behind a ``Scheduler``."""

    def __init__(self, rt: Runtime, *, max_batch: int | None = None, max_queue: int = 64,
                 join_tokens: int | None = None) -> None:
        self.rt = rt
        self.scheduler = Scheduler(rt, max_batch=max_batch, max_queue=max_queue, join_tokens=join_tokens)
        # the batches' steps are built now (a CUDA runtime that warms up), not on a request
        self.warm_up = rt.engine.warm_up_rows(range(2, self.scheduler.max_batch + 1))

    async def generate(self, request: GenRequest) -> AsyncIterator[tuple[int, Delta | Done]]:
        choices = request.choices()
        if len(choices) > self.scheduler.max_queue:
            raise ApiError(400, f"n={len(choices)} choices exceed this server's queue ({self.scheduler.max_queue} "
                           "requests); ask for fewer", param="n")
        try:
            jobs = [Job(_noop, request=r, opts=self.rt.options(r.max_new_tokens, **r.generate_kwargs))
                    for r in choices]
        except (ValueError, TypeError) as exc:
            raise ApiError(400, str(exc)) from None
        async for pair in self._events(jobs):  # all n jobs queued at once: they batch together
            yield pair

    async def check(self, ctx: Context, requirements: Sequence[str], adapter: str | None) -> list[dict]:
        def run(rt: Runtime) -> list[dict]:
            return [{"requirement": v.requirement, "passed": v.passed, "probability": v.probability,
                     "prompt_tokens": v.stats.prompt_tokens, "cached_tokens": v.stats.cached_tokens}
                    for v in rt.check(ctx, requirements, adapter=adapter)]

        async for _, event in self._events([Job(_noop, call=run)]):
            if isinstance(event, Done):
                raise_for(event)
                return event.value
        raise AssertionError("a call job ends with Done")

    async def _events(self, jobs: list[Job]) -> AsyncIterator[tuple[int, Delta | Done]]:
        """Submit ``jobs`` (all or none) and yield their events as ``(index, event)`` until
        each has ended; leaving early cancels the unfinished ones."""
        loop = asyncio.get_running_loop()
        pending: list = []
        lock = threading.Lock()
        ready = asyncio.Event()

        def sink_of(i: int, job: Job):
            def sink(event) -> None:  # worker thread: wake the loop only if it is not woken already
                with lock:
                    wake = not pending
                    pending.append((i, event))
                if wake:
                    try:
                        loop.call_soon_threadsafe(ready.set)
                    except RuntimeError:  # the loop has closed: nobody is listening
                        job.cancel()
            return sink

        for i, job in enumerate(jobs):
            job.sink = sink_of(i, job)
        self.scheduler.submit(*jobs)
        running = set(range(len(jobs)))
        try:
            while running:
                await ready.wait()
                ready.clear()
                with lock:
                    events = pending[:]
                    pending.clear()
                for i, event in events:
                    if isinstance(event, Done):
                        running.discard(i)
                    yield i, event
        finally:
            for i in running:
                self.scheduler.cancel(jobs[i])

    async def health(self) -> dict:
        s = self.scheduler
        return {"status": "ok", "running": s.running, "waiting": s.waiting, "max_queue": s.max_queue,
                "max_batch": s.max_batch, **{k: int(v) for k, v in s.counts.items()},
                "store": attrs.asdict(self.rt.store.stats)}

    def gauges(self) -> dict[str, float]:
        s = self.scheduler
        out = {"queue_waiting": s.waiting, "running_rows": s.running,
               **{f"scheduler_{k}": v for k, v in s.counts.items()}}
        out.update(_numbers("store", attrs.asdict(self.rt.store.stats)))
        tiers = getattr(self.rt.store, "tiers", None)  # a store with lower tiers (docs/tiers.md)
        if tiers is not None:
            out.update(_numbers("tier", attrs.asdict(tiers.totals())))
        return out


def raise_for(done: Done) -> None:
    """Raise a ``Done`` that carries an error as the ``ApiError`` the client gets."""
    if done.error is None:
        return
    if isinstance(done.error, ApiError):
        raise done.error
    status = 400 if isinstance(done.error, (ValueError, TypeError, KeyError)) else 500
    raise ApiError(status, f"{type(done.error).__name__}: {done.error}",
                   type="invalid_request_error" if status == 400 else "server_error")


def _numbers(prefix: str, fields: dict) -> dict[str, float]:
    return {f"{prefix}_{k}": v for k, v in fields.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _noop(event) -> None:
    pass
