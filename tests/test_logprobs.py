"""Per-token log-probabilities and scores of generated tokens, against full prefill.

A reused cache must give each new token the log-probability a full prefill of
``prompt + tokens before it`` gives (fp32, 1e-4); with an aLoRA the reference is PEFT's
own full prefill. Scores are the processed logits (a processor's mask shows in them),
logits the raw ones.
"""

from __future__ import annotations

import pytest
import torch
from adapter_helpers import INVOCATION, adapter_pair, fresh_runtime, peft_reference
from conftest import tiny_runtime
from transformers import LogitsProcessor
from transformers.generation.streamers import BaseStreamer

import spanctx
from spanctx.session.logprobs import token_logprobs

ATOL = 1e-4


def full_prefill_logprobs(model, prompt: list[int], new: tuple[int, ...]) -> torch.Tensor:
    """``[N, V]`` log-softmax of a full prefill of ``prompt + new`` at the N new positions."""
    ids = torch.tensor([prompt + list(new)])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1: len(prompt) - 1 + len(new)].float()
    return torch.log_softmax(logits, -1)


def test_logprobs_of_a_reused_prompt_match_full_prefill():
    rt = tiny_runtime("llama")
    system = spanctx.Context().append("You are terse. " * 8)
    rt.next_token_logits(system)  # stored: the next call reuses it
    ctx = system.append("Name three rivers.")
    res = rt.generate(ctx, 8, output_scores=True, output_logits=True)
    assert res.stats.cached_tokens > 0
    ref = full_prefill_logprobs(rt.model, rt.token_ids(ctx), res.token_ids)  # [8, V]
    lps = res.logprobs(top=5)
    assert [lp.token_id for lp in lps] == list(res.token_ids)
    torch.testing.assert_close(torch.tensor([lp.logprob for lp in lps]),
                               ref.gather(-1, torch.tensor(res.token_ids)[:, None])[:, 0], atol=ATOL, rtol=0)
    for step, lp in enumerate(lps):
        values, indices = ref[step].topk(5)
        assert [t for t, _ in lp.top] == indices.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in lp.top]), values, atol=ATOL, rtol=0)
        assert lp.top[0][0] == lp.token_id  # greedy: the chosen token is the most likely
    # without processors, scores and raw logits are the same numbers
    for scores, logits in zip(res.scores, res.logits):
        torch.testing.assert_close(scores, logits)


class _Forbid(LogitsProcessor):
    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids, scores):
        return scores.index_fill(-1, torch.tensor([self.token]), float("-inf"))


def test_scores_are_after_the_processors_logits_before():
    rt = tiny_runtime("llama")
    ctx = spanctx.Context().append("Count: one two three")
    free = rt.generate(ctx, 1)
    res = rt.generate(ctx, 3, output_scores=True, output_logits=True, logits_processor=[_Forbid(free.token_ids[0])])
    assert res.token_ids[0] != free.token_ids[0]
    assert res.scores[0][free.token_ids[0]] == float("-inf")
    assert torch.isfinite(res.logits[0]).all()
    assert res.logprobs()[0].logprob > float("-inf")


def test_logprobs_need_scores_and_bad_top():
    rt = tiny_runtime("llama")
    res = rt.generate(spanctx.Context().append("Hi"), 2)
    assert res.scores is None and res.logits is None
    with pytest.raises(ValueError, match="output_scores=True"):
        res.logprobs()
    with pytest.raises(ValueError, match="top must be >= 0"):
        token_logprobs((torch.zeros(4),), (1,), top=-1)


@pytest.fixture(scope="module")
def alora_setup(tmp_path_factory):
    return adapter_pair("llama", tmp_path_factory, "logprobs", (5, 6))


def test_alora_logprobs_match_peft_full_prefill(alora_setup):
    arch, alora, _ = alora_setup
    rt = fresh_runtime(arch)
    rt.add_adapter("check", alora, alora_start="in_prompt")
    ctx = spanctx.Context().append("The answer was short. ").append(f"{INVOCATION}: is it short? ")
    rt.next_token_logits(ctx.parent)
    res = rt.generate(ctx, 5, adapter="check", output_scores=True)
    assert res.stats.cached_tokens == len(rt.token_ids(ctx.parent))
    ref = full_prefill_logprobs(peft_reference(arch, alora), rt.token_ids(ctx), res.token_ids)
    torch.testing.assert_close(torch.tensor([lp.logprob for lp in res.logprobs()]),
                               ref.gather(-1, torch.tensor(res.token_ids)[:, None])[:, 0], atol=ATOL, rtol=0)


class _Collect(BaseStreamer):
    def __init__(self) -> None:
        self.puts: list[list[int]] = []
        self.ended = False

    def put(self, value) -> None:
        self.puts.append(value.reshape(-1).tolist())

    def end(self) -> None:
        self.ended = True


def test_streamer_gets_the_prompt_then_each_new_token():
    rt = tiny_runtime("llama")
    ctx = spanctx.Context().append("Stream this.")
    streamer = _Collect()
    res = rt.generate(ctx, 4, streamer=streamer)
    assert streamer.ended
    assert streamer.puts[0] == rt.token_ids(ctx)
    assert tuple(t for put in streamer.puts[1:] for t in put) == res.token_ids
    assert res.stats.ttft_s <= res.stats.total_s
