"""Bad input gives clear errors and leaves the store as it was."""

import pytest
import torch
from conftest import tiny_model, tiny_runtime

import spanctx
from spanctx.cache.fingerprint import model_namespace
from spanctx.cache.span_kv import SpanKV
from spanctx.core.keys import span_key
from spanctx.tokenizer import byte_tokenizer


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


# -- typed input checks at the API edge (spanctx/core/inputs.py): each error names the fix ----


def test_context_takes_no_text():
    for bad in ("You are terse.", ["a", "b"]):
        with pytest.raises(TypeError, match=r"Context\(\)\.append\("):
            spanctx.Context(bad)
    with pytest.raises(TypeError):
        spanctx.Context(span="text")


@pytest.mark.parametrize(("content", "hint"), [
    (None, "text .str. or token ids"),
    (3.14, r"str\(\.\.\.\)"),
    ({"role": "user", "content": "hi"}, r"ctx\.message\(role, content\) or ctx\.chat"),
    (["a", "b"], r"ctx\.extend\(texts\).*ctx\.parallel\(\*texts\)"),
    (b"bytes", r"decode\('utf-8'\)"),
    ("a\ud800b", "lone surrogate"),
])
def test_bad_span_content_names_the_fix(content, hint):
    with pytest.raises((TypeError, ValueError), match=hint):
        spanctx.Context().append(content)


def test_lone_surrogates_in_messages_are_refused():
    with pytest.raises(ValueError, match="message content holds a lone surrogate"):
        spanctx.Context.chat([{"role": "user", "content": "hi \udc80"}])


def test_parallel_takes_its_spans_as_arguments():
    with pytest.raises(TypeError, match=r"ctx\.parallel\(\*docs\)"):
        spanctx.Context().append("sys").parallel(["a", "b"])


def test_every_call_takes_a_context_or_a_str_alike():
    """A str is one text span after the root (a raw completion), in every call that takes
    a prompt; anything else is refused with a hint."""
    rt = tiny_runtime()
    as_ctx = spanctx.Context().append("The river rose.")
    text = "The river rose."
    assert rt.token_ids(text) == rt.token_ids(as_ctx)
    assert rt.generate(text, max_new_tokens=3).token_ids == rt.generate(as_ctx, max_new_tokens=3).token_ids
    assert "".join(rt.stream(text, max_new_tokens=3)) == rt.generate(as_ctx, max_new_tokens=3).text
    torch.testing.assert_close(rt.next_token_logits(text), rt.next_token_logits(as_ctx))
    assert rt.score(text, [" yes"]) == rt.score(as_ctx, [" yes"])
    assert [v.passed for v in rt.check(text, ["short"])] == [v.passed for v in rt.check(as_ctx, ["short"])]
    torch.testing.assert_close(rt.hidden_states(text), rt.hidden_states(as_ctx))
    assert rt.generate_batch([text], 3)[0].token_ids == rt.generate(as_ctx, max_new_tokens=3).token_ids
    with pytest.raises(TypeError, match=r"Context\.chat\(messages\)"):
        rt.generate([{"role": "user", "content": "hi"}])
    with pytest.raises(TypeError, match=r"Context\(\)\.append\(ids\)"):
        rt.generate([1, 2, 3])
    with pytest.raises(TypeError, match="takes a Context"):
        rt.score(None, [" yes"])


def test_one_string_where_a_list_is_expected_is_refused():
    rt = tiny_runtime()
    ctx = spanctx.Context().append("text")
    with pytest.raises(TypeError, match=r"generate_batch takes a list, got one string: pass \['hello'\]"):
        rt.generate_batch("hello")
    with pytest.raises(TypeError, match=r"extend takes a list, got one string"):
        ctx.extend("one span per character")
    with pytest.raises(TypeError, match="wrap a single one in a list"):
        rt.score(ctx, " yes")
    with pytest.raises(TypeError, match="wrap a single requirement in a list"):
        rt.check(ctx, "be short")
    assert rt.store.stats.entries == 0


def test_runtime_arguments_are_checked_with_the_fix():
    model, tok = tiny_model("llama")
    with pytest.raises(TypeError, match="model_identity is a non-empty str"):
        spanctx.Runtime(model, tok, model_identity=123)
    with pytest.raises(TypeError, match=r"store_bytes is a number of bytes .int. \(e\.g\. 1 << 30"):
        spanctx.Runtime(model, tok, store_bytes="1GB")
    with pytest.raises(ValueError, match="store_bytes must be >= 0"):
        spanctx.Runtime(model, tok, store_bytes=-1)


def test_seeds_outside_the_range_are_refused():
    rt = tiny_runtime()
    ctx = spanctx.Context().append("text")
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
        rt.generate(ctx, 2, do_sample=True, seed=2**70)
    with pytest.raises(ValueError, match=r"seed must be in"):
        rt.generate(ctx, 2, do_sample=True, seed=-1)
    rt.generate(ctx, 2, do_sample=True, seed=2**64 - 1)  # the top of the range works


def test_stream_refuses_bad_arguments_at_the_call_not_when_iterated():
    rt = tiny_runtime()
    ctx = spanctx.Context().append("text")
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        rt.stream(ctx, max_new_tokens=-5)
    with pytest.raises(TypeError, match="stream takes a Context"):
        rt.stream(3.14)


def test_a_missing_local_model_folder_is_named(tmp_path):
    missing = tmp_path / "models" / "my-model"
    for name in (str(missing), "./no/such/model", "~/no-such-model-folder/x"):
        with pytest.raises(FileNotFoundError, match="no model folder at"):
            spanctx.load_model(name)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="is a file; pass the model's folder"):
        spanctx.load_model(str(tmp_path / "config.json"))


def test_a_truncated_weights_file_names_its_folder(tmp_path):
    import shutil

    folder = tmp_path / "tiny-copy"
    shutil.copytree(spanctx.PRESETS["tiny-trained"].weights_dir, folder)
    byte_tokenizer().save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(OSError, match=f"cannot read the weights in '{folder}'.*truncated or damaged"):
        spanctx.load_model(str(folder), device="cpu")
