"""The static executor's ladder of attention lengths, its warm-up and its growth, in fp32.

On CPU graphs are off: a "build" is a bucket's first run (what a GPU captures), counted
in ``build_stats`` the same way, so "nothing built after warm-up" is checked exactly.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_static import (
    ATOL,
    full_logits,
    hf_generate,
    ids_of,
    model_of,
    one,
    options,
    prefix_of,
)

from spanctx.cache.kv import KVSlice
from spanctx.cache.span_kv import SpanKV
from spanctx.engine.static import StaticExecutor
from spanctx.engine.static_layout import GRAPH_TOKENS, SLOT_GRANULE, Row, keep_bucket, pack, rows_bucket
from spanctx.engine.static_warmup import OVERHANG, ladder, rung

STEP_8B = 0.25 * 15.0e9 / 131072  # ATTENTION_RATE x the 8B shape's weights read per step / KV bytes per slot


@given(top=st.integers(1, 600).map(lambda n: n * SLOT_GRANULE), step=st.floats(0, 1e6), padding=st.floats(0.01, 1),
       slots=st.integers(1, 600 * SLOT_GRANULE))
def test_the_ladder_bounds_padding_by_the_cost_model(top, step, padding, slots):
    lengths = ladder(top, step, padding)
    assert list(lengths) == sorted(set(lengths)) and lengths[-1] == top
    assert all(length % SLOT_GRANULE == 0 for length in lengths)
    if slots <= top:
        length = rung(lengths, slots)
        assert length >= slots and length == min(x for x in lengths if x >= slots)
        # a step over the rung costs at most `padding` more than over `slots` (+ one granule of rounding)
        assert length - slots <= padding * (step + slots) + SLOT_GRANULE
    else:
        with pytest.raises(ValueError, match="exceed"):
            rung(lengths, slots)


def test_the_8b_shape_gets_a_few_rungs():
    assert len(ladder(16384 + OVERHANG, STEP_8B)) == 5 and len(ladder(131072 + OVERHANG, STEP_8B)) < 20
    assert ladder(16384 + OVERHANG, STEP_8B)[0] == 3072  # a tenth of STEP_8B, in granules


def single_row_calls(max_tokens: int):
    """(prompt, tail_start, new tokens) of single-row calls over every rung, with short and
    long tails, ending at the buffers' last slot too."""
    for prompt in (3, 40, 255, 257, 300, 511, 600, 767, max_tokens - 1):
        for tail in (1, 2, 17, 200, 257, 512, 700):
            if tail < prompt:
                yield prompt, prompt - tail, min(3, max_tokens - prompt)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_after_warm_up_single_row_calls_build_nothing_and_match(arch):
    model = model_of(arch)
    cold, warm = StaticExecutor(model, max_tokens=768), StaticExecutor(model, max_tokens=768)
    stats = warm.warm_up()
    assert stats.lengths == warm.ladder and stats.builds == warm.build_stats.builds > 0
    assert stats.calls <= len(warm.ladder) * 6 and stats.seconds >= stats.build_seconds >= 0
    assert warm.warm_up().builds == 0  # a second warm-up finds everything built
    built = warm.build_stats
    for prompt, tail_start, new in single_row_calls(warm.max_tokens):
        ids = ids_of(prompt, seed=prompt + tail_start)
        prefix = prefix_of(model, ids, tail_start) if tail_start else []
        out = warm.forward(one(prefix, ids, tail_start))
        torch.testing.assert_close(out.logits.float(), full_logits(model, ids, 1), atol=ATOL, rtol=0)
        got = warm.generate(one(prefix, ids, tail_start), options=options(max_new_tokens=new))
        want = cold.generate(one(prefix, ids, tail_start), options=options(max_new_tokens=new))
        assert got.sequences.tolist() == want.sequences.tolist()
        assert (out.stats.builds, got.stats.builds) == (0, 0), (prompt, tail_start, new)
    assert warm.build_stats == built
    assert cold.build_stats.builds > 0  # the same calls did build on the executor without warm-up


