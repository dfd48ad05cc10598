"""Constraint checks: batched verdicts against PEFT's full prefill, what each check
computes, how many model calls a batch of checks makes, the loop."""

from __future__ import annotations

import pytest
import torch
from adapter_helpers import (
    INVOCATION,
    adapter_pair,
    fresh_runtime,
    invocation_ids,
    peft_reference,
    reference_logits,
)
from conftest import tiny_model

import spanctx
from spanctx.core.plan import Compute, PlanSegment, Reuse, plan_shared
from spanctx.features.checks import DEFAULT_CHECK, DEFAULT_FEEDBACK, answer_token, requirement_context, shared_spans
from spanctx.session.adapters import Activation, AdapterError
from spanctx.session.api import FinalCall


def logits_and_stats(rt, ctx, adapter):
    """Next-token logits after ``ctx`` (through the store) and the call's stats."""
    with rt.prepared(ctx, adapter=adapter) as call:
        out = rt.engine.run(FinalCall.tails([call.assembly]))
        return out.logits[0, -1].float(), rt.stats(call, 0, None)


ARCHS = ["llama", "qwen2", "mistral"]  # mistral: a sliding window (16) that the check prompts cross
REQUIREMENTS = ["Is under 50 words.", "Mentions the date and the hour of the meeting.", "Is polite."]
TEN = [f"Requirement number {i}{' in more words' * (i % 3)}." for i in range(10)]
ATOL = 1e-5  # on probabilities, fp32


@pytest.fixture(scope="module", params=ARCHS)
def setup(request, tmp_path_factory):
    """(arch, aLoRA folder, LoRA folder) for one architecture."""
    return adapter_pair(request.param, tmp_path_factory, "checks", (3, 4))


def context() -> spanctx.Context:
    return (spanctx.Context().append("Write a note about the meeting.")
            .append("The meeting is on Monday the 3rd at noon; bring the report."))


def reference_probability(rt, reference, ctx, requirement, adapter, config=DEFAULT_CHECK) -> float:
    """P(yes) of PEFT's (or the base model's) own full prefill of the check's ids."""
    ids = rt.token_ids(requirement_context(ctx, requirement, config), adapter=adapter)
    return probability(rt, reference_logits(reference, ids), config)


def probability(rt, logits: torch.Tensor, config=DEFAULT_CHECK) -> float:
    yes, no = (answer_token(rt.tokenizer, t) for t in (config.yes, config.no))
    return torch.sigmoid(logits[yes] - logits[no]).item()


def own_tokens(rt, ctx, requirement, adapter="check") -> int:
    """The tokens of a check after ``ctx``: its requirement span and invocation."""
    return len(rt.token_ids(requirement_context(ctx, requirement), adapter=adapter)) - len(rt.token_ids(ctx))


def count_model_calls(rt) -> list:
    calls = []
    rt.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                       with_kwargs=True)
    return calls


def test_batched_verdicts_match_peft_full_prefill(setup):
    arch, alora, lora = setup
    rt = fresh_runtime(arch)
    rt.add_adapter("check", alora)
    rt.add_adapter("style", lora)
    refs = {"check": peft_reference(arch, alora), "style": peft_reference(arch, lora), None: tiny_model(arch)[0]}
    ctx = context()
    for adapter, reference in refs.items():
        expected = [reference_probability(rt, reference, ctx, r, adapter) for r in REQUIREMENTS]
        # an empty store, then the context stored, in two batches, and without reuse
        for kwargs in ({}, {}, {"batch_size": 2}, {"reuse": False}):
            verdicts = rt.check(ctx, REQUIREMENTS, adapter=adapter, **kwargs)
            assert [v.requirement for v in verdicts] == REQUIREMENTS
            assert [v.probability for v in verdicts] == pytest.approx(expected, abs=ATOL)
            assert [v.passed for v in verdicts] == [p > 0.5 for p in expected]
        # the rows' spans stored by the batch are right: a later single call reuses them
        for r, p in zip(REQUIREMENTS, expected):
            logits, stats = logits_and_stats(rt, requirement_context(ctx, r), adapter)
            assert stats.computed_tokens == 1
            assert probability(rt, logits) == pytest.approx(p, abs=ATOL)
    strict = rt.check(ctx, REQUIREMENTS, adapter="check", config=spanctx.CheckConfig(threshold=1.0))
    assert not any(v.passed for v in strict)


