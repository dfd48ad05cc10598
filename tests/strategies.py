"""Hypothesis strategies shared by the test files (one block per feature)."""

from __future__ import annotations

import attrs
from hypothesis import strategies as st

from spanctx.placement import GroupLayout, Repair
from spanctx.plan import PlanSegment

# -- parallel spans (issue 3) ------------------------------------------------------------


@attrs.frozen
class PlacementCase:
    """A prompt layout for the placement planner, with what the store holds."""

    segments: tuple[PlanSegment, ...]
    groups: tuple[GroupLayout, ...]
    stored: frozenset[bytes]
    movable: bool
    repair: Repair


def repairs() -> st.SearchStrategy[Repair]:
    return st.one_of(
        st.sampled_from([Repair("none"), Repair("full")]),
        st.integers(1, 6).map(lambda k: Repair("head", k=k)),
        st.sampled_from([0.1, 0.25, 0.5, 1.0]).map(lambda r: Repair("blend", fraction=r)),
    )


@st.composite
def placement_cases(draw, max_nodes: int = 6) -> PlacementCase:
    """Random prompts of dependent spans and parallel groups (members may repeat), with
    an optional BOS, random anchors, a random stored subset of all keys, and a random
    rope (movable or not) and repair mode."""
    counter = iter(range(1 << 30))

    def new_key() -> bytes:
        return next(counter).to_bytes(16, "little")

    segments: list[PlanSegment] = []
    groups: list[GroupLayout] = []
    ends = [0]  # prompt tokens after the first d nodes
    if draw(st.booleans()):
        segments.append(PlanSegment(new_key(), 1))
        ends = [1]
    for _ in range(draw(st.integers(1, max_nodes))):
        if draw(st.booleans()):
            segments.append(PlanSegment(new_key(), draw(st.integers(1, 5))))
            ends.append(ends[-1] + segments[-1].num_tokens)
            continue
        anchor_end = ends[draw(st.integers(0, len(ends) - 1))]
        first = len(segments)
        for _ in range(draw(st.integers(1, 4))):
            if len(segments) > first and draw(st.integers(0, 4)) == 0:  # a repeated member
                segments.append(draw(st.sampled_from(segments[first:])))
            else:
                segments.append(PlanSegment(new_key(), draw(st.integers(1, 5))))
        groups.append(GroupLayout(new_key(), first, len(segments), anchor_end))
        ends.append(ends[-1] + sum(s.num_tokens for s in segments[first:]))
    all_keys = sorted({s.key for s in segments} | {g.key for g in groups})
    stored = draw(st.sets(st.sampled_from(all_keys))) if all_keys else set()
    return PlacementCase(tuple(segments), tuple(groups), frozenset(stored), draw(st.booleans()), draw(repairs()))


@attrs.frozen
class ParallelPromptSpec:
    """A prompt as nodes: ``("span", ids)`` or ``("group", members, anchor_depth)``, where
    ``anchor_depth`` counts the nodes before the group that its members attend to."""

    nodes: tuple[tuple, ...]


def token_lists(max_len: int = 6) -> st.SearchStrategy[tuple[int, ...]]:
    return st.lists(st.integers(0, 255), min_size=1, max_size=max_len).map(tuple)


@st.composite
def parallel_prompt_specs(draw, max_nodes: int = 3) -> ParallelPromptSpec:
    """Random prompts of byte-token spans and parallel groups (at least one group), each
    group anchored at a random prefix of the path."""
    nodes: list[tuple] = []
    count = draw(st.integers(1, max_nodes))
    group_at = draw(st.integers(0, count - 1))
    for n in range(count):
        if n == group_at or draw(st.booleans()):
            members = tuple(draw(st.lists(token_lists(), min_size=1, max_size=3)))
            nodes.append(("group", members, draw(st.integers(0, n))))
        else:
            nodes.append(("span", draw(token_lists())))
    return ParallelPromptSpec(tuple(nodes))
