"""Defects found where features meet (issue: one execution engine). Each test failed
before the engine existed: features then ran the model and wrote the store their own way."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import tiny_model, tiny_runtime
from transformers import LogitsProcessor, LogitsProcessorList

import spanctx
from spanctx import Context

ATOL = 1e-4
SYSTEM = "You answer from the documents. "
DOC_A = "Doc A: the river rose two metres overnight. "
DOC_B = "Doc B: the north gauge was cleaned on Monday. "
QUESTION = "Question: what happened to the river?"


def parallel_context() -> Context:
    return Context().append(SYSTEM).parallel(DOC_A, DOC_B).append(QUESTION)


def test_mean_hidden_states_do_not_poison_the_parallel_store():
    """1. A mean embedding runs a plain causal forward: it must not be stored under the
    parallel members' keys."""
    rt = tiny_runtime()
    ctx = parallel_context()
    rt.hidden_states(ctx, reduction="mean")
    after = rt.next_token_logits(ctx)
    fresh = tiny_runtime().next_token_logits(ctx)
    torch.testing.assert_close(after, fresh, atol=ATOL, rtol=0)


def test_batch_rows_with_parallel_groups_count_their_cached_tokens():
    """2. Rows with parallel groups report what they reused, as they do alone."""
    rt = tiny_runtime()
    rows = [parallel_context(), Context().append(SYSTEM).parallel(DOC_B, DOC_A).append("Question: the gauge?")]
    singles = [rt.generate(row, 4) for row in rows]  # fills the store
    alone = [rt.generate(row, 4).stats.cached_tokens for row in rows]
    batch = rt.generate_batch(rows, 4)
    assert all(n > 0 for n in alone)
    assert [r.stats.cached_tokens for r in batch] == alone
    assert [r.token_ids for r in batch] == [s.token_ids for s in singles]


def test_chat_then_parallel_documents():
    """3. A chat prefix followed by a parallel group resolves (it raised TypeError)."""
    rt = tiny_runtime()
    ctx = (Context().chat([{"role": "system", "content": "Answer from the documents."}])
           .parallel(DOC_A, DOC_B).append(QUESTION))
    ids = rt.token_ids(ctx)
    plain = rt.token_ids(Context().chat([{"role": "system", "content": "Answer from the documents."}])
                         .append(DOC_A).append(DOC_B).append(QUESTION))
    assert ids == plain  # same ids as the sequential layout of the same spans
    first = rt.generate(ctx, 4, repair="full")
    again = rt.generate(ctx, 4, repair="full")
    assert again.stats.cached_tokens > 0
    assert first.token_ids == again.token_ids == rt.generate(ctx, 4, reuse=False).token_ids


def test_batch_over_a_shared_prefix_that_holds_a_parallel_group():
    """4. Rows sharing a prefix with a parallel group batch with reuse (it raised)."""
    rt = tiny_runtime()
    shared = Context().append(SYSTEM).parallel(DOC_A, DOC_B)
    rows = [shared.append(QUESTION), shared.append("Question: which gauge?")]
    batch = rt.generate_batch(rows, 4)
    assert [r.token_ids for r in batch] == [rt.generate(row, 4).token_ids for row in rows]
    assert batch[1].stats.cached_tokens > 0


def test_models_that_differ_in_a_middle_layer_never_share_kv():
    """5. A change in a middle layer gives another namespace: no KV is shared."""
    base, tokenizer = tiny_model("llama")
    import copy

    merged = copy.deepcopy(base)
    with torch.no_grad():
        merged.model.layers[1].self_attn.v_proj.weight[3, 5] += 0.5
    store = spanctx.KVStore(64 << 20)
    rt_base = spanctx.Runtime(base, tokenizer, store=store)
    rt_merged = spanctx.Runtime(merged, tokenizer, store=store)
    assert rt_base.namespace != rt_merged.namespace
    # an explicit identity is the user's promise instead: no weight is read
    assert spanctx.Runtime(merged, tokenizer, store=store, model_identity="merged-v1").namespace not in (
        rt_base.namespace, rt_merged.namespace)
    ctx = Context().append(SYSTEM).append(DOC_A).append(QUESTION)
    rt_base.next_token_logits(ctx)
    logits = rt_merged.next_token_logits(ctx)
    torch.testing.assert_close(logits, rt_merged.next_token_logits(ctx, reuse=False), atol=ATOL, rtol=0)


