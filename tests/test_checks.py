"""Constraint checks: verdicts against PEFT's full prefill, what each check computes, the loop."""

from __future__ import annotations

import pytest
import torch
from adapter_helpers import fresh_runtime, invocation_ids, make_adapter, peft_reference, reference_logits
from conftest import tiny_model

import spanctx
from spanctx.adapters import AdapterError
from spanctx.checks import DEFAULT_FEEDBACK, requirement_context

ARCHS = ["llama", "qwen2"]
REQUIREMENTS = ["Is under 50 words.", "Mentions the date.", "Is polite."]


@pytest.fixture(scope="module", params=ARCHS)
def setup(request, tmp_path_factory):
    """(arch, aLoRA folder, LoRA folder) for one architecture."""
    arch = request.param
    model, tokenizer = tiny_model(arch)
    root = tmp_path_factory.mktemp(f"checks-{arch}")
    alora = make_adapter(model, root / "alora", invocation=invocation_ids(tokenizer), seed=3)
    lora = make_adapter(model, root / "lora", seed=4)
    return arch, alora, lora


def context() -> spanctx.Context:
    return (spanctx.Context().append("Write a note about the meeting.")
            .append("The meeting is on Monday the 3rd at noon; bring the report."))


def reference_probability(rt, reference, ctx, requirement, adapter) -> float:
    logits = reference_logits(reference, rt.token_ids(requirement_context(ctx, requirement), adapter=adapter))
    yes, no = (rt.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in ("Y", "N"))
    return torch.sigmoid(logits[yes] - logits[no]).item()


def test_verdicts_match_peft_full_prefill(setup):
    arch, alora, lora = setup
    rt = fresh_runtime(arch)
    rt.add_adapter("check", alora)
    rt.add_adapter("style", lora)
    refs = {"check": peft_reference(arch, alora), "style": peft_reference(arch, lora), None: tiny_model(arch)[0]}
    ctx = context()
    for adapter, reference in refs.items():
        verdicts = rt.check(ctx, REQUIREMENTS[:2], adapter=adapter)
        assert [v.requirement for v in verdicts] == REQUIREMENTS[:2]
        for v in verdicts:
            expected = reference_probability(rt, reference, ctx, v.requirement, adapter)
            assert v.probability == pytest.approx(expected, abs=1e-4)
            assert v.passed == (v.probability > 0.5)
    strict = rt.check(ctx, REQUIREMENTS, adapter="check", config=spanctx.CheckConfig(threshold=1.0))
    assert not any(v.passed for v in strict)


def test_what_each_check_computes(setup):
    arch, alora, _ = setup
    rt = fresh_runtime(arch)
    rt.add_adapter("check", alora)
    ctx = context()
    ctx_tokens = len(rt.token_ids(ctx))
    inv_tokens = len(invocation_ids(rt.tokenizer))

    def requirement_tokens(r):
        return len(rt.token_ids(requirement_context(ctx, r))) - ctx_tokens

    first, = rt.check(ctx, REQUIREMENTS[:1], adapter="check")
    assert (first.stats.cached_tokens, first.stats.computed_tokens) == (0, first.stats.prompt_tokens)
    # a new requirement: the context is shared, only its span + the invocation are computed
    for r in REQUIREMENTS[1:]:
        v, = rt.check(ctx, [r], adapter="check")
        assert v.stats.cached_tokens == ctx_tokens
        assert v.stats.computed_tokens == requirement_tokens(r) + inv_tokens
    # the same requirement again: everything is stored, the answer position is computed
    again = rt.check(ctx, REQUIREMENTS, adapter="check")
    assert [v.stats.computed_tokens for v in again] == [1] * len(REQUIREMENTS)
    assert again[0].probability == pytest.approx(first.probability, abs=1e-4)
    # the no-reuse baseline prefills everything, every time
    for v, cold in zip(again, rt.check(ctx, REQUIREMENTS, adapter="check", reuse=False)):
        assert (cold.stats.cached_tokens, cold.stats.computed_tokens) == (0, cold.stats.prompt_tokens)
        assert cold.probability == pytest.approx(v.probability, abs=1e-4)
    # the context stored by the checks is the base model's: base calls reuse it
    assert rt.generate(ctx, 2).stats.cached_tokens == ctx_tokens - 1