def test_rows_whose_requirement_ends_with_the_invocation(setup):
    """A requirement span that ends with the invocation is cut where it starts (the aLoRA
    switches on there); rows of one batch then have their own, unrelated starts."""
    arch, alora, _ = setup
    rt = fresh_runtime(arch)
    rt.add_adapter("check", alora)
    reference = peft_reference(arch, alora)
    config = spanctx.CheckConfig(template="{requirement}")
    requirements = ["Is short" + INVOCATION, INVOCATION, "Is polite.", "Is polite."]
    ctx = context()
    expected = [reference_probability(rt, reference, ctx, r, "check", config) for r in requirements]
    for _ in range(2):
        verdicts = rt.check(ctx, requirements, adapter="check", config=config)
        assert [v.probability for v in verdicts] == pytest.approx(expected, abs=ATOL)


def test_ten_checks_are_one_model_call(setup):
    arch, alora, lora = setup
    rt = fresh_runtime(arch)
    rt.add_adapter("check", alora)
    rt.add_adapter("style", lora)
    calls = count_model_calls(rt)
    for adapter in ["check", "style", None]:
        ctx = spanctx.Context().append(f"Checked by {adapter}.").append("The meeting is on Monday.")
        calls.clear()
        cold = rt.check(ctx, TEN, adapter=adapter)
        assert [rows for rows, _ in calls] == [1, 10]  # the context (stored), then all ten rows
        # the first verdict counts the context's computed tokens: the call computed it once
        from_store = cold[0].stats.cached_tokens  # the BOS span, when base calls stored it
        assert sum(v.stats.computed_tokens for v in cold) == len(rt.token_ids(ctx)) - from_store + sum(
            own_tokens(rt, ctx, r, adapter) for r in TEN)
        calls.clear()
        warm = rt.check(ctx, TEN, adapter=adapter)
        assert [rows for rows, _ in calls] == [10]  # one call of ten rows
        calls.clear()
        small = rt.check(ctx, TEN, adapter=adapter, batch_size=4)
        assert [rows for rows, _ in calls] == [4, 4, 2]
        assert [v.probability for v in warm] == pytest.approx([v.probability for v in cold], abs=ATOL)
        assert [v.probability for v in small] == pytest.approx([v.probability for v in cold], abs=ATOL)
        for v in warm:
            assert v.stats.cached_tokens == len(rt.token_ids(ctx))
            assert v.stats.computed_tokens == own_tokens(rt, ctx, v.requirement, adapter)
    # an aLoRA hook refuses a batch of another size than its rows
    with rt.adapters.activated(Activation("check", (5, 6))), pytest.raises(AdapterError, match="2 rows"):
        rt.model(input_ids=torch.tensor([[1, 2, 3]]))


def test_checks_do_not_taint_the_store(setup):
    arch, alora, lora = setup
    rt = fresh_runtime(arch)
    rt.add_adapter("check", alora)
    rt.add_adapter("style", lora)
    ctx = context()
    prompts = [ctx, *(requirement_context(ctx, r) for r in REQUIREMENTS)]

    def base_logits():
        return [rt.next_token_logits(c) for c in prompts]

    base_logits()  # stores every prompt's spans: later base calls reuse the same entries
    before = base_logits()
    for adapter in ["check", "style", "check", None, "style"]:
        rt.check(ctx, REQUIREMENTS, adapter=adapter)
    after = base_logits()
    assert all(torch.equal(b, a) for b, a in zip(before, after))
    # spans that adapter checks stored first: base calls reuse the aLoRA's (base keys,
    # computed on base weights in the batch), never the LoRA's
    fresh = ["A requirement that no base call has seen.", "Another one."]
    rt.check(ctx, fresh, adapter="style")
    rt.check(ctx, fresh, adapter="check")
    for r in fresh:
        logits, stats = logits_and_stats(rt, requirement_context(ctx, r), None)
        assert stats.computed_tokens == 1
        torch.testing.assert_close(logits, rt.next_token_logits(requirement_context(ctx, r), reuse=False),
                                   atol=1e-4, rtol=0)


