"""The placement planner, without a model: coverage, sources, deltas, repair, storing."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from strategies import PlacementCase, placement_cases

from spanctx.core.placement import (
    BlendTokens,
    ComputeMember,
    GroupLayout,
    Place,
    PlaceGroup,
    Repair,
    ReuseGroup,
    plan_placement,
)
from spanctx.core.plan import Compute, PlanSegment, Reuse, plan_prompt


def _plan(case: PlacementCase):
    return plan_placement(case.segments, case.groups, case.stored.__contains__, case.movable, case.repair)


def _starts(case: PlacementCase) -> list[int]:
    starts = [0]
    for seg in case.segments:
        starts.append(starts[-1] + seg.num_tokens)
    return starts


@given(placement_cases())
@settings(max_examples=300, deadline=None)
def test_steps_cover_the_prompt_once_in_order_and_leave_a_tail(case):
    plan = _plan(case)
    total = _starts(case)[-1]
    ranges = []
    for step in plan.steps:
        if isinstance(step, PlaceGroup):
            ranges += [(p.start, p.end) for p in step.place]
        else:
            ranges.append((step.start, step.end))
    covered = 0
    for start, end in ranges:
        assert start == covered and end > start
        covered = end
    assert covered == plan.tail.start < plan.tail.end == plan.total_tokens == total
    assert plan.cached_tokens + plan.computed_tokens == total


@given(placement_cases())
@settings(max_examples=300, deadline=None)
def test_every_placed_kv_comes_from_the_store_or_this_call(case):
    plan = _plan(case)
    starts = _starts(case)
    segments = case.segments
    for step in plan.steps:
        if isinstance(step, Place):
            assert step.from_store and step.delta == 0 and segments[step.segment].key in case.stored
        elif isinstance(step, ReuseGroup):
            assert case.groups[step.group].key in case.stored
        elif isinstance(step, Compute):
            assert all(segments[i].key not in case.stored for i in step.segments)
        else:
            group = case.groups[step.group]
            assert group.key not in case.stored
            at_anchor = [c for c in step.compute if c.store]
            in_place = {c.segment for c in step.compute if not c.store}
            assert len({segments[c.segment].key for c in at_anchor}) == len(at_anchor)  # each once
            for c in at_anchor:
                assert c.position == group.anchor_end and segments[c.segment].key not in case.stored
            for p in step.place:
                assert group.first <= p.segment < group.stop
                key = segments[p.segment].key
                delta = starts[p.segment] - group.anchor_end
                if p.segment in in_place:
                    assert not case.movable and delta != 0 and p.delta == 0 and not p.from_store
                else:
                    assert p.delta == delta and (case.movable or delta == 0)
                    assert p.from_store == (key in case.stored)
                    assert p.from_store or key in {segments[c.segment].key for c in at_anchor}
    for i in plan.tail.segments:
        assert segments[i].key not in case.stored


@given(placement_cases())
@settings(max_examples=300, deadline=None)
def test_repair_touches_only_members_away_from_their_anchor(case):
    plan = _plan(case)
    starts = _starts(case)
    repair = case.repair
    for step in plan.steps:
        if not isinstance(step, PlaceGroup):
            continue
        group = case.groups[step.group]
        members = [range(starts[i], starts[i + 1]) for i in range(group.first, group.stop)
                   if starts[i] != group.anchor_end]
        candidates = [t for r in members for t in r if t < plan.tail.start]
        heads = [t for r in members for t in r[: repair.k] if t < plan.tail.start]
        fix = step.repair
        if repair.kind == "none" or not candidates or (repair.kind == "head" and not heads):
            assert fix is None
        elif repair.kind == "full":
            assert fix.slots == tuple(candidates)
        elif repair.kind == "head":
            assert fix.slots == tuple(heads)
        else:
            assert isinstance(fix, BlendTokens) and fix.candidates == tuple(candidates)
            assert 1 <= fix.count <= len(candidates)
            assert fix.count >= len(candidates) * repair.fraction - 1e-9
        assert step.store == (fix is not None and step.place[-1].end == starts[group.stop])
    assert plan.recomputed_tokens == sum(
        (len(s.repair.slots) if not isinstance(s.repair, BlendTokens) else s.repair.count)
        for s in plan.steps if isinstance(s, PlaceGroup) and s.repair is not None)


@given(placement_cases())
@settings(max_examples=200, deadline=None)
def test_without_groups_the_plan_matches_the_core_planner(case):
    ungrouped = [s for i, s in enumerate(case.segments)
                 if not any(g.first <= i < g.stop for g in case.groups)]
    if not ungrouped:
        return
    plan = plan_placement(ungrouped, (), case.stored.__contains__, case.movable, case.repair)
    core = plan_prompt(ungrouped, case.stored.__contains__)
    assert plan.tail == core.tail and plan.cached_tokens == core.cached_tokens
    reused = [(s.segment, s.start, s.end) for s in core.steps if isinstance(s, Reuse)]
    assert reused == [(s.segment, s.start, s.end) for s in plan.steps if isinstance(s, Place)]


def _rag_layout(stored: set[bytes], order=(0, 1, 2)):
    """BOS, a 4-token system span, a group of docs of 3, 5 and 2 tokens in ``order``, a
    2-token question. The docs' keys do not depend on their order."""
    docs = [PlanSegment(b"doc%d" % i + bytes(12), n) for i, n in enumerate((3, 5, 2))]
    segments = (PlanSegment(b"bos" + bytes(13), 1), PlanSegment(b"sys" + bytes(13), 4),
                *(docs[i] for i in order), PlanSegment(b"q" + bytes(15), 2))
    return segments, (GroupLayout(b"group" + bytes(11), 2, 5, 5),), stored.__contains__


