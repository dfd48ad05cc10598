"""A salt enters every key: tenants sharing one store never share a span."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import spanctx
from spanctx import Context

CTX = Context().append("System: shared. ").parallel("Doc A. ", "Doc B. ").append("Question?")


def runtimes(*salts):
    model, tokenizer = tiny_model("llama")
    store = spanctx.KVStore(64 << 20)
    return [spanctx.Runtime(model, tokenizer, store=store, salt=salt) for salt in salts]


def test_tenants_never_share_spans_and_each_reuses_its_own():
    a, b, a_again = runtimes("tenant-a", "tenant-b", "tenant-a")
    first = a.generate(CTX, 3)
    assert first.stats.cached_tokens == 0
    assert b.generate(CTX, 3).stats.cached_tokens == 0  # same ids, other tenant: nothing shared
    again = a_again.generate(CTX, 3)
    assert again.stats.cached_tokens > 0 and again.token_ids == first.token_ids
    prompt_a, _ = a.resolve(CTX)
    prompt_b, _ = b.resolve(CTX)
    keys_a = {s.key for s in prompt_a.segments} | {g.key for g in prompt_a.groups}
    keys_b = {s.key for s in prompt_b.segments} | {g.key for g in prompt_b.groups}
    assert not keys_a & keys_b


def test_a_call_salt_overrides_the_runtimes_and_none_is_unsalted():
    plain, = runtimes(None)
    plain.next_token_logits(CTX)
    assert plain.generate(CTX, 2, salt="x").stats.cached_tokens == 0
    assert plain.generate(CTX, 2, salt="x").stats.cached_tokens > 0
    torch.testing.assert_close(plain.next_token_logits(CTX, salt="y"), plain.next_token_logits(CTX), atol=1e-4,
                               rtol=0)
    assert plain.generate_batch([CTX], 2, salt="z")[0].stats.cached_tokens == 0


def test_bad_salts():
    with pytest.raises(ValueError, match="salt"):
        runtimes("")
    plain, = runtimes(None)
    with pytest.raises(ValueError, match="salt"):
        plain.generate(CTX, 2, salt=7)
