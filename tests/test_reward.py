"""Reward scoring with a sequence-classification model, with span reuse."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import LlamaForSequenceClassification

import spanctx
from spanctx.presets import preset_config
from spanctx.tokenizer import byte_tokenizer


@functools.cache
def reward_head_model() -> LlamaForSequenceClassification:
    torch.manual_seed(0)
    return LlamaForSequenceClassification(preset_config("tiny-llama", num_labels=1)).eval()


def reward_model(store: spanctx.KVStore | None = None) -> spanctx.RewardModel:
    return spanctx.RewardModel(reward_head_model(), byte_tokenizer(),
                               store_bytes=None if store is not None else 16 << 20, store=store)


def full_reward(model, ids: list[int]) -> float:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, 0].item()


def test_rewards_match_full_forwards_and_reuse_the_conversation():
    rm = reward_model()
    conversation = spanctx.Context().extend(["<|im_start|>user\nTell me a joke.<|im_end|>\n",
                                             "<|im_start|>assistant\n"])
    responses = [conversation.append(f"Joke number {i}.<|im_end|>") for i in range(4)]
    rewards = rm.rewards(responses)
    expected = [full_reward(rm.session.model, rm.session.token_ids(ctx)) for ctx in responses]
    assert rewards == pytest.approx(expected, abs=1e-4)
    assert len(set(rewards)) == 4  # distinct texts, distinct rewards
    # the conversation (BOS + 2 spans) was computed once, then reused 3 times
    n_conv = len(rm.session.token_ids(conversation))
    assert rm.store.stats.hit_tokens == 3 * n_conv
    assert rm.rewards(responses, reuse=False) == pytest.approx(expected, abs=1e-4)


def test_reward_model_shares_a_store_without_mixing():
    store = spanctx.KVStore(32 << 20)
    rt = spanctx.Runtime(*spanctx.load_preset("tiny-llama"), store=store)
    rm = reward_model(store=store)
    assert rt.store is store and rm.store is store  # an empty store is shared too, not replaced
    ctx = spanctx.Context().extend(["shared text ", "and more"])
    rt.generate(ctx, max_new_tokens=1)
    hits = store.stats.hits
    reward = rm.reward(ctx)
    assert store.stats.hits == hits  # the causal LM's spans are another namespace
    assert reward == pytest.approx(full_reward(rm.session.model, rm.session.token_ids(ctx)), abs=1e-4)


def test_reward_model_errors():
    with pytest.raises(TypeError, match="ForSequenceClassification model with num_labels=1"):
        spanctx.RewardModel(*spanctx.load_preset("tiny-llama"))
    rm = reward_model()
    with pytest.raises(ValueError, match="ends with the pad token"):
        rm.reward(spanctx.Context().extend(["text", [rm.session.model.config.pad_token_id]]))


def test_reward_model_from_a_preset():
    rm = spanctx.RewardModel.from_pretrained("tiny-gpt2", device="cpu", store_bytes=1 << 20)
    ctx = spanctx.Context().append("hello")
    assert type(rm.session.model).__name__ == "GPT2ForSequenceClassification"
    assert rm.reward(ctx) == pytest.approx(full_reward(rm.session.model, rm.session.token_ids(ctx)), abs=1e-4)


def test_a_reward_model_never_gets_the_static_executor():
    """It does not decode (``auto`` keeps it eager on CUDA too); ``static`` is refused clearly."""
    model, tokenizer = reward_head_model(), byte_tokenizer()
    with pytest.raises(ValueError, match="does not generate"):
        spanctx.Runtime(model, tokenizer, store_bytes=1 << 20, executor="static")