def test_first_prompt_computes_docs_after_the_anchor_then_moves_them():
    segments, groups, is_stored = _rag_layout(set())
    plan = plan_placement(segments, groups, is_stored, True, Repair("none"))
    compute, group = plan.steps
    assert compute == Compute((0, 1), 0, 5)
    assert group.compute == tuple(ComputeMember(i, 5, n, True) for i, n in ((2, 3), (3, 5), (4, 2)))
    assert [(p.start, p.end, p.delta) for p in group.place] == [(5, 8, 0), (8, 13, 3), (13, 15, 8)]
    assert plan.tail == Compute((5,), 15, 17)
    assert (plan.cached_tokens, plan.moved_tokens, plan.recomputed_tokens) == (0, 7, 0)


def test_an_order_swap_reuses_every_doc_and_computes_only_the_question():
    keys = {b"bos" + bytes(13), b"sys" + bytes(13)} | {b"doc%d" % i + bytes(12) for i in range(3)}
    segments, groups, is_stored = _rag_layout(keys, order=(2, 0, 1))
    plan = plan_placement(segments, groups, is_stored, True, Repair.parse("head:2"))
    assert plan.cached_tokens == 15 and plan.computed_tokens == 2
    group = plan.steps[-1]
    assert group.compute == () and [p.delta for p in group.place] == [0, 2, 5]
    assert group.repair.slots == (7, 8, 10, 11)  # doc 2 sits right after its anchor: exact
    assert group.store


def test_keys_that_cannot_move_are_computed_at_their_place():
    keys = {b"doc%d" % i + bytes(12) for i in range(3)}
    segments, groups, is_stored = _rag_layout(keys)
    plan = plan_placement(segments, groups, is_stored, False, Repair("none"))
    group = plan.steps[-1]
    assert group.compute == (ComputeMember(3, 8, 5, False), ComputeMember(4, 13, 2, False))
    assert [p.from_store for p in group.place] == [True, False, False]
    assert plan.fallback_tokens == 7 and plan.moved_tokens == 0


def test_a_prompt_ending_with_a_group_leaves_its_last_token_and_stores_no_group():
    segments, groups, is_stored = _rag_layout(set())
    plan = plan_placement(segments[:-1], groups, is_stored, True, Repair("full"))
    group = plan.steps[-1]
    assert plan.tail == Compute((), 14, 15)
    assert group.place[-1].end == 14 and not group.store
    assert group.repair.slots == tuple(range(8, 14))


def test_a_stored_group_is_reused_whole():
    segments, groups, _ = _rag_layout(set())
    stored = {b"bos" + bytes(13), b"sys" + bytes(13), groups[0].key}
    plan = plan_placement(segments, groups, stored.__contains__, True, Repair.parse("blend:0.5"))
    assert plan.steps[-1] == ReuseGroup(0, 5, 15) and plan.cached_tokens == 15 and plan.recomputed_tokens == 0


@pytest.mark.parametrize(("spec", "expected"), [
    ("none", Repair("none")), ("full", Repair("full")), ("head:32", Repair("head", k=32)),
    ("blend:0.15", Repair("blend", fraction=0.15)), (" head:1 ", Repair("head", k=1)),
])
def test_repair_specs_parse_and_print_back(spec, expected):
    assert Repair.parse(spec) == expected
    assert Repair.parse(str(expected)) == expected


@pytest.mark.parametrize("spec", ["", "head", "head:0", "head:-1", "blend:0", "blend:1.5", "blend:x", "all", "full:1"])
def test_bad_repair_specs_are_refused(spec):
    with pytest.raises(ValueError):
        Repair.parse(spec)


def test_blend_counts_round_up_exactly():
    segments, groups, is_stored = _rag_layout(set())
    plan = plan_placement(segments, groups, is_stored, True, Repair.parse("blend:0.15"))
    assert plan.steps[-1].repair.count == math.ceil(0.15 * 7)


def test_an_anchor_after_the_group_start_is_refused():
    segments, _, is_stored = _rag_layout(set())
    with pytest.raises(ValueError, match="anchor"):
        plan_placement(segments, (GroupLayout(b"g" * 16, 2, 5, 6),), is_stored, True, Repair("none"))
