"""Bad input gives clear errors and leaves the store as it was."""

import pytest
import torch
from conftest import tiny_model, tiny_runtime

import spanctx
from spanctx.cache.fingerprint import model_namespace
from spanctx.cache.store import SpanKV
from spanctx.core.keys import span_key


def test_empty_spans_are_refused():
    ctx = spanctx.Context()
    with pytest.raises(ValueError, match="empty"):
        ctx.append("")
    with pytest.raises(ValueError, match="empty"):
        ctx.append([])
    with pytest.raises(TypeError):
        ctx.append([1, "2"])
    with pytest.raises(TypeError):
        ctx.append(b"bytes")


def test_generating_from_the_empty_root_is_refused():
    with pytest.raises(ValueError, match="empty"):
        tiny_runtime().generate(spanctx.Context())


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'nope'.*tiny-llama"):
        spanctx.Runtime.from_pretrained("nope")


def test_token_ids_outside_the_vocabulary():
    rt = tiny_runtime()
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        rt.generate(spanctx.Context().append([1, 2, 10**6]))
    assert rt.store.stats.entries == 0


def test_context_longer_than_the_model_positions():
    rt = tiny_runtime("gpt2")  # 4096 absolute positions
    ctx = spanctx.Context().append(list(range(200)) * 20)
    with pytest.raises(ValueError, match="exceeds the model's 4096 positions"):
        rt.generate(ctx, max_new_tokens=200)
    assert rt.store.stats.entries == 0


def test_a_stored_entry_of_another_model_is_detected():
    rt = tiny_runtime("llama", min_reuse_fraction=0)  # reuse the planted one-token span
    ctx = spanctx.Context().append("some shared text").append("tail")
    prompt = rt.resolver.resolve(ctx)
    # plant a span with another model's layout (3 heads) under this model's key
    foreign = SpanKV(tuple(torch.zeros(1, 3, 1, 8) for _ in range(4)), tuple(torch.zeros(1, 3, 1, 8) for _ in range(4)))
    rt.store.put(prompt.segments[0].key, foreign)
    with pytest.raises(spanctx.KVLayoutMismatch, match="does not match this model"):
        rt.generate(ctx, max_new_tokens=2)
    assert all(e.locks == 0 for e in rt.store.index.entries())  # locks released on error


def test_two_models_sharing_a_store_never_share_entries():
    llama, tok = tiny_model("llama")
    qwen, _ = tiny_model("qwen2")
    store = spanctx.KVStore(64 << 20)
    a = spanctx.Runtime(llama, tok, store=store)
    b = spanctx.Runtime(qwen, tok, store=store)
    ctx = spanctx.Context().append("the same text for both")
    a.generate(ctx, max_new_tokens=2)
    assert b.generate(ctx, max_new_tokens=2).stats.cached_tokens == 0
    torch.testing.assert_close(b.next_token_logits(ctx), b.next_token_logits(ctx, reuse=False), atol=1e-4, rtol=0)


def test_same_config_different_weights_get_different_namespaces():
    m1, _ = spanctx.load_preset("tiny-llama", seed=1)
    m2, _ = spanctx.load_preset("tiny-llama", seed=2)
    assert model_namespace(m1) != model_namespace(m2)
    assert model_namespace(m1) != model_namespace(m1, adapter="x")
    assert model_namespace(m1) == model_namespace(m1)


def test_span_keys_depend_on_parent_tokens_and_namespace():
    parent = bytes(16)
    base = span_key(parent, [1, 2, 3], b"ns")
    assert base == span_key(parent, (1, 2, 3), b"ns")
    assert base != span_key(b"\x01" + bytes(15), [1, 2, 3], b"ns")
    assert base != span_key(parent, [1, 2, 4], b"ns")
    assert base != span_key(parent, [1, 2, 3], b"other")
    assert span_key(parent, [1], b"ns") != span_key(parent, [1, 0], b"ns")
    with pytest.raises(ValueError):
        span_key(b"short", [1], b"ns")


def test_store_and_store_bytes_are_exclusive():
    model, tok = tiny_model("llama")
    with pytest.raises(ValueError, match="not both"):
        spanctx.Runtime(model, tok, store_bytes=10, store=spanctx.KVStore(10))


def test_a_zero_budget_store_still_gives_correct_results():
    rt = tiny_runtime("llama", store_bytes=0)
    ctx = spanctx.Context().append("no room at all").append("for anything")
    result = rt.generate(ctx, max_new_tokens=4)
    assert result.stats.cached_tokens == 0 and rt.store.stats.rejected > 0
    assert result.token_ids == rt.generate(ctx, max_new_tokens=4, reuse=False).token_ids
