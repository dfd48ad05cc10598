"""generate_batch: one left-padded batch, each row reusing its own spans, equal to singles."""

import pytest
from conftest import tiny_runtime
from hypothesis import given
from hypothesis import strategies as st

from spanctx import Context
from spanctx.core.batch_layout import plan_batch
from spanctx.features.batch import shared_prefixes

SHARED = Context().append("A shared system prompt that crosses the window. ")


def mixed_rows(rt):
    """Rows in every cache state: shared prefix stored, fully stored, fully stored plus a
    new span, cold, a chat conversation, and a plain string."""
    full = SHARED.append("Fully stored question?")
    rt.generate(full, max_new_tokens=1)
    return [
        SHARED.append("A new question, longer than the others in this batch?"),
        full,
        full.append(" And a follow-up."),
        Context().append("cold, nothing stored"),
        Context.chat([{"role": "user", "content": "chat row"}], system="terse"),
        "a plain string, completed raw",
    ]


def as_context(row):
    return Context().append(row) if isinstance(row, str) else row


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma2", "gemma3", "gpt2"])
def test_batch_equals_one_generate_per_row(arch):
    rt = tiny_runtime(arch)
    rows = mixed_rows(rt)
    batch = rt.generate_batch(rows, max_new_tokens=6)
    fresh = tiny_runtime(arch)
    for row, result in zip(rows, batch):
        single = fresh.generate(as_context(row), max_new_tokens=6, reuse=False)
        assert result.token_ids == single.token_ids
        assert result.text == single.text
        assert result.stats.prompt_tokens == len(rt.token_ids(as_context(row)))
        assert result.stats.cached_tokens + result.stats.computed_tokens == result.stats.prompt_tokens
    # the batch stored every row: each is now reused whole, alone or batched again
    for row in rows:
        assert rt.generate(as_context(row), max_new_tokens=1).stats.computed_tokens == 1
    again = rt.generate_batch(rows, max_new_tokens=6)
    assert [r.token_ids for r in again] == [r.token_ids for r in batch]
    assert [r.stats.computed_tokens for r in again] == [1] * len(rows)


def test_reuse_per_row_follows_the_layout():
    rt = tiny_runtime("llama")
    short = SHARED.append("short?")
    long = SHARED.append("a much longer question than the short one?")
    rt.generate(SHARED.append("warm"), max_new_tokens=1)  # stores the shared prefix
    results = rt.generate_batch([short, long], max_new_tokens=2)
    shared, n_short, n_long = (len(rt.token_ids(c)) for c in (SHARED, short, long))
    # the longest row sets the cached width: it keeps its whole stored prefix
    assert results[1].stats.cached_tokens == shared
    # the short row is left-padded by the difference and recomputes that much of its prefix
    assert results[0].stats.cached_tokens == shared - (n_long - n_short)
    assert results[0].stats.computed_tokens == n_short - results[0].stats.cached_tokens


def test_a_cold_shared_prefix_is_computed_once_for_the_whole_batch():
    rt, fresh = tiny_runtime("mistral"), tiny_runtime("mistral")
    rows = [SHARED.append(f"question {i}?") for i in range(3)]  # equal lengths: no padding
    results = rt.generate_batch(rows, max_new_tokens=4)
    shared, question = len(rt.token_ids(SHARED)), len("question 0?")
    assert results[0].stats.computed_tokens == shared + question  # the first row pays for the prefix
    for result in results[1:]:
        assert (result.stats.cached_tokens, result.stats.computed_tokens) == (shared, question)
    assert [r.token_ids for r in results] == [fresh.generate(r, max_new_tokens=4, reuse=False).token_ids
                                              for r in rows]


def test_shared_prefixes():
    x = Context().append("x")
    xy = x.append("y")
    rows = [xy.append("z1"), xy.append("z2"), x.append("w"), Context().append("v"), xy.append("z1")]
    assert shared_prefixes(rows) == [(0, xy.append("z1")), (1, xy), (2, x)]
    assert shared_prefixes([x, Context().append("v")]) == []


def test_reuse_false_batch_equals_singles_and_leaves_the_store_alone():
    rt = tiny_runtime("gemma3")
    rows = ["first prompt", "the second prompt is longer", SHARED.append("third")]
    batch = rt.generate_batch(rows, max_new_tokens=5, reuse=False)
    assert [r.token_ids for r in batch] == [rt.generate(as_context(r), max_new_tokens=5, reuse=False).token_ids
                                            for r in rows]
    assert rt.store.stats.entries == 0
    assert all(r.stats.cached_tokens == 0 for r in batch)


def test_rows_stop_at_their_own_eos():
    rt = tiny_runtime("llama")
    rows = ["stop early", "keep going for a while"]
    first = rt.generate(as_context(rows[0]), max_new_tokens=8).token_ids
    eos = first[2]  # make the third token of row 0 its end of sequence
    singles = [rt.generate(as_context(r), max_new_tokens=8, eos_token_id=eos).token_ids for r in rows]
    batch = rt.generate_batch(rows, max_new_tokens=8, eos_token_id=eos)
    assert [r.token_ids for r in batch] == singles
    assert batch[0].token_ids[-1] == eos and len(batch[0].token_ids) <= 3


def test_seeded_sampling_in_a_batch_is_reproducible():
    rt = tiny_runtime("llama")
    rows = ["sample me", "and me too"]
    one = rt.generate_batch(rows, max_new_tokens=8, temperature=1.0, seed=3)
    two = rt.generate_batch(rows, max_new_tokens=8, temperature=1.0, seed=3)
    assert [r.token_ids for r in one] == [r.token_ids for r in two]


def test_bad_batches():
    rt = tiny_runtime("llama")
    assert rt.generate_batch([]) == []
    with pytest.raises(TypeError, match=r"generate_batch takes a Context \(or a str\)"):
        rt.generate_batch([[1, 2, 3]])
    with pytest.raises(ValueError, match="stop_strings"):
        rt.generate_batch(["a"], stop_strings=["b"])
    with pytest.raises(ValueError, match="empty"):
        rt.generate_batch([Context()])


@given(st.lists(st.tuples(st.integers(1, 50), st.integers(0, 49)), min_size=1, max_size=8))
def test_the_layout_keeps_as_much_cache_as_any_layout_can(rows):
    prompts = [n for n, _ in rows]
    cached = [min(c, n - 1) for n, c in rows]
    layout = plan_batch(prompts, cached)
    assert layout.width == max(prompts)
    for n, c, pad, kept in zip(prompts, cached, layout.pads, layout.kept):
        assert pad == layout.width - n
        assert kept == max(0, layout.cached_width - pad) <= c  # a row keeps only what it has
    # one slot more and some row would need a token it has no cache for
    assert any(layout.cached_width + 1 - pad > c for c, pad in zip(cached, layout.pads))
    # the final call is as short as the longest uncached tail
    assert layout.width - layout.cached_width == max(n - c for n, c in zip(prompts, cached))


def test_bad_layouts():
    with pytest.raises(ValueError):
        plan_batch([3], [3])  # a row must leave one token uncached
    with pytest.raises(ValueError):
        plan_batch([], [])
