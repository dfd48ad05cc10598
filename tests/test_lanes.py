"""Continuous batching (``spanctx.engine.lanes``): generations that join and leave a running
decode between steps give what a full prefill of the same ids gives, step by step (fp32
logits, greedy tokens), whatever ran beside them; their slots and owner bits come back."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_runtime
from hypothesis import given, settings
from hypothesis import strategies as st

from spanctx import Context
from spanctx.engine.calls import FinalCall
from spanctx.engine.lanes import SCRATCH, SlotPool

SYSTEM = "You are a terse assistant for the plant manual. Answer in one word. " * 3
ATOL = 1e-4


def call_of(rt, ctx: Context, new_tokens: int, **kwargs) -> FinalCall:
    """``ctx`` assembled through ``rt``'s store, as the serve scheduler admits it."""
    opts = rt.options(new_tokens, **kwargs)
    with rt.prepared(ctx, max_new_tokens=new_tokens) as prepared:
        return FinalCall.tails([prepared.assembly], decode=opts)


def run_staggered(rt, contexts, limits, *, every: int = 2, max_lanes: int = 3, release_after=None):
    """Admit one context every ``every`` steps (when a lane is free), step until all end.
    Returns per context its lane's tokens and per step logits, and the lanes object."""
    tokens, logits, pending = {}, {}, list(range(len(contexts)))
    with rt.holding(), rt.engine.lanes(max_lanes) as lanes:
        lane_of, step = {}, 0
        while pending or len(lanes):
            if pending and step % every == 0:
                k = pending[0]
                call = call_of(rt, contexts[k], limits[k])
                assert lanes.refuses(call) is None
                lane = lanes.admit(call)
                if lane is not None:
                    lane_of[lane] = k
                    pending.pop(0)
            for event in lanes.step(logits_for=frozenset(lanes.lanes)):
                logits.setdefault(lane_of[event.lane], []).append(event.logits)
                if release_after and len(event.lane.tokens) == release_after.get(lane_of[event.lane]):
                    lanes.release(event.lane, "cancelled")
            step += 1
        for lane, k in lane_of.items():
            tokens[k] = lane.tokens
        assert not (rt.engine.static.owners != 0).any()  # every owner bit was given back
        assert lanes.pool.high == SCRATCH + 1
    return tokens, logits, lanes


