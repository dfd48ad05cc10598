"""Scoring, ranking and hidden states against direct full forwards of the same ids."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import tiny_runtime

import spanctx

CANDIDATES = [" four", " 4", " five hundred and six", "x", [65, 66, 67]]
SYSTEM = "You are a careful assistant. " * 2


def context() -> spanctx.Context:
    # 90+ tokens: crosses the tests' sliding window of 16
    return spanctx.Context().extend([SYSTEM, "Question: what is two plus two?", " Answer:"])


def full_logprobs(rt: spanctx.Runtime, ids: list[int]) -> torch.Tensor:
    """``[S, V]`` log-softmax of one ordinary forward over ``ids`` (fp32)."""
    with torch.no_grad():
        return torch.log_softmax(rt.model(torch.tensor([ids])).logits[0].float(), dim=-1)


@contextlib.contextmanager
def count_model_tokens(rt: spanctx.Runtime):
    """Within the block, the yielded list collects the token count of each model forward."""
    counts: list[int] = []
    hook = rt.model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: counts.append(args[0].numel()))
    try:
        yield counts
    finally:
        hook.remove()


def test_score_matches_a_direct_log_softmax(arch):
    rt = tiny_runtime(arch)
    ctx = context()
    rt.generate(spanctx.Context().extend([SYSTEM, "another question"]), max_new_tokens=1)  # stores SYSTEM
    scores = rt.score(ctx, CANDIDATES)
    n = len(rt.token_ids(ctx))
    for candidate, score in zip(CANDIDATES, scores):
        # the candidate is tokenized as a span after the context
        ids = rt.token_ids(ctx.append(candidate))
        assert list(score.token_ids) == ids[n:]
        ref = full_logprobs(rt, ids)
        expected = torch.tensor([ref[n - 1 + j, ids[n + j]] for j in range(len(ids) - n)])
        torch.testing.assert_close(torch.tensor(score.token_logprobs), expected, atol=1e-4, rtol=0)
        assert score.logprob == pytest.approx(expected.sum().item(), abs=1e-3)
        assert score.mean_logprob == pytest.approx(expected.mean().item(), abs=1e-4)
    for score, plain in zip(scores, rt.score(ctx, CANDIDATES, reuse=False)):
        assert score.token_ids == plain.token_ids
        torch.testing.assert_close(torch.tensor(score.token_logprobs), torch.tensor(plain.token_logprobs),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_score_computes_the_context_once(arch):
    rt = tiny_runtime(arch)
    ctx = context()
    n = len(rt.token_ids(ctx))
    with count_model_tokens(rt) as counts:
        scores = rt.score(ctx, CANDIDATES)
    widest = max(len(s.token_ids) for s in scores) - 1
    # one forward for the whole context, one batched forward for the candidates of more
    # than one token (a one-token candidate's log-probability comes from the context's)
    rows = sum(len(s.token_ids) > 1 for s in scores)
    assert counts == [n, rows * widest]
    assert rt.store.stats.stored_tokens == n
    with count_model_tokens(rt) as counts:
        again = rt.score(ctx, CANDIDATES)
    assert counts == [1, rows * widest]  # the stored context is reused
    assert [s.token_ids for s in again] == [s.token_ids for s in scores]
    with count_model_tokens(rt) as counts:
        chunked = rt.score(ctx, CANDIDATES, batch_size=2)  # batches of 2, 2 and 1 candidates
    assert len(counts) == 1 + 3
    for a, b in zip(chunked, scores):
        torch.testing.assert_close(torch.tensor(a.token_logprobs), torch.tensor(b.token_logprobs), atol=1e-5, rtol=0)


def test_single_token_candidates_need_no_batch_forward():
    rt = tiny_runtime("llama")
    with count_model_tokens(rt) as counts:
        scores = rt.score(context(), ["a", "b"])
    assert len(counts) == 1 and all(len(s.token_ids) == 1 for s in scores)
    logprobs = torch.log_softmax(rt.next_token_logits(context()), dim=-1)
    for score in scores:
        assert score.logprob == pytest.approx(logprobs[score.token_ids[0]].item(), abs=1e-5)


def test_rank_orders_best_first():
    rt = tiny_runtime("qwen2")
    ctx = context()
    ranked = rt.rank(ctx, CANDIDATES)
    scores = rt.score(ctx, CANDIDATES)
    assert sorted(r.index for r in ranked) == list(range(len(CANDIDATES)))
    values = [r.score.logprob for r in ranked]
    assert values == sorted(values, reverse=True) and values[0] > values[-1]
    for r in ranked:
        assert r.candidate is CANDIDATES[r.index]
        assert r.score.logprob == pytest.approx(scores[r.index].logprob, abs=1e-4)
    means = [r.score.mean_logprob for r in rt.rank(ctx, CANDIDATES, by="mean_logprob")]
    assert means == sorted(means, reverse=True)


def test_score_input_errors():
    rt = tiny_runtime("llama")
    assert rt.score(context(), []) == []
    with pytest.raises(TypeError, match="wrap a single one in a list"):
        rt.score(context(), " four")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        rt.score(context(), ["a"], batch_size=0)
    with pytest.raises(ValueError, match="rank by"):
        rt.rank(context(), ["a"], by="sum")
    with pytest.raises(ValueError, match="cannot be empty"):
        rt.score(context(), [""])


# -- hidden states ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_hidden_states_match_a_full_forward(arch):
    rt = tiny_runtime(arch)
    base = spanctx.Context().append("A shared system prompt, long enough to matter. ")
    ctx = base.append("user question one")
    rt.generate(base.append("something else"), max_new_tokens=1)  # stores base's span
    with torch.no_grad():
        ref = rt.model.base_model(torch.tensor([rt.token_ids(ctx)])).last_hidden_state[0].float()  # [S, H]
    hits = rt.store.stats.hit_tokens
    last = rt.hidden_states(ctx, "last")
    assert rt.store.stats.hit_tokens > hits  # the stored spans were reused
    torch.testing.assert_close(last, ref[-1], atol=1e-4, rtol=0)
    torch.testing.assert_close(rt.hidden_states(ctx, "mean"), ref.mean(dim=0), atol=1e-4, rtol=0)
    torch.testing.assert_close(rt.hidden_states(ctx, "last", reuse=False), ref[-1], atol=1e-4, rtol=0)


def test_mean_hidden_state_stores_the_prompt_for_later_calls():
    rt = tiny_runtime("llama")
    ctx = spanctx.Context().extend(["first span. ", "second span."])
    n = len(rt.token_ids(ctx))
    rt.hidden_states(ctx, "mean")
    assert rt.store.stats.stored_tokens == n
    assert rt.generate(ctx, max_new_tokens=1).stats.computed_tokens == 1
    fresh = tiny_runtime("llama")
    fresh.hidden_states(ctx, "mean", reuse=False)
    assert fresh.store.stats.stored_tokens == 0 and fresh.store.stats.hits == 0


def test_hidden_states_reduction_error():
    with pytest.raises(ValueError, match="'last' or 'mean'"):
        tiny_runtime("llama").hidden_states(context(), "max")
