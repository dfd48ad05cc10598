"""The pure planner, without a model."""

from hypothesis import given
from hypothesis import strategies as st
from strategies import planner_inputs

from spanctx.core.plan import Compute, PlanSegment, Reuse, plan_prompt


@given(planner_inputs())
def test_plan_covers_the_prompt_in_order(inputs):
    segments, stored = inputs
    plan = plan_prompt(segments, stored.__contains__)
    total = sum(s.num_tokens for s in segments)
    cursor = 0
    for step in (*plan.steps, plan.tail):
        assert step.start == cursor and step.end > step.start
        cursor = step.end
    assert cursor == total == plan.total_tokens
    assert plan.tail.end - plan.tail.start >= 1  # the final call always computes a token
    assert plan.cached_tokens + plan.computed_tokens == total


@given(planner_inputs())
def test_plan_reuses_exactly_the_stored_spans_before_the_tail(inputs):
    segments, stored = inputs
    plan = plan_prompt(segments, stored.__contains__)
    hits = [i for i, s in enumerate(segments) if s.key in stored]
    assert set(plan.reused_segments) <= set(hits)
    for step in plan.steps:
        if isinstance(step, Compute):
            assert all(segments[i].key not in stored for i in step.segments)
    # every hit is reused, except a one-token last span (its token goes to the final call)
    missing = set(hits) - set(plan.reused_segments)
    assert missing <= {len(segments) - 1}
    if missing:
        assert segments[-1].num_tokens == 1
    # computed spans are all stored afterwards: the compute steps and the tail name every miss
    named = {i for step in (*plan.steps, plan.tail) if isinstance(step, Compute) for i in step.segments}
    assert named == {i for i, s in enumerate(segments) if s.key not in stored}


@given(planner_inputs())
def test_cached_tokens_count_the_reused_slices(inputs):
    segments, stored = inputs
    plan = plan_prompt(segments, stored.__contains__)
    hit_tokens = sum(s.num_tokens for s in segments if s.key in stored)
    last_stored = segments[-1].key in stored
    assert plan.cached_tokens == hit_tokens - (1 if last_stored else 0)


def test_fully_stored_prompt_leaves_its_last_token():
    segs = [PlanSegment(b"a" * 16, 3), PlanSegment(b"b" * 16, 2)]
    plan = plan_prompt(segs, lambda k: True)
    assert plan.steps == (Reuse(0, 0, 3), Reuse(1, 3, 4))
    assert plan.tail == Compute((), 4, 5)


def test_miss_between_hits_is_computed_before_the_last_hit():
    segs = [PlanSegment(bytes([i]) * 16, 2) for i in range(4)]
    stored = {segs[0].key, segs[2].key}
    plan = plan_prompt(segs, stored.__contains__)
    assert plan.steps == (Reuse(0, 0, 2), Compute((1,), 2, 4), Reuse(2, 4, 6))
    assert plan.tail == Compute((3,), 6, 8)


def test_empty_prompt_is_refused():
    import pytest

    with pytest.raises(ValueError):
        plan_prompt([], lambda k: False)
    with pytest.raises(ValueError):
        PlanSegment(b"x" * 16, 0)


@given(planner_inputs(), st.floats(0.0, 4.0))
def test_reuse_that_does_not_pay_computes_the_whole_prompt(inputs, fraction):
    segments, stored = inputs
    reuse_all = plan_prompt(segments, stored.__contains__)
    plan = plan_prompt(segments, stored.__contains__, min_reuse_fraction=fraction)
    if reuse_all.cached_tokens < fraction * reuse_all.computed_tokens:
        assert plan.steps == () and plan.tail == Compute(tuple(range(len(segments))), 0, plan.total_tokens)
    else:
        assert plan == reuse_all


def test_a_lone_stored_bos_is_not_worth_a_masked_prefill():
    segs = [PlanSegment(b"b" * 16, 1), PlanSegment(b"d" * 16, 2000)]
    assert plan_prompt(segs, {segs[0].key}.__contains__).cached_tokens == 1
    assert plan_prompt(segs, {segs[0].key}.__contains__, min_reuse_fraction=0.125).cached_tokens == 0
