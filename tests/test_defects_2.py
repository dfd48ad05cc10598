"""Defects where the new surfaces meet (issue 17, items 1-3, 10 and notes; items 4-7 are in
test_defects_tenants.py). Each test failed on main (02d1b05) before its fix; the history
shows it committed as a strict xfail first."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import tiny_model, tiny_runtime
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

import spanctx
from spanctx import Context
from spanctx.core.batch_layout import plan_batch
from spanctx.core.placement import Repair

ATOL = 1e-4
SYSTEM = "You answer from the documents. "
DOCS = ("Doc 0: Ana's code is 4411. ", "Doc 1: Tomas's code is 9023. ", "Doc 2: Lee's code is 1170. ")
QUESTION = "Q: What is the code of Tomas?\nA:"
HANG = 60  # seconds a worker thread may take before a test calls it hung (a deadlock guard, not a timing)


def group_question() -> Context:
    return Context().append(SYSTEM).parallel(*DOCS).append(QUESTION)


def longer_question() -> Context:
    return Context().append(SYSTEM).append("Q: " + "Please tell me everything you know about it. " * 3 + "\nA:")


class Recorder(LogitsProcessor):
    """Keeps every step's scores (greedy: the raw logits) and leaves them as they are."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.steps.append(scores.detach().float().clone())
        return scores


def in_thread(fn):
    """Run ``fn`` in a thread; its result, or its exception raised here; a hang fails."""
    out: list = []

    def run():
        try:
            out.append(("ok", fn()))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            out.append(("err", exc))

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(HANG)
    assert not worker.is_alive(), "the call hung (deadlock)"
    kind, value = out[0]
    if kind == "err":
        raise value
    return value


# -- 1. a batch row keeps its whole parallel group; nothing stored from a causal recompute ----

def test_plan_batch_never_cuts_a_row_below_its_floor():
    # row 0: 40 tokens, 10 cached; row 1: 20 tokens, 18 cached, its group ends at 16
    layout = plan_batch([40, 20], [10, 18], [0, 16])
    assert layout.kept[1] >= 16 and layout.kept[0] <= 40 - 1
    assert layout.cached_width == layout.pads[1] + layout.kept[1]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 60), st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=6))
def test_plan_batch_keeps_every_floor_and_otherwise_the_most_cache(rows):
    lengths = [n for n, _, _ in rows]
    cached = [int(a * (n - 1)) for n, a, _ in rows]
    floors = [int(b * c) for c, (_, _, b) in zip(cached, rows)]
    layout = plan_batch(lengths, cached, floors)
    assert all(kept >= floor for kept, floor in zip(layout.kept, floors))
    assert all(pad + kept < layout.width for pad, kept in zip(layout.pads, layout.kept))  # one token left to run
    # the smallest cached width that keeps every floor, and no smaller than plain reuse's
    plain = min(c + pad for c, pad in zip(cached, layout.pads))
    needed = max([f + pad for f, pad in zip(floors, layout.pads) if f], default=0)
    assert layout.cached_width == max(plain, needed)