def test_a_bucket_the_warm_up_left_out_is_built_by_its_call():
    model = model_of("llama")
    ex = StaticExecutor(model, max_tokens=256)
    ex.warm_up()
    ids = ids_of(60, seed=3)
    out = ex.forward(one(prefix_of(model, ids, 40), ids, 40), logits_to_keep=3)  # keeps 3 logits: not warmed
    assert out.stats.builds == 1
    torch.testing.assert_close(out.logits.float(), full_logits(model, ids, 3), atol=ATOL, rtol=0)


def test_warm_up_leaves_out_what_the_executor_refuses():
    model = model_of("llama")
    ex = StaticExecutor(model, max_tokens=512)
    ex.max_mask_bytes = 64 << 10  # long padded tails over long lengths: refused, not built
    stats = ex.warm_up()
    assert stats.refused > 0 and stats.calls > 0
    ids = ids_of(300, seed=4)
    assert "attention masks" in ex.refuses_rows(one(prefix_of(model, ids, 10), ids, 10))


def test_grow_reallocates_and_counts_its_bytes():
    model = model_of("llama")
    ex = StaticExecutor(model, max_tokens=256)
    small = ex.memory_bytes
    ex.warm_up()
    ids = ids_of(700, seed=6)
    assert "buffers hold 256" in ex.refuses_rows(one(prefix_of(model, ids, 650), ids, 650), new_tokens=4)
    predicted = ex.grow_bytes(700)
    assert ex.grow(700) == predicted == ex.memory_bytes > small
    assert ex.max_tokens == 768 and ex.ladder[-1] == 768 + OVERHANG == ex.buffers.max_tokens
    assert ex.build_stats.builds == 0  # graphs of the old buffers are gone
    assert ex.grow(300) == predicted and ex.grow_bytes(300) == predicted  # holds that many already: no-op
    assert ex.refuses_rows(one(prefix_of(model, ids, 650), ids, 650), new_tokens=4) is None
    out = ex.forward(one(prefix_of(model, ids, 650), ids, 650))
    torch.testing.assert_close(out.logits.float(), full_logits(model, ids, 1), atol=ATOL, rtol=0)
    ex.warm_up()
    before = ex.build_stats
    got = ex.generate(one(prefix_of(model, ids, 690), ids, 690), options=options(max_new_tokens=4))
    assert got.stats.builds == 0 and ex.build_stats == before
    assert got.sequences.tolist() == hf_generate(model, ids, max_new_tokens=4, do_sample=False).tolist()


def test_warm_up_builds_every_bucket_some_single_row_call_reaches():
    """Every (prompt, tail, new tokens) up to max_tokens, by the executor's own bucket rule,
    on a ladder with wide rungs (so that rungs are reached through the padded tails' overhang)."""
    model = model_of("llama")
    ex = StaticExecutor(model, max_tokens=768)
    ex.ladder = (256, 512, ex.buffers.max_tokens)
    ex.warm_up()
    built = {(key.tokens, key.length) for key in ex._steps._built}
    kv = SpanKV(*([k[:, :, :1].expand(1, -1, ex.max_tokens, -1) for k in ex.buffers.keys] for _ in "kv"))
    ids = torch.zeros(ex.max_tokens, dtype=torch.long)
    needed = set()
    for prompt in range(1, ex.max_tokens + 1):
        for tail_start in range(max(0, prompt - GRAPH_TOKENS), prompt):
            packing = pack([Row(ids[:prompt], [KVSlice(kv, 0, tail_start)] if tail_start else [], tail_start)])
            tokens, length = ex._buckets(packing, 0)  # forward
            needed.add((tokens, length))
            if prompt < ex.max_tokens:  # generate: 1 new token (no decode step), then 2 or more
                for new_from in (1, 2):
                    low = ex._buckets(packing, new_from)[1]
                    high = ex._buckets(packing, ex.max_tokens - prompt)[1]
                    reached = {rung for rung in ex.ladder if low <= rung <= high}
                    needed |= {(tokens, rung) for rung in reached} if new_from == 1 else {(1, r) for r in reached}
    assert needed <= built


