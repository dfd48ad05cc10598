"""The engine's executors behind one Runtime: the static executor (graphs off on CPU)
gives what the eager one gives, and says when it steps aside."""

from __future__ import annotations

import pytest
import torch
from adapter_helpers import INVOCATION, adapter_pair, fresh_runtime
from conftest import tiny_model

import spanctx
from spanctx import Context

SYSTEM = "You answer in one short line. " * 4


def runtimes(arch: str = "llama"):
    model, tokenizer = tiny_model(arch)
    return (spanctx.Runtime(model, tokenizer, store_bytes=64 << 20, executor="eager"),
            spanctx.Runtime(model, tokenizer, store_bytes=64 << 20, executor="static"))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma2", "gpt2"])
def test_static_generations_equal_eager_ones_with_and_without_reuse(arch):
    eager, static = runtimes(arch)
    contexts = [Context().append(SYSTEM).append("Question one?"), Context().append(SYSTEM).append("Two?"),
                Context().append(SYSTEM).parallel("Doc A. ", "Doc B. ").append("Three?")]
    for ctx in contexts:
        for reuse in (True, False):
            want = eager.generate(ctx, 12, reuse=reuse)
            got = static.generate(ctx, 12, reuse=reuse)
            assert got.token_ids == want.token_ids
            assert got.stats.cached_tokens == want.stats.cached_tokens
            assert (got.stats.executor, got.stats.executor_fallback) == ("static", None)
            assert want.stats.executor == "eager"
    # the spans the static executor stored are the right ones: eager logits over them match
    torch.testing.assert_close(static.next_token_logits(contexts[1]), eager.next_token_logits(contexts[1]),
                               atol=1e-4, rtol=0)


def test_static_streams_and_samples_like_eager():
    eager, static = runtimes()
    ctx = Context().append(SYSTEM).append("Stream?")
    assert "".join(static.stream(ctx, 10)) == "".join(eager.stream(ctx, 10))
    assert (static.generate(ctx, 10, do_sample=True, seed=3).token_ids
            == eager.generate(ctx, 10, do_sample=True, seed=3).token_ids)


def test_scores_and_adapter_calls_run_on_the_static_executor(tmp_path_factory):
    arch, alora, lora = adapter_pair("llama", tmp_path_factory, "executors", (1, 2))
    eager, static = fresh_runtime(arch, executor="eager"), fresh_runtime(arch, executor="static")
    ctx = Context().append(SYSTEM).append("Why?")
    want, got = (rt.generate(ctx, 4, output_scores=True, output_logits=True) for rt in (eager, static))
    assert (got.stats.executor, got.stats.executor_fallback) == ("static", None)
    assert got.stats.static.rows == 1 and got.stats.static.steps == 4 and want.stats.static is None
    assert got.token_ids == want.token_ids
    for name in ("scores", "logits"):
        for a, b in zip(getattr(got, name), getattr(want, name)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    for rt in (eager, static):
        rt.add_adapter("check", alora, invocation=INVOCATION)
        rt.add_adapter("style", lora)
    for adapter in ("check", "style"):
        want, got = (rt.generate(ctx, 5, adapter=adapter) for rt in (eager, static))
        assert got.stats.executor == "static" and got.token_ids == want.token_ids
        torch.testing.assert_close(static.next_token_logits(ctx, adapter=adapter),
                                   eager.next_token_logits(ctx, adapter=adapter), atol=1e-4, rtol=0)
    # the aLoRA call reused the base spans the first generation stored: its invocation only ran
    assert static.generate(ctx, 2, adapter="check").stats.cached_tokens > 0


def test_checks_scores_and_batches_run_on_the_static_executor(tmp_path_factory):
    arch, alora, _ = adapter_pair("llama", tmp_path_factory, "executors-rows", (3, 4))
    eager, static = fresh_runtime(arch, executor="eager"), fresh_runtime(arch, executor="static")
    for rt in (eager, static):
        rt.add_adapter("check", alora, invocation=INVOCATION)
    ctx = Context().append(SYSTEM).append("The answer is forty-two.")
    requirements = ["It is a number.", "It is short.", "It is polite and kind."]
    for reuse in (True, False):
        built = static.engine.static.build_stats.builds
        want = eager.check(ctx, requirements, adapter="check", reuse=reuse)
        got = static.check(ctx, requirements, adapter="check", reuse=reuse)
        assert static.engine.static.build_stats.builds > built or reuse is False  # its steps ran there
        assert {v.stats.executor for v in got} == {"static"} and {v.stats.executor for v in want} == {"eager"}
        assert got[0].stats.static.rows == len(requirements)
        for a, b in zip(got, want):
            assert a.passed == b.passed and abs(a.probability - b.probability) < 1e-4
    candidates = [" yes", " no thanks", " maybe later, friend"]
    for a, b in zip(static.score(ctx, candidates), eager.score(ctx, candidates)):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.token_logprobs, b.token_logprobs)) < 1e-4
    contexts = [ctx.append("Say more."), ctx.append("And then?"), Context().append("Another one entirely.")]
    for reuse in (True, False):
        want = eager.generate_batch(contexts, 6, reuse=reuse)
        got = static.generate_batch(contexts, 6, reuse=reuse)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        assert [r.token_ids for r in got] == [static.generate(c, 6).token_ids for c in contexts]
        assert {r.stats.executor for r in got} == {"static"}