def contexts_of(n: int) -> list[Context]:
    return [Context().append(SYSTEM).append(f"Question {i}: which valve opens pump {i}?") for i in range(n)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gpt2"])
def test_staggered_lanes_equal_full_prefill(arch):
    rt, ref = tiny_runtime(arch, executor="static"), tiny_runtime(arch)
    contexts, limits = contexts_of(5), [6, 9, 3, 12, 7]
    tokens, logits, lanes = run_staggered(rt, contexts, limits)
    assert lanes.steps < sum(limits)  # lanes shared steps
    for k, (ctx, n) in enumerate(zip(contexts, limits)):
        want = ref.generate(ctx, n, reuse=False, output_logits=True)
        assert tuple(tokens[k]) == want.token_ids
        for got, expected in zip(logits[k], want.logits, strict=True):
            torch.testing.assert_close(got, expected.reshape(-1).float(), atol=ATOL, rtol=0)
    assert rt.store.stats.hits >= 4  # the system span, computed once, was reused by later lanes


def test_lanes_share_a_laid_prefix_and_lay_it_once():
    rt = tiny_runtime("llama", executor="static")
    contexts = contexts_of(3)
    rt.generate(contexts[0], 1)  # the system span is stored
    with rt.holding(), rt.engine.lanes(4) as lanes:
        first = lanes.admit(call_of(rt, contexts[1], 4))
        second = lanes.admit(call_of(rt, contexts[2], 4))
        assert first.chains == second.chains  # the same regions, seen by both
        owners = rt.engine.static.owners
        assert int((owners == 0b11).sum()) == first.row.start == second.row.start  # laid once, both bits set
        while len(lanes):
            lanes.step()


def test_a_released_lane_ends_and_the_others_go_on():
    rt, ref = tiny_runtime("llama", executor="static"), tiny_runtime("llama")
    contexts, limits = contexts_of(4), [8, 8, 8, 8]
    tokens, _, _ = run_staggered(rt, contexts, limits, every=1, release_after={1: 3})
    assert len(tokens[1]) == 3
    for k in (0, 2, 3):
        assert tuple(tokens[k]) == ref.generate(contexts[k], 8, reuse=False).token_ids


def test_a_lane_over_a_parallel_group_equals_its_own_generation():
    rt, solo = tiny_runtime("llama", executor="static", repair="head:4"), tiny_runtime("llama", repair="head:4")
    base = Context().append(SYSTEM)
    contexts = [base.parallel("Note A: the red valve.", "Note B: the blue pump.").append(f"Which note, {i}?")
                for i in range(2)] + contexts_of(1)
    tokens, logits, _ = run_staggered(rt, contexts, [5, 5, 5], every=1)
    for k, ctx in enumerate(contexts):
        want = solo.generate(ctx, 5, output_logits=True)
        assert tuple(tokens[k]) == want.token_ids
        for got, expected in zip(logits[k], want.logits, strict=True):
            torch.testing.assert_close(got, expected.reshape(-1).float(), atol=ATOL, rtol=0)


def test_lanes_store_their_new_spans():
    rt = tiny_runtime("llama", executor="static")
    (ctx,) = contexts_of(1)
    run_staggered(rt, [ctx], [3])
    stored = rt.store.stats.stored_tokens
    again = rt.generate(ctx, 3)
    assert stored > 0 and again.stats.cached_tokens == again.stats.prompt_tokens - 1  # all but the last token


def test_sampled_and_greedy_lanes_step_together():
    rt, ref = tiny_runtime("llama", executor="static"), tiny_runtime("llama")
    contexts = contexts_of(2)
    with rt.holding(), rt.engine.lanes(2) as lanes:
        greedy = lanes.admit(call_of(rt, contexts[0], 6))
        sampled = lanes.admit(call_of(rt, contexts[1], 6, do_sample=True, temperature=0.7, top_k=5))
        steps = []
        while len(lanes):
            steps += [e for e in lanes.step(logits_for=frozenset([sampled])) if e.lane is sampled]
    assert tuple(greedy.tokens) == ref.generate(contexts[0], 6, reuse=False).token_ids
    assert sampled.finish in ("stop", "length") and 1 <= len(steps) <= 6
    for event in steps:  # each draw is among its step's top 5 (top_k=5)
        assert event.token in event.logits.topk(5).indices.tolist()


def test_lanes_refuse_what_must_run_alone():
    rt = tiny_runtime("llama", executor="static")
    (ctx,) = contexts_of(1)
    with rt.holding(), rt.engine.lanes(2) as lanes:
        assert "seeded" in lanes.refuses(call_of(rt, ctx, 3, do_sample=True, seed=1))
        assert "no_repeat_ngram_size" in lanes.refuses(call_of(rt, ctx, 3, no_repeat_ngram_size=2))
        assert lanes.refuses(call_of(rt, ctx, 3)) is None
    with pytest.raises(ValueError, match="max_lanes"):
        with rt.holding(), rt.engine.lanes(64):
            pass
    with pytest.raises(ValueError, match="static executor"):
        with tiny_runtime("llama").engine.lanes(2):
            pass


def test_a_lane_waits_when_the_slots_are_taken():
    rt = tiny_runtime("llama", executor="static", static_tokens=256)
    contexts = [Context().append(f"Question {i}?") for i in range(2)]  # ~15 tokens, then 150 new ones each
    with rt.holding(), rt.engine.lanes(4) as lanes:
        first = lanes.admit(call_of(rt, contexts[0], 150))
        assert first is not None and lanes.admit(call_of(rt, contexts[1], 150)) is None  # no room now
        lanes.release(first)
        assert lanes.admit(call_of(rt, contexts[1], 150)) is not None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 40)), max_size=40))
def test_slot_pool_regions_stay_disjoint_and_merge_back(ops):
    pool, taken = SlotPool(128), {}
    for take, size in ops:
        if take or not taken:
            start = pool.take(size)
            used = {s for a, n in taken.items() for s in range(a, a + n)}
            if start is None:
                assert all(len(set(range(a, a + size)) & used) or a + size > 128 for a in range(1, 129))
            else:
                assert start >= 1 and start + size <= 128 and not set(range(start, start + size)) & used
                taken[start] = size
        else:
            start = sorted(taken)[size % len(taken)]
            pool.give(start)
            del taken[start]
        assert pool.high == max((a + n for a, n in taken.items()), default=1)
    for start in list(taken):
        pool.give(start)
    assert pool.take(127) == 1  # everything merged back into one region


def test_the_scheduler_joins_lanes_within_its_token_budget():
    """Requests queued together join over several steps when their tails exceed
    ``join_tokens`` (the first always joins), and answer as they do alone."""
    import queue
    import threading

    from spanctx.serve.jobs import Done, Job
    from spanctx.serve.protocol import GenRequest
    from spanctx.serve.scheduler import Scheduler

    rt, ref = tiny_runtime("llama", executor="static"), tiny_runtime("llama")
    scheduler = Scheduler(rt, max_batch=4, join_tokens=1)
    gate = threading.Event()
    scheduler.submit(Job(lambda event: None, call=lambda rt: gate.wait(60)))  # holds the worker
    contexts, sinks = contexts_of(3), [queue.Queue() for _ in range(3)]
    scheduler.submit(*(Job(sink.put, request=GenRequest(ctx, 5, {}), opts=rt.options(5))
                       for ctx, sink in zip(contexts, sinks)))
    gate.set()
    for ctx, sink in zip(contexts, sinks):
        text = ""
        while not isinstance(event := sink.get(timeout=60), Done):
            text += event
        assert event.error is None and text == ref.generate(ctx, 5, reuse=False).text
    assert scheduler.counts["lanes"] == 3 and scheduler.counts["join_steps"] == 3  # one tail per step
    assert scheduler.counts["lane_steps"] < 3 * 5  # while the later ones joined, the first decoded
    scheduler.close()