def test_warm_up_shows_a_bar_only_when_asked(capsys):
    ex = StaticExecutor(model_of("llama"), max_tokens=256)
    ex.warm_up(bar=False)
    assert "capturing step graphs" not in capsys.readouterr().err
    ex.warm_up(bar=True)
    assert "capturing step graphs" in capsys.readouterr().err


@pytest.mark.parametrize("count", [2, 3, 8])
def test_warm_up_of_n_rows_builds_every_bucket_their_calls_reach(count):
    """Every call of ``count`` rows over one shared prefix (its length, the rows' tail
    tokens, new tokens per row), by the executor's own bucket rule."""
    model = model_of("llama")
    ex = StaticExecutor(model, max_tokens=512)
    ex.ladder = (256, 512, ex.buffers.max_tokens)  # the top rung is reached through the padding only
    ex.warm_up(rows=(count,))
    built = {(key.tokens, key.length, key.keep) for key in ex._steps._built}
    kv = SpanKV(*([k[:, :, :1].expand(1, -1, ex.max_tokens, -1) for k in ex.buffers.keys] for _ in "kv"))
    ids = torch.zeros(ex.max_tokens, dtype=torch.long)
    needed = set()
    for prefix in range(ex.max_tokens):
        pieces = [KVSlice(kv, 0, prefix)] if prefix else []
        for tail in range(count, min(GRAPH_TOKENS, ex.max_tokens - prefix) + 1):
            tails = [tail // count + (r < tail % count) for r in range(count)]
            packing = pack([Row(ids[:prefix + t], pieces, prefix) for t in tails])
            tokens, length = ex._buckets(packing, 0)  # forward
            needed.add((tokens, length, keep_bucket(count)))
            most = (ex.max_tokens - prefix - tail) // count  # new tokens per row that fit
            for new_from in (1, 2)[:most]:  # generate: 1 new token (no decode step), then 2 or more
                reached = {r for r in ex.ladder
                           if ex._buckets(packing, new_from)[1] <= r <= ex._buckets(packing, most)[1]}
                # the tail's bucket, or the decode step's (one token and one logit row per row)
                step = (tokens, keep_bucket(count)) if new_from == 1 else (rows_bucket(count),) * 2
                needed |= {(step[0], r, step[1]) for r in reached}
    assert needed <= built


@pytest.mark.parametrize("lengths", [(5, 12, 30), (3, 9, 4, 7, 11, 2, 6, 8, 5, 10)])
def test_after_a_tail_warm_up_of_two_rows_check_like_calls_of_any_count_build_nothing_and_match(lengths):
    """Tail steps of 2..MAX_ROWS rows share buckets (``keep_bucket``): one warm-up of two
    rows without decoding covers 3 requirements and 10 alike."""
    model = model_of("qwen2")
    ex = StaticExecutor(model, max_tokens=256)
    stats = ex.warm_up(rows=(2,), decode=False)
    assert stats.builds > 0 and all(key.tokens > 2 and key.keep == keep_bucket(2) for key in ex._steps._built)
    context = ids_of(40, seed=7)
    prompts = [torch.cat([context, ids_of(n, seed=n)], dim=1) for n in lengths]  # one row per requirement
    prefix = prefix_of(model, prompts[0], 40)
    out = ex.forward([Row(p[0], prefix, 40) for p in prompts])
    assert out.stats.builds == 0 and out.logits.shape[0] == len(lengths)
    for r, p in enumerate(prompts):
        torch.testing.assert_close(out.logits[r].float(), full_logits(model, p, 1)[0], atol=ATOL, rtol=0)


def test_keep_and_row_buckets():
    assert [keep_bucket(k) for k in (1, 2, 10, 64, 65, 200)] == [1, 64, 64, 64, 128, 256]
    assert [rows_bucket(r) for r in (1, 2, 3, 5, 8, 33, 64)] == [1, 2, 4, 8, 8, 64, 64]
