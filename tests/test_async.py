"""Async front: agenerate / astream equal the sync calls, share the store, respect the limit.

pytest-asyncio is not a dependency: each test drives its coroutine with ``asyncio.run``.
"""

import asyncio
import threading

import pytest
from conftest import tiny_runtime
from transformers import StoppingCriteria

import spanctx
from spanctx import Context

SHARED = Context().append("A shared prefix for concurrent requests. ")
QUESTIONS = [SHARED.append(f"Question number {i}?") for i in range(5)]


def test_concurrent_agenerate_equals_sync_and_shares_the_store():
    sync_rt, rt = tiny_runtime("llama"), tiny_runtime("llama")
    expected = [sync_rt.generate(q, max_new_tokens=6).token_ids for q in QUESTIONS]

    async def main():
        return await asyncio.gather(*(rt.agenerate(q, max_new_tokens=6) for q in QUESTIONS))

    results = asyncio.run(main())
    assert [r.token_ids for r in results] == expected
    # the shared prefix was computed once, by whichever request ran first
    assert sum(r.stats.cached_tokens for r in results) == 4 * len(rt.token_ids(SHARED))
    assert rt.store.stats.entries == sync_rt.store.stats.entries


def test_astream_joins_to_the_generated_text():
    rt = tiny_runtime("qwen2")
    conversation = Context.chat([{"role": "user", "content": "stream this"}])

    async def main():
        return [piece async for piece in rt.astream(conversation, max_new_tokens=10)]

    pieces = asyncio.run(main())
    assert "".join(pieces) == rt.generate(conversation, max_new_tokens=10).text


def test_the_concurrency_limit_bounds_requests_in_worker_threads():
    rt = tiny_runtime("llama", max_concurrency=2)
    running, peak, lock = 0, 0, threading.Lock()
    generate = rt.generate

    def counting_generate(*args, **kwargs):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            return generate(*args, **kwargs)
        finally:
            with lock:
                running -= 1

    rt.generate = counting_generate

    async def main():
        return await asyncio.gather(*(rt.agenerate(q, max_new_tokens=3) for q in QUESTIONS))

    assert len(asyncio.run(main())) == len(QUESTIONS)
    assert peak == 2


def test_the_event_loop_stays_free_while_the_model_runs():
    rt = tiny_runtime("llama")

    async def main():
        ticks = 0
        request = asyncio.create_task(rt.agenerate(QUESTIONS[0], max_new_tokens=40, min_new_tokens=40))
        while not request.done():
            ticks += 1
            await asyncio.sleep(0.001)
        return ticks, await request

    ticks, result = asyncio.run(main())
    assert result.stats.new_tokens == 40
    assert ticks > 1


class _Counter(StoppingCriteria):
    """Counts decoding steps; signals the first one."""

    def __init__(self):
        self.steps = 0
        self.started = threading.Event()

    def __call__(self, input_ids, scores, **kwargs):
        self.steps += 1
        self.started.set()
        return input_ids.new_zeros(input_ids.shape[0], dtype=bool)


def test_cancelling_a_request_stops_its_generation():
    rt = tiny_runtime("llama")
    budget = 2000

    async def cancel_agenerate(counter):
        task = asyncio.create_task(rt.agenerate(QUESTIONS[1], max_new_tokens=budget, min_new_tokens=budget,
                                                stopping_criteria=[counter]))
        await asyncio.to_thread(counter.started.wait)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        # the model lock is free again once the cancelled generation has stopped
        return await rt.agenerate(QUESTIONS[2], max_new_tokens=2)

    # only spaces: the streamer hands out a piece at every step, the first one at once
    space = rt.tokenizer(" ", add_special_tokens=False)["input_ids"]
    only_spaces = [t for t in range(len(rt.tokenizer)) if t not in space]

    async def leave_astream(counter):
        stream = rt.astream(QUESTIONS[3], max_new_tokens=budget, min_new_tokens=budget, stopping_criteria=[counter],
                            suppress_tokens=only_spaces)
        async for _ in stream:
            break
        await stream.aclose()
        return await rt.agenerate(QUESTIONS[2], max_new_tokens=2)

    for run in (cancel_agenerate, leave_astream):
        counter = _Counter()
        assert asyncio.run(run(counter)).stats.new_tokens == 2
        assert 0 < counter.steps < budget


def test_async_errors_reach_the_caller():
    rt = tiny_runtime("llama")

    with pytest.raises(ValueError, match="empty"):
        asyncio.run(rt.agenerate(spanctx.Context()))


def test_the_concurrency_limit_must_be_positive():
    with pytest.raises(ValueError, match="max_concurrency"):
        tiny_runtime("llama", max_concurrency=0)


def test_a_set_cancel_event_stops_generate_and_stream_within_a_step():
    rt = tiny_runtime("llama")
    ctx = Context().append("Cancelled before it starts. ")
    cancelled = threading.Event()
    cancelled.set()
    full = rt.generate(ctx, 12, min_new_tokens=12)
    stopped = rt.generate(ctx, 12, min_new_tokens=12, cancel=cancelled)
    assert len(full.token_ids) == 12 and len(stopped.token_ids) == 1  # checked after each decode step
    assert stopped.token_ids == full.token_ids[:1]
    assert "".join(rt.stream(ctx, 12, min_new_tokens=12, cancel=cancelled)) == stopped.text