def test_what_each_check_computes(setup):
    arch, alora, _ = setup
    rt = fresh_runtime(arch)
    rt.add_adapter("check", alora)
    ctx = context()
    ctx_tokens = len(rt.token_ids(ctx))
    inv_tokens = len(invocation_ids(rt.tokenizer))

    first, = rt.check(ctx, REQUIREMENTS[:1], adapter="check")
    assert (first.stats.cached_tokens, first.stats.computed_tokens) == (0, first.stats.prompt_tokens)
    # a new requirement: the context is shared, only its span + the invocation are computed
    for r in REQUIREMENTS[1:]:
        v, = rt.check(ctx, [r], adapter="check")
        assert v.stats.cached_tokens == ctx_tokens
        assert v.stats.computed_tokens == own_tokens(rt, ctx, r)
    # one requirement again: its stored span is shared, the invocation is computed
    again, = rt.check(ctx, REQUIREMENTS[:1], adapter="check")
    assert again.stats.computed_tokens == inv_tokens
    assert again.probability == pytest.approx(first.probability, abs=ATOL)
    # several: a batch recomputes each row's requirement span and invocation
    batch = rt.check(ctx, REQUIREMENTS, adapter="check")
    assert [v.stats.computed_tokens for v in batch] == [own_tokens(rt, ctx, r) for r in REQUIREMENTS]
    # a new context: the first verdict counts the context, computed once for all rows
    longer = ctx.append("Also: the room changed.")
    new = rt.check(longer, REQUIREMENTS, adapter="check")
    assert new[0].stats.computed_tokens == len(rt.token_ids(longer)) - ctx_tokens + own_tokens(
        rt, longer, REQUIREMENTS[0])
    assert [v.stats.cached_tokens for v in new[1:]] == [len(rt.token_ids(longer))] * 2
    # the no-reuse baseline prefills everything, every time
    for v, cold in zip(batch, rt.check(ctx, REQUIREMENTS, adapter="check", reuse=False)):
        assert (cold.stats.cached_tokens, cold.stats.computed_tokens) == (0, cold.stats.prompt_tokens)
        assert cold.probability == pytest.approx(v.probability, abs=ATOL)
    # the context stored by the checks is the base model's: base calls reuse it
    assert rt.generate(ctx, 2).stats.cached_tokens == ctx_tokens - 1


def test_plan_shared():
    segs = [PlanSegment(bytes([i]), n) for i, n in enumerate([3, 2, 4, 5])]  # starts 0, 3, 5, 9
    assert plan_shared(segs, 2, lambda key: True).steps == (Reuse(0, 0, 3), Reuse(1, 3, 5))
    missing_second = plan_shared(segs, 2, lambda key: key != bytes([1]))
    assert missing_second.steps == (Reuse(0, 0, 3), Compute((1,), 3, 5))
    assert missing_second.tail == Compute((2, 3), 5, 14)
    assert (missing_second.cached_tokens, missing_second.tail.start) == (3, 5)
    cold = plan_shared(segs, 2, lambda key: False)
    assert (cold.steps, cold.tail) == ((Compute((0, 1), 0, 5),), Compute((2, 3), 5, 14))
    none = plan_shared(segs, 0, lambda key: True)
    assert (none.steps, none.tail) == ((), Compute((0, 1, 2, 3), 0, 14))


def test_shared_spans():
    rt = spanctx.Runtime(*tiny_model("llama"), store_bytes=1 << 20)
    ctx = context()
    prompts = [rt.resolver.resolve(requirement_context(ctx, r)) for r in REQUIREMENTS]
    n = len(rt.resolver.resolve(ctx).segments)
    assert shared_spans(prompts) == n
    assert shared_spans(prompts[:1]) == n  # one row keeps its last span
    assert shared_spans([rt.resolver.resolve(ctx.append("x").append("y"))] * 2) == n + 1


def test_a_context_with_a_parallel_group():
    rt = spanctx.Runtime(*tiny_model("llama"), store_bytes=1 << 20)
    ctx = spanctx.Context().append("Docs:").parallel("first doc", "second doc").append("Summary: fine.")
    for v in rt.check(ctx, REQUIREMENTS):
        logits = rt.next_token_logits(requirement_context(ctx, v.requirement))
        assert v.probability == pytest.approx(probability(rt, logits), abs=ATOL)


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
                                                                           abs=ATOL)
        assert [v.stats.computed_tokens for v in rechecked] == [own_tokens(rt, answered, r) for r in REQUIREMENTS]

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
