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

from ..core.spans import Context
from ..session.results import Result

if TYPE_CHECKING:
    from ..session.api import SessionAPI

_LIMITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # session -> {event loop: Semaphore}
_LIMITS_LOCK = threading.Lock()
_DONE = object()


async def agenerate(rt: SessionAPI, ctx: Context, max_new_tokens: int | None = None, *, reuse: bool = True,
                    **generate_kwargs) -> Result:
    """``generate`` in a worker thread, at most ``max_concurrency`` requests at once."""
    cancel = threading.Event()
    async with _limit(rt):
        try:
            return await asyncio.to_thread(rt.generate, ctx, max_new_tokens, reuse=reuse, cancel=cancel,
                                           **generate_kwargs)
        except asyncio.CancelledError:
            cancel.set()
            raise


async def astream(rt: SessionAPI, ctx: Context, max_new_tokens: int | None = None, *, reuse: bool = True,
                  **generate_kwargs) -> AsyncIterator[str]:
    """``stream`` as an async iterator (each piece awaited from a worker thread); leaving
    it early stops the generation."""
    cancel = threading.Event()
    async with _limit(rt):
        pieces = rt.stream(ctx, max_new_tokens, reuse=reuse, cancel=cancel, **generate_kwargs)
        try:
            while (piece := await asyncio.to_thread(next, pieces, _DONE)) is not _DONE:
                yield piece
        finally:
            cancel.set()  # a no-op once generation has ended


def _limit(rt: SessionAPI) -> asyncio.Semaphore:
    """The semaphore that bounds ``rt``'s requests on the running event loop."""
    loop = asyncio.get_running_loop()
    with _LIMITS_LOCK:
        per_loop = _LIMITS.setdefault(rt, weakref.WeakKeyDictionary())
        if loop not in per_loop:
            per_loop[loop] = asyncio.Semaphore(rt.max_concurrency)
        return per_loop[loop]