def test_check_loop_repairs_with_feedback(setup):
    arch, alora, _ = setup
    rt = fresh_runtime(arch)
    rt.add_adapter("check", alora)
    ctx = context()
    never = spanctx.CheckConfig(threshold=1.0)
    result = rt.check_loop(ctx, REQUIREMENTS, adapter="check", max_rounds=3, max_new_tokens=6, config=never)
    assert len(result.attempts) == 3 and not result.passed and result.final is result.attempts[-1]
    assert result.attempts[0].context == ctx
    for earlier, later in zip(result.attempts, result.attempts[1:]):
        assert earlier.failed == tuple(REQUIREMENTS)
        answered = earlier.context.append(earlier.answer.token_ids)
        failed = "\n".join(f"- {r}" for r in REQUIREMENTS)
        assert later.context == answered.append(DEFAULT_FEEDBACK.format(failed=failed))
        # the new round reuses the earlier prompt and the answer that the checks stored
        assert later.answer.stats.cached_tokens == len(rt.token_ids(answered))
    for attempt in result.attempts:
        answered = attempt.context.append(attempt.answer.token_ids)
        rechecked = rt.check(answered, REQUIREMENTS, adapter="check", config=never)
        assert [v.probability for v in attempt.verdicts] == pytest.approx([v.probability for v in rechecked],
                                                                           abs=1e-4)
        assert [v.stats.computed_tokens for v in rechecked] == [1] * len(REQUIREMENTS)

    passing = rt.check_loop(ctx, REQUIREMENTS, adapter="check", max_new_tokens=6,
                            config=spanctx.CheckConfig(threshold=0.0))
    assert len(passing.attempts) == 1 and passing.passed and passing.final.failed == ()


def test_check_loop_with_an_alora_generator(setup):
    arch, alora, _ = setup
    rt = fresh_runtime(arch)
    rt.add_adapter("check", alora)
    ctx = context()
    result = rt.check_loop(ctx, REQUIREMENTS[:1], adapter="check", generator="check", max_rounds=2,
                           max_new_tokens=4, config=spanctx.CheckConfig(threshold=1.0))
    first, second = result.attempts
    assert first.answer.token_ids == rt.generate(ctx, 4, adapter="check").token_ids
    # what the generator saw after the prompt (its invocation) stays in front of the answer
    expected = rt.token_ids(ctx, adapter="check") + list(first.answer.token_ids)
    assert rt.token_ids(second.context)[:len(expected)] == expected


def test_bad_check_input(setup):
    arch, alora, _ = setup
    rt = fresh_runtime(arch)
    rt.add_adapter("check", alora)
    ctx = context()
    with pytest.raises(TypeError, match="list of str"):
        rt.check(ctx, "Is short.", adapter="check")
    with pytest.raises(ValueError, match="non-empty str"):
        rt.check(ctx, ["Is short.", " "], adapter="check")
    with pytest.raises(ValueError, match="one token"):
        rt.check(ctx, ["Is short."], adapter="check", config=spanctx.CheckConfig(yes="yes", no="no"))
    with pytest.raises(ValueError, match="{requirement}"):
        spanctx.CheckConfig(template="Requirement:")
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        spanctx.CheckConfig(threshold=1.5)
    with pytest.raises(ValueError, match="must differ"):
        spanctx.CheckConfig(yes="Y", no="Y")
    with pytest.raises(ValueError, match="max_rounds"):
        rt.check_loop(ctx, ["Is short."], adapter="check", max_rounds=0)
    with pytest.raises(ValueError, match="{failed}"):
        rt.check_loop(ctx, ["Is short."], adapter="check", feedback="Try again.")
    with pytest.raises(AdapterError, match="no adapter named 'nope'"):
        rt.check_loop(ctx, ["Is short."], adapter="nope", max_new_tokens=2)
    assert rt.check(ctx, [], adapter="check") == []