def test_a_seeded_batch_is_reproducible_while_another_thread_samples():
    """6. The seed is set under the runtime's lock: another thread's sampling between
    seeding and generating cannot move the RNG."""
    rt = tiny_runtime()
    rows = [parallel_context(), Context().append(SYSTEM).append(QUESTION)]
    expected = [r.token_ids for r in rt.generate_batch(rows, 12, do_sample=True, seed=7)]
    stop = threading.Event()

    def noise():
        while not stop.is_set():
            rt.generate(Context().append("noise "), 2, do_sample=True)

    worker = threading.Thread(target=noise)
    worker.start()
    try:
        for _ in range(4):
            assert [r.token_ids for r in rt.generate_batch(rows, 12, do_sample=True, seed=7)] == expected
    finally:
        stop.set()
        worker.join()


@pytest.mark.parametrize("reuse", [True, False])
def test_several_return_sequences_are_refused_clearly(reuse):
    """7. num_return_sequences > 1 crashed (cached prefix) or silently returned one
    sequence (reuse=False): refused on every path, with the way to do it."""
    rt = tiny_runtime()
    ctx = Context().append(SYSTEM).append(QUESTION)
    rt.generate(ctx, 2)
    calls = [lambda: rt.generate(ctx, 4, reuse=reuse, do_sample=True, num_return_sequences=3),
             lambda: list(rt.stream(ctx, 4, reuse=reuse, do_sample=True, num_return_sequences=3)),
             lambda: rt.generate_batch([ctx], 4, reuse=reuse, do_sample=True, num_return_sequences=3)]
    for call in calls:
        with pytest.raises(ValueError, match="num_return_sequences.*generate_batch"):
            call()


def test_beam_search_is_refused_clearly_and_greedy_needs_no_streamer():
    """8. num_beams > 1 was refused by transformers (spanctx always passed a streamer):
    spanctx refuses it itself, on every path, saying why."""
    rt = tiny_runtime()
    ctx = Context().append(SYSTEM).append(QUESTION)
    for reuse in (True, False):
        with pytest.raises(ValueError, match="spanctx does not run beam search"):
            rt.generate(ctx, 4, reuse=reuse, num_beams=2)
    with pytest.raises(ValueError, match="spanctx does not run beam search"):
        rt.generate_batch([ctx], 4, num_beams=2)
    result = rt.generate(ctx, 4)  # TTFT is still measured without a streamer
    assert 0 < result.stats.ttft_s <= result.stats.total_s


class SpacesOnly(LogitsProcessor):
    """Forces a space every step (so the text streamer hands out a piece per token) and
    counts the steps that ran."""

    def __init__(self, space: int) -> None:
        self.space, self.steps = space, 0

    def __call__(self, input_ids, scores):
        self.steps += 1
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.space] = 0
        return forced


def test_closing_a_stream_early_stops_generation():
    """9. Leaving a sync stream stops the generation within a step and frees the lock."""
    rt = tiny_runtime()
    ctx = Context().append(SYSTEM).append(QUESTION)
    spaces = SpacesOnly(rt.tokenizer(" ", add_special_tokens=False)["input_ids"][0])
    pieces = rt.stream(ctx, 500, logits_processor=LogitsProcessorList([spaces]))
    next(pieces)
    next(pieces)
    pieces.close()
    rt.generate(ctx, 1)  # needs the lock: the closed stream's generation has ended
    assert spaces.steps < 20