def test_what_runs_eagerly_and_why():  # stop strings run static: test_defects_2
    _, static = runtimes()
    ctx = Context().append(SYSTEM).append("Why?")
    refused = static.generate(ctx, 4, no_repeat_ngram_size=2)
    assert refused.stats.executor == "eager" and "no_repeat_ngram_size" in refused.stats.executor_fallback
    with pytest.raises(ValueError, match="executor is one of"):
        spanctx.Runtime(*tiny_model("llama"), store_bytes=1 << 20, executor="fast")


def test_the_static_buffers_count_against_the_store_budget():
    model, tokenizer = tiny_model("llama")
    eager = spanctx.Runtime(model, tokenizer, store_bytes=64 << 20, executor="eager")
    static = spanctx.Runtime(model, tokenizer, store_bytes=64 << 20, executor="static")
    held = static.engine.static.memory_bytes
    assert held > 0
    assert static.store.stats.bytes_budget == eager.store.stats.bytes_budget - held


def test_min_new_tokens_runs_on_the_static_executor():
    """The benchmarks ask for exactly N tokens: EOS is held back until N are out."""
    eager, static = runtimes()
    ctx = Context().append(SYSTEM).append("Stop early?")
    eos = eager.tokenizer.eos_token_id
    # a processor (run after the built-in ones, as in HF) that makes EOS the best token at
    # every step unless min_new_tokens has masked it: only that delays it
    def eos_first_fn(ids, scores):
        bonus = torch.zeros_like(scores)
        bonus[:, eos] = 1e4
        return scores + bonus

    eos_first = [eos_first_fn]
    want = eager.generate(ctx, 8, min_new_tokens=5, logits_processor=eos_first)
    got = static.generate(ctx, 8, min_new_tokens=5, logits_processor=eos_first)
    assert got.stats.executor == "static"
    assert got.token_ids == want.token_ids and len(got.token_ids) == 6 and got.token_ids[-1] == eos


def test_the_servers_batched_rows_run_on_the_static_executor():
    """The scheduler's batch (a streamer and stop criteria over several rows) is packed."""
    from spanctx.core.options import merge_options
    from spanctx.serve.protocol import GenRequest
    from spanctx.serve.scheduler import Job, Row, run_rows

    texts, ids = {}, {}
    for name, rt in zip(("eager", "static"), runtimes()):
        contexts = [Context().append(SYSTEM).append(q) for q in ("One?", "Two, longer?", "Three")]
        events = [[] for _ in contexts]
        jobs = [Job(sink.append, request=GenRequest(ctx, 4 + i, {}, (), stream=True),
                    opts=merge_options({}, {"max_new_tokens": 4 + i})) for i, (ctx, sink) in enumerate(zip(contexts, events))]
        rows = [Row(job, rt.tokenizer, frozenset({rt.tokenizer.eos_token_id})) for job in jobs]
        built = rt.engine.static.build_stats.builds if rt.engine.static else 0
        run_rows(rt, jobs, rows)
        if rt.engine.static:
            assert rt.engine.static.build_stats.builds > built
        texts[name] = ["".join(e for e in sink if isinstance(e, str)) for sink in events]
        ids[name] = [list(row.ids) for row in rows]
        assert all(0 < len(row.ids) <= 4 + i for i, row in enumerate(rows))  # each row stops at its own limit
    assert ids["static"] == ids["eager"] and texts["static"] == texts["eager"]


def test_the_static_buffers_grow_for_a_long_call_and_the_budget_follows(monkeypatch):
    from spanctx.engine import engine

    monkeypatch.setattr(engine, "STATIC_TOKENS", 256)
    model, tokenizer = tiny_model("llama")
    eager = spanctx.Runtime(model, tokenizer, store_bytes=64 << 20, executor="eager")
    static = spanctx.Runtime(model, tokenizer, store_bytes=64 << 20, executor="static")
    assert static.engine.static.max_tokens == 256
    ctx = Context().append(SYSTEM * 8).append("A long one?")  # ~1,000 tokens: past the buffers
    got, want = static.generate(ctx, 6), eager.generate(ctx, 6)
    assert got.stats.executor == "static" and got.token_ids == want.token_ids
    grown = static.engine.static
    assert grown.max_tokens >= ctx_tokens(static, ctx) + 6
    assert static.store.stats.bytes_budget == eager.store.stats.bytes_budget - grown.memory_bytes
    static.close()
    assert static.store.stats.bytes_budget == eager.store.stats.bytes_budget


def ctx_tokens(rt, ctx) -> int:
    return len(rt.token_ids(ctx))


