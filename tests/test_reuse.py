"""Exact span reuse equals full prefill of the same token ids, on every tiny architecture."""

import pytest
import torch
from conftest import ARCHS, tiny_runtime
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import span_trees

import spanctx

ATOL = 1e-4


def full_prefill_logits(rt: spanctx.Runtime, ctx: spanctx.Context) -> torch.Tensor:
    """The oracle: a plain HF forward over the prompt ids, no cache of ours involved."""
    ids = torch.tensor([rt.token_ids(ctx)])
    with torch.inference_mode():
        return rt.model(input_ids=ids).logits[0, -1].float()


@pytest.mark.parametrize("arch", list(ARCHS))
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees=span_trees(max_nodes=6, max_len=14), data=st.data())
def test_every_path_of_a_random_tree_matches_full_prefill(arch, trees, data):
    rt = tiny_runtime(arch)
    order = data.draw(st.permutations(trees))
    for ctx in order:
        reused = rt.next_token_logits(ctx)
        torch.testing.assert_close(reused, full_prefill_logits(rt, ctx), atol=ATOL, rtol=0)
        torch.testing.assert_close(reused, rt.next_token_logits(ctx, reuse=False), atol=ATOL, rtol=0)
    # a second pass over the tree: every span is stored, only the last token is recomputed
    for ctx in order:
        result = rt.generate(ctx, max_new_tokens=4)
        assert result.stats.computed_tokens == 1
        assert result.stats.cached_tokens == len(rt.token_ids(ctx)) - 1
        assert result.token_ids == rt.generate(ctx, max_new_tokens=4, reuse=False).token_ids


@pytest.mark.parametrize("arch", list(ARCHS))
def test_siblings_share_the_parent_and_compute_only_their_own_span(arch):
    rt = tiny_runtime(arch)
    shared = spanctx.Context().append("A long shared system prompt, " * 3)  # crosses the window of 16
    first = shared.append("first question?")
    second = shared.append("a second, different question?")
    assert rt.generate(first, max_new_tokens=5).stats.cached_tokens == 0
    result = rt.generate(second, max_new_tokens=5)
    assert result.stats.cached_tokens == len(rt.token_ids(shared))  # BOS + the shared span
    assert result.stats.computed_tokens == len("a second, different question?")
    assert result.token_ids == rt.generate(second, max_new_tokens=5, reuse=False).token_ids


def test_reuse_false_neither_reads_nor_writes_the_store():
    rt = tiny_runtime("llama")
    ctx = spanctx.Context().append("hello there").append("general")
    rt.generate(ctx, max_new_tokens=3, reuse=False)
    rt.next_token_logits(ctx, reuse=False)
    stats = rt.store.stats
    assert stats.entries == stats.hits == stats.misses == 0


def test_a_stored_span_is_reused_after_its_parent_was_evicted():
    rt = tiny_runtime("llama")
    a = spanctx.Context().append("parent span text")
    b = a.append("child span text")
    rt.next_token_logits(b)
    parent_key = rt.resolver.resolve(a).segments[-1].key
    rt.store.index.remove(parent_key)
    rt.store._payloads.pop(parent_key)
    c = b.append("grandchild")
    result = rt.generate(c, max_new_tokens=4)
    # the parent is recomputed before the stored child; the child and BOS are reused
    assert result.stats.computed_tokens == len("parent span text") + len("grandchild")
    assert result.token_ids == rt.generate(c, max_new_tokens=4, reuse=False).token_ids
    torch.testing.assert_close(rt.next_token_logits(c), full_prefill_logits(rt, c), atol=ATOL, rtol=0)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees=span_trees(max_nodes=8, max_len=20), budget_tokens=st.integers(0, 60))
def test_eviction_pressure_never_changes_results(trees, budget_tokens):
    # tiny-llama: 4 layers * (k, v) * 2 heads * 32 dims * 4 bytes = 2 KiB per token
    rt = tiny_runtime("llama", store_bytes=budget_tokens * 2048)
    for ctx in trees + trees[::-1]:
        torch.testing.assert_close(rt.next_token_logits(ctx), full_prefill_logits(rt, ctx), atol=ATOL, rtol=0)
        assert rt.store.stats.bytes_used <= rt.store.stats.bytes_budget


def test_stream_yields_the_generated_text():
    rt = tiny_runtime("qwen2")
    ctx = spanctx.Context().append("Stream this: ").append("a b c")
    expected = rt.generate(ctx, max_new_tokens=12, reuse=False).text
    assert "".join(rt.stream(ctx, max_new_tokens=12)) == expected
    assert "".join(rt.stream(ctx, max_new_tokens=12)) == expected  # now from the store


def test_sampling_kwargs_pass_through():
    rt = tiny_runtime("llama")
    ctx = spanctx.Context().append("sample after this")
    torch.manual_seed(1)
    a = rt.generate(ctx, max_new_tokens=8, do_sample=True, temperature=1.5, top_k=50)
    torch.manual_seed(1)
    b = rt.generate(ctx, max_new_tokens=8, reuse=False, do_sample=True, temperature=1.5, top_k=50)
    stops = rt.model.generation_config.eos_token_id  # EOS and the chat template's turn end
    assert a.token_ids == b.token_ids and (len(a.token_ids) == 8 or a.token_ids[-1] in stops)
