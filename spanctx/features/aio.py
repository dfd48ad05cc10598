"""Asyncio front of the runtime: ``await rt.agenerate(...)``, ``async for p in rt.astream(...)``.

Model work runs in worker threads, so the event loop stays free. The runtime serialises
model calls with its lock and the store locks itself, so concurrent requests share the
store safely: a span that two requests need is computed by the first and reused by the
second. At most ``rt.max_concurrency`` requests of one event loop hold a worker thread
at once (read when the loop first uses the runtime); the others wait on the loop
without a thread.

Cancelling a request (``task.cancel()``, or leaving an ``astream`` loop and closing it)
stops its generation at the next decoding step, so the model is free again soon.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from transformers import StoppingCriteriaList

from ..core.spans import Context
from ..engine import StopWhenSet
from ..session.results import Result

if TYPE_CHECKING:
    from ..runtime import Runtime

_LIMITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Runtime -> {event loop: Semaphore}
_LIMITS_LOCK = threading.Lock()
_DONE = object()


async def agenerate(rt: Runtime, ctx: Context, max_new_tokens: int | None = None, *, reuse: bool = True,
                    **generate_kwargs) -> Result:
    """``rt.generate`` in a worker thread, under the runtime's concurrency limit."""
    cancel = threading.Event()
    kwargs = _with_cancel(rt, generate_kwargs, cancel)
    async with _limit(rt):
        try:
            return await asyncio.to_thread(rt.generate, ctx, max_new_tokens, reuse=reuse, **kwargs)
        except asyncio.CancelledError:
            cancel.set()
            raise


async def astream(rt: Runtime, ctx: Context, max_new_tokens: int | None = None, *, reuse: bool = True,
                  **generate_kwargs) -> AsyncIterator[str]:
    """``rt.stream`` as an async iterator; each piece is awaited from a worker thread."""
    cancel = threading.Event()
    kwargs = _with_cancel(rt, generate_kwargs, cancel)
    async with _limit(rt):
        pieces = rt.stream(ctx, max_new_tokens, reuse=reuse, **kwargs)
        try:
            while (piece := await asyncio.to_thread(next, pieces, _DONE)) is not _DONE:
                yield piece
        finally:
            cancel.set()  # a no-op once generation has ended


def _with_cancel(rt: Runtime, kwargs: dict, cancel: threading.Event) -> dict:
    """``kwargs`` plus a stopping criterion watching ``cancel``, after the caller's own
    (the call's ``stopping_criteria``, else the runtime default's)."""
    own = kwargs.get("stopping_criteria", rt.generation_defaults.get("stopping_criteria"))
    return {**kwargs, "stopping_criteria": StoppingCriteriaList([*(own or []), StopWhenSet(cancel)])}


def _limit(rt: Runtime) -> asyncio.Semaphore:
    """The semaphore that bounds ``rt``'s requests on the running event loop."""
    loop = asyncio.get_running_loop()
    with _LIMITS_LOCK:
        per_loop = _LIMITS.setdefault(rt, weakref.WeakKeyDictionary())
        if loop not in per_loop:
            per_loop[loop] = asyncio.Semaphore(rt.max_concurrency)
        return per_loop[loop]