def test_an_adapter_is_warmed_up_when_added_and_forgotten_when_unloaded(tmp_path_factory):
    """On a warmed-up static executor (CUDA; forced here with graphs off) ``add_adapter``
    builds the adapter's steps, so the first checks and generations with it build none;
    unloading it drops them."""
    arch, alora, _ = adapter_pair("llama", tmp_path_factory, "executors-warm", (5, 6))
    eager, static = fresh_runtime(arch, executor="eager"), fresh_runtime(arch, executor="static", static_tokens=512)
    static.engine._warm = True  # what a CUDA runtime with warm_up=True has
    for rt in (eager, static):
        rt.add_adapter("check", alora, invocation=INVOCATION)
    warm = static.adapter_warm_ups["check"]
    assert warm.builds > 0 and eager.adapter_warm_ups["check"] is None
    ctx = Context().append(SYSTEM).append("The answer is forty-two.")
    for requirements in (["It is a number.", "It is short.", "It is polite and kind."], ["It is a number."] * 7):
        got = static.check(ctx, requirements, adapter="check")
        want = eager.check(ctx, requirements, adapter="check")
        assert got[0].stats.static.builds == 0 and got[0].stats.static.rows == len(requirements)
        assert [v.passed for v in got] == [v.passed for v in want]
    assert static.generate(ctx, 5, adapter="check").stats.static.builds == 0
    static.generate(ctx, 2)  # a base step, which stays
    assert any(key.adapters is not None for key in static.engine.static._steps._built)
    static.unload_adapter("check")
    left = static.engine.static._steps._built
    assert left and all(key.adapters is None for key in left)
    assert "check" not in static.adapter_warm_ups


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_placed_members_rotated_into_the_buffers_equal_eager(arch):
    """Parallel members placed without repair are rotated straight into the static
    buffers (``KVSlice.moved_by``): tokens and logits as eager's, whether the same member
    lands where it lay in the last call (not copied again), elsewhere, or not moved."""
    eager, static = runtimes(arch)
    docs = ["Doc A is about apples. ", "Doc B is on bananas, longer. ", "Doc C: cherries. "]
    orders = [docs, docs, docs[::-1], docs[1:] + docs[:1]]
    for order in orders:
        ctx = Context().append(SYSTEM).parallel(*order).append("Which fruit?")
        want = eager.generate(ctx, 8, repair="none")
        got = static.generate(ctx, 8, repair="none")
        assert got.token_ids == want.token_ids and got.stats.executor == "static"
        assert got.stats.parallel.recomputed_tokens == 0 and got.stats.cached_tokens == want.stats.cached_tokens
        torch.testing.assert_close(static.next_token_logits(ctx, repair="none"),
                                   eager.next_token_logits(ctx, repair="none"), atol=1e-4, rtol=0)


def test_warmed_up_batches_build_nothing_and_equal_eager():
    """``Engine.warm_up_rows`` (a server's start) builds the steps of batches of up to N
    rows: batches of 3 and 8 prompts (decode steps padded to 4 and 8 rows) then build
    nothing, and decode as the eager executor does."""
    model, tokenizer = tiny_model("llama")
    eager = spanctx.Runtime(model, tokenizer, store_bytes=64 << 20, executor="eager")
    static = spanctx.Runtime(model, tokenizer, store_bytes=64 << 20, executor="static", static_tokens=512)
    static.engine._warm = True  # what a CUDA runtime with warm_up=True has
    stats = static.engine.warm_up_rows(range(2, 9))
    assert stats.builds > 0 and eager.engine.warm_up_rows(range(2, 9)) is None
    for count in (3, 8):
        contexts = [Context().append(SYSTEM).append(f"Question {i}?" * (1 + i % 3)) for i in range(count)]
        got = static.generate_batch(contexts, 6)
        assert {r.stats.static.builds for r in got} == {0} and got[0].stats.static.rows == count
        assert [r.token_ids for r in got] == [r.token_ids for r in eager.generate_batch(contexts, 6)]


def test_a_static_batch_counts_every_row_s_reused_tokens():
    """Rows with caches of different depths: the eager left-padded batch recomputes the
    deeper rows' extra cached tokens (``plan_batch``), the static one keeps them all; each
    counts what it kept."""
    base = Context().append(SYSTEM).append("A long shared document about rivers and their floods. " * 3)
    contexts = [base.append("Why?"), Context().append(SYSTEM).append("Something else entirely, then?")]

    def stored():  # row 0's context is stored deep, row 1's only up to SYSTEM
        eager, static = runtimes()
        for rt in (eager, static):
            rt.next_token_logits(base)
            rt.next_token_logits(Context().append(SYSTEM))
        return eager, static

    eager, static = stored()
    want, got = eager.generate_batch(contexts, 4), static.generate_batch(contexts, 4)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    alone = [stored()[1].generate(c, 1).stats.cached_tokens for c in contexts]  # all of each row's cache
    assert [r.stats.cached_tokens for r in got] == alone
    assert want[0].stats.cached_tokens < alone[0]  # the eager batch recomputed part of row 0's cache