# none, head:4 and blend:0.5 failed on main; full passed
@pytest.mark.parametrize("repair", ["none", "head:4", "blend:0.5", "full"])
def test_batch_row_with_a_parallel_group_equals_its_solo_call_and_stores_nothing_wrong(repair):
    q, longer = group_question(), longer_question()
    solo_rt = tiny_runtime(repair=repair)
    solo = Recorder()
    want = solo_rt.generate(q, 6, logits_processor=LogitsProcessorList([solo]))
    rt = tiny_runtime(repair=repair)
    got = Recorder()
    rows = rt.generate_batch([longer, q], 6, logits_processor=LogitsProcessorList([got]))
    assert rows[1].token_ids == want.token_ids
    for step, (a, b) in enumerate(zip(got.steps, solo.steps)):
        torch.testing.assert_close(a[1], b[0], atol=ATOL, rtol=0, msg=lambda m, s=step: f"step {s}: {m}")
    # the store is not poisoned: a later call equals a cold runtime's
    torch.testing.assert_close(rt.next_token_logits(q), tiny_runtime(repair=repair).next_token_logits(q),
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gemma2", "gpt2"])
def test_batch_row_with_a_parallel_group_on_other_architectures(arch):
    q, longer = group_question(), longer_question()
    solo, got = Recorder(), Recorder()
    tiny_runtime(arch, repair="head:4").generate(q, 4, logits_processor=LogitsProcessorList([solo]))
    rt = tiny_runtime(arch, repair="head:4")
    rt.generate_batch([longer, q], 4, logits_processor=LogitsProcessorList([got]))
    for a, b in zip(got.steps, solo.steps):
        torch.testing.assert_close(a[1], b[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(rt.next_token_logits(q), tiny_runtime(arch, repair="head:4").next_token_logits(q),
                               atol=ATOL, rtol=0)


def test_generate_batch_takes_a_repair_mode():
    q = group_question()
    rt = tiny_runtime(repair="none")
    row, = rt.generate_batch([q], 3, repair="full")
    assert row.stats.parallel.repair == "full"
    assert row.token_ids == tiny_runtime(repair="full").generate(q, 3).token_ids


# -- 2. the static executor selects its attention per call, never the model's config ----------

class AtFirstLayer:
    """A forward pre-hook on the model's first decoder layer that runs ``action`` once,
    inside the forward of a call made on ``thread``."""

    def __init__(self, model, action) -> None:
        self.action, self.thread, self.done = action, None, False
        self.handle = model.model.layers[0].register_forward_pre_hook(self)

    def __call__(self, module, args):
        if not self.done and threading.current_thread() is self.thread:
            self.done = True
            self.action()


def test_eager_calls_on_the_model_work_during_a_static_forward():
    model, tokenizer = tiny_model("llama")
    static = spanctx.Runtime(model, tokenizer, store_bytes=64 << 20, executor="static")
    eager = spanctx.Runtime(model, tokenizer, store_bytes=64 << 20, executor="eager")
    ctx = Context().append(SYSTEM).append(QUESTION)
    want = eager.next_token_logits(ctx, reuse=False)
    seen: list = []
    hook = AtFirstLayer(model, lambda: seen.append(in_thread(lambda: eager.next_token_logits(ctx, reuse=False))))
    try:
        hook.thread = threading.current_thread()
        out = static.generate(ctx, 4)
    finally:
        hook.handle.remove()
    assert out.stats.executor == "static" and hook.done
    torch.testing.assert_close(seen[0], want, atol=ATOL, rtol=0)


def test_overlapping_static_generations_leave_the_model_as_it_was():
    model, tokenizer = tiny_model("llama")
    own = model.config._attn_implementation
    a, b = (spanctx.Runtime(model, tokenizer, store_bytes=64 << 20, executor="static") for _ in range(2))
    ctx = Context().append(SYSTEM).append(QUESTION)
    b_inside, a_done = threading.Event(), threading.Event()
    results: dict = {}

    def run_b():
        try:
            results["b"] = b.generate(ctx, 4)
        except BaseException as exc:  # noqa: BLE001
            results["b"] = exc

    def pause_b():  # b's first forward waits inside until a has finished
        b_inside.set()
        a_done.wait(HANG)

    b_hook = AtFirstLayer(model, pause_b)
    a_hook = AtFirstLayer(model, lambda: (worker.start(), b_inside.wait(HANG)))
    worker = threading.Thread(target=run_b, daemon=True)
    b_hook.thread, a_hook.thread = worker, threading.current_thread()
    try:
        results["a"] = a.generate(ctx, 4)
        a_done.set()
        worker.join(HANG)
    finally:
        a_done.set()
        a_hook.handle.remove()
        b_hook.handle.remove()
    assert not worker.is_alive()
    assert not isinstance(results["b"], BaseException), results["b"]
    assert results["a"].token_ids == results["b"].token_ids
    assert model.config._attn_implementation == own
    eager = spanctx.Runtime(model, tokenizer, store_bytes=64 << 20, executor="eager")
    torch.testing.assert_close(eager.next_token_logits(ctx), eager.next_token_logits(ctx, reuse=False),
                               atol=ATOL, rtol=0)


# -- 3. re-entrant calls work on both executors ---------------------------------------------

class CallingStreamer(BaseStreamer):
    """A streamer whose ``put`` makes a nested generation on the same runtime."""

    def __init__(self, rt, ctx) -> None:
        self.rt, self.ctx, self.nested = rt, ctx, []

    def put(self, value):
        if len(self.nested) < 2:
            self.nested.append(self.rt.generate(self.ctx, 3).token_ids)

    def end(self):
        pass


class CallingProcessor(LogitsProcessor):
    """A logits processor that asks the same runtime for logits, then leaves the scores."""

    def __init__(self, rt, ctx) -> None:
        self.rt, self.ctx, self.seen = rt, ctx, []

    def __call__(self, input_ids, scores):
        self.seen.append(self.rt.next_token_logits(self.ctx))
        return scores


@pytest.mark.parametrize("executor", ["eager", "static"])
def test_reentrant_calls_work_on_both_executors(executor):
    rt = tiny_runtime(executor=executor)
    ctx, other = Context().append(SYSTEM).append(QUESTION), Context().append(SYSTEM).append("Q: and Lee?\nA:")
    plain, nested_plain = rt.generate(ctx, 4).token_ids, rt.generate(other, 3).token_ids
    streamer = CallingStreamer(rt, other)
    assert in_thread(lambda: rt.generate(ctx, 4, streamer=streamer)).token_ids == plain
    assert streamer.nested == [nested_plain] * 2
    processor = CallingProcessor(rt, other)
    got = in_thread(lambda: rt.generate(ctx, 4, logits_processor=LogitsProcessorList([processor])))
    assert got.token_ids == plain and len(processor.seen) == 4
    torch.testing.assert_close(processor.seen[-1], rt.next_token_logits(other, reuse=False), atol=ATOL, rtol=0)


# -- 10. exact repair keys ----------------------------------------------------------------------

def test_repair_modes_that_differ_never_share_a_key():
    assert str(Repair.parse("blend:0.1500001")) != str(Repair.parse("blend:0.15"))
    assert str(Repair("blend", fraction=1)) == str(Repair.parse("blend:1.0")) == str(Repair.parse("blend:1"))
    for spec in ("blend:0.15", "blend:0.1500001", "blend:1e-05", "head:3", "none", "full"):
        assert Repair.parse(str(Repair.parse(spec))) == Repair.parse(spec)
    q = group_question()
    rt = tiny_runtime()
    rt.next_token_logits(q, repair="blend:0.15")
    got = rt.next_token_logits(q, repair="blend:0.1500001")
    torch.testing.assert_close(got, tiny_runtime().next_token_logits(q, repair="blend:0.1500001"), atol=1e-5, rtol=0)
    a, _ = rt.resolve(q, repair="blend:0.15")
    b, _ = rt.resolve(q, repair="blend:0.1500001")
    assert a.groups[0].key != b.groups[0].key


# -- notes: stop strings, long cold prompts on the static executor -------------------------------

class Forced(LogitsProcessor):
    """Makes step ``i`` choose ``ids[i]``: printable text from a random model."""

    def __init__(self, ids, prompt_tokens: int) -> None:
        self.ids, self.prompt_tokens = ids, prompt_tokens

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.ids[input_ids.shape[1] - self.prompt_tokens]] = 0
        return forced


@pytest.mark.parametrize("executor", ["eager", "static"])
def test_stop_strings_work_without_passing_a_tokenizer(executor):
    rt = tiny_runtime(executor=executor)
    ctx = Context().append(QUESTION)
    text = "The code is 9023. Done."
    ids = rt.tokenizer(text, add_special_tokens=False)["input_ids"]
    forced = LogitsProcessorList([Forced(ids, len(rt.token_ids(ctx)))])
    assert rt.generate(ctx, len(ids), logits_processor=forced).text == text
    got = rt.generate(ctx, len(ids), logits_processor=forced, stop_strings=["9023"])
    assert got.text == "The code is 9023" and got.stats.executor == executor  # the static loop stops too


def test_a_long_cold_tail_on_the_cpu_static_executor_runs_eagerly_and_says_why():
    model, tokenizer = tiny_model("llama")
    rt = spanctx.Runtime(model, tokenizer, store_bytes=64 << 20, executor="static")
    rt.engine.static.max_mask_bytes = 1 << 20  # a 600-token tail's fp32 mask takes ~1.5 MB
    out = rt.generate(Context().append("word " * 120), 2)
    assert out.stats.executor == "eager" and "mask" in out.stats.executor_fallback
    assert out.token_ids == rt.generate(Context().append("word " * 120), 2, reuse=False).token_ids
    assert rt.generate(Context().append("word " * 10), 2).stats.executor == "static"  # a short tail stays
