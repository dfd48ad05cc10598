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


def test_what_runs_eagerly_and_why(tmp_path_factory):
    _, static = runtimes()
    ctx = Context().append(SYSTEM).append("Why?")
    scored = static.generate(ctx, 4, output_scores=True)
    assert scored.stats.executor == "eager" and "scores" in scored.stats.executor_fallback
    arch, alora, _ = adapter_pair("llama", tmp_path_factory, "executors", (1, 2))
    rt = fresh_runtime(arch, executor="static")
    rt.add_adapter("check", alora, invocation=INVOCATION)
    adapted = rt.generate(ctx, 4, adapter="check")
    assert adapted.stats.executor == "eager" and "adapter" in adapted.stats.executor_fallback
    with pytest.raises(ValueError, match="executor is one of"):
        spanctx.Runtime(*tiny_model("llama"), store_bytes=1 << 20, executor="fast")


def test_the_static_buffers_count_against_the_store_budget():
    model, tokenizer = tiny_model("llama")
    eager = spanctx.Runtime(model, tokenizer, store_bytes=64 << 20, executor="eager")
    static = spanctx.Runtime(model, tokenizer, store_bytes=64 << 20, executor="static")
    held = static.engine.static.memory_bytes
    assert held > 0
    assert static.store.stats.bytes_budget == eager.store.stats.bytes_budget - held
