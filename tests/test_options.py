"""Model options: runtime defaults under per-call kwargs, pass-through, seeded sampling."""

import pytest
import torch
from conftest import tiny_runtime

import spanctx
from spanctx.core.options import merge_options

CTX = spanctx.Context().append("Options are merged key by key.")


@pytest.mark.parametrize("defaults, call, expected", [
    # (defaults, call) -> (max_new_tokens, seed, do_sample, selected generate kwargs)
    ({}, {}, (32, None, False, {"temperature": None})),
    ({"max_new_tokens": 8, "seed": 1}, {}, (8, 1, False, {})),
    ({"max_new_tokens": 8}, {"max_new_tokens": 3}, (3, None, False, {})),
    ({"repetition_penalty": 1.2}, {"repetition_penalty": None}, (32, None, False, {"repetition_penalty": "absent"})),
    ({"repetition_penalty": 1.2}, {"no_repeat_ngram_size": 2},
     (32, None, False, {"repetition_penalty": 1.2, "no_repeat_ngram_size": 2})),
    # sampling: a sampling parameter asks for it; the call's decision wins over the defaults'
    ({"temperature": 0.7}, {}, (32, None, True, {"temperature": 0.7})),
    ({"temperature": 0.7}, {"do_sample": False}, (32, None, False, {"temperature": None})),
    ({"do_sample": False}, {"top_p": 0.9}, (32, None, True, {"top_p": 0.9})),
    ({"do_sample": True}, {}, (32, None, True, {"temperature": "absent"})),
    # a call None removes the default, and with it the default's request for sampling
    ({"temperature": 0.7}, {"temperature": None}, (32, None, False, {"temperature": None})),
])
def test_merge_rule(defaults, call, expected):
    max_new_tokens, seed, do_sample, selected = expected
    opts = merge_options(defaults, call)
    assert (opts.max_new_tokens, opts.seed, opts.do_sample) == (max_new_tokens, seed, do_sample)
    for key, value in selected.items():
        if value == "absent":
            assert key not in opts.generate_kwargs
        else:
            assert opts.generate_kwargs[key] == value


@pytest.mark.parametrize("defaults, call, error", [
    ({}, {"max_new_tokens": 0}, ValueError),
    ({}, {"seed": "7"}, TypeError),
    ({"past_key_values": None}, {}, ValueError),
    ({}, {"attention_mask": None}, ValueError),
])
def test_bad_options_are_refused(defaults, call, error):
    with pytest.raises(error):
        merge_options(defaults, call)


def test_bad_runtime_defaults_are_refused_at_construction():
    with pytest.raises(ValueError, match="streamer"):
        tiny_runtime("llama", generation_defaults={"streamer": None})


def test_runtime_defaults_apply_and_the_call_overrides_them():
    plain = tiny_runtime("llama")
    rt = tiny_runtime("llama", generation_defaults={"max_new_tokens": 5, "repetition_penalty": 1.5})
    assert rt.options().max_new_tokens == 5
    expected = plain.generate(CTX, max_new_tokens=5, repetition_penalty=1.5, min_new_tokens=5).token_ids
    assert rt.generate(CTX, min_new_tokens=5).token_ids == expected
    assert rt.generate(CTX, max_new_tokens=7, min_new_tokens=7).stats.new_tokens == 7
    no_penalty = plain.generate(CTX, max_new_tokens=5, min_new_tokens=5).token_ids
    assert rt.generate(CTX, repetition_penalty=None, min_new_tokens=5).token_ids == no_penalty


def test_hf_generate_kwargs_pass_through():
    rt = tiny_runtime("llama")
    greedy = rt.generate(CTX, max_new_tokens=6).token_ids
    # forbid the greedy choice of the first step: the first token must change
    banned = rt.generate(CTX, max_new_tokens=6, bad_words_ids=[[greedy[0]]]).token_ids
    assert banned[0] != greedy[0]
    with pytest.raises(ValueError, match="not_a_generate_kwarg"):
        rt.generate(CTX, max_new_tokens=2, not_a_generate_kwarg=1)


def test_same_seed_same_tokens_and_the_global_rng_is_left_alone():
    rt = tiny_runtime("llama")
    torch.manual_seed(123)
    first = rt.generate(CTX, max_new_tokens=12, temperature=1.0, seed=7).token_ids
    after_call = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after_call)  # the call restored the global RNG
    assert rt.generate(CTX, max_new_tokens=12, temperature=1.0, seed=7).token_ids == first
    assert rt.generate(CTX, max_new_tokens=12, temperature=1.0, seed=8).token_ids != first
    assert rt.generate(CTX, max_new_tokens=12, temperature=1.0, seed=7, reuse=False).token_ids == first
    assert "".join(rt.stream(CTX, max_new_tokens=12, temperature=1.0, seed=7)) == rt.tokenizer.decode(
        first, skip_special_tokens=True)
    seeded_rt = tiny_runtime("llama", generation_defaults={"seed": 7, "temperature": 1.0})
    assert seeded_rt.generate(CTX, max_new_tokens=12).token_ids == first
