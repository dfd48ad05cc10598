"""Pure planning of prompts with parallel groups: where every token's KV comes from.

Layout: the prompt is laid out contiguously, so for every token its physical cache slot,
its RoPE position and its index in the prompt ids are one number. A parallel group's
members sit one after the other; member ``i`` starts at ``start_i``. Its stored KV was
computed right after its anchor (prompt tokens ``[0, anchor_end)``), so it starts at
position ``anchor_end`` and is placed by moving its keys by ``start_i - anchor_end``.

Rules (on top of ``plan.py``'s for dependent spans):
- A group is always placed before the final call (the final call is a plain causal
  forward, which cannot keep siblings apart), so like a stored span it ends the run of
  misses before it; dependent spans after the last group or hit form the tail.
- A missing member is computed once, right after its anchor (attending to the anchor
  only), and stored; all missing members of a group share one forward.
- When keys cannot move on this model (``movable=False``), a member placed anywhere but
  right after its anchor is computed at its place instead (attending to the anchor only,
  which it then sees at its true distance; not stored).
- A member placed right after its anchor (``start == anchor_end``) is exact: its KV is
  what a sequential prefill computes. Repair touches only the other members:
  ``none``; ``head:k`` their first ``k`` tokens; ``blend:r`` the fraction ``r`` of their
  tokens whose KV deviates most at layer ``BLEND_CHECK_LAYER`` (chosen at execution);
  ``head:k+blend:r`` their first ``k`` tokens and the fraction ``r`` of the rest chosen as
  ``blend`` chooses (EPIC's heads and CacheBlend's selection together);
  ``full`` all of them (the result equals a sequential prefill).
- A repaired group's KV is stored under the group key (which names its members, their
  order, the repair and the prompt before it), unless it ends the prompt; a later prompt
  with the same prefix and group reuses it as is. Unrepaired groups are re-placed from
  their members (a rotation), so they are not stored twice.
- The final call gets at least one token: when the prompt ends with a group or a stored
  span, its last token is left to the final call (recomputed with full attention).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import attrs

from .plan import Compute, PlanSegment, span_starts

BLEND_CHECK_LAYER = 1  # layer 0's KV does not depend on context: deviations show from layer 1 on
REPAIR_KINDS = ("none", "head", "blend", "head+blend", "full")


@attrs.frozen
class Repair:
    """A repair mode: ``none``, ``head:k``, ``blend:r``, ``head:k+blend:r`` or ``full``
    (see the module rules)."""

    kind: str
    k: int = 0
    fraction: float = attrs.field(default=0.0, converter=float)

    def __attrs_post_init__(self) -> None:
        if self.kind not in REPAIR_KINDS:
            raise ValueError(f"repair kind must be one of {REPAIR_KINDS}, got {self.kind!r}")
        if self.kind in ("head", "head+blend") and self.k < 1:
            raise ValueError(f"repair head:k needs k >= 1, got {self.k}")
        if self.kind in ("blend", "head+blend") and not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"repair blend:r needs 0 < r <= 1, got {self.fraction}")

    @classmethod
    def parse(cls, spec: str | Repair) -> Repair:
        """``"none"``, ``"head:32"``, ``"blend:0.15"``, ``"head:8+blend:0.05"``, ``"full"``
        (or a ``Repair``)."""
        if isinstance(spec, Repair):
            return spec
        match = re.fullmatch(r"(none|full)|head:(\d+)|(?:head:(\d+)\+)?blend:([0-9.eE+-]+)", str(spec).strip())
        if match is None:
            raise ValueError(f"repair must be 'none', 'head:K', 'blend:R', 'head:K+blend:R' or 'full', got {spec!r}")
        if match[1]:
            return cls(match[1])
        if match[2]:
            return cls("head", k=int(match[2]))
        try:
            fraction = float(match[4])
        except ValueError:
            raise ValueError(f"bad blend fraction in {spec!r}") from None
        if match[3]:
            return cls("head+blend", k=int(match[3]), fraction=fraction)
        return cls("blend", fraction=fraction)

    def __str__(self) -> str:
        """The one canonical spelling, exact (it names the repair in keys): a blend
        fraction is written as the shortest repr that reads back as the same float, so
        ``blend:0.1500001`` and ``blend:0.15`` never share a key."""
        if self.kind == "head":
            return f"head:{self.k}"
        if self.kind == "blend":
            return f"blend:{self.fraction!r}"
        if self.kind == "head+blend":
            return f"head:{self.k}+blend:{self.fraction!r}"
        return self.kind


@attrs.frozen
class GroupLayout:
    """A parallel group of a prompt: members are segments ``[first, stop)``; each attends
    to prompt tokens ``[0, anchor_end)`` only."""

    key: bytes
    first: int
    stop: int
    anchor_end: int

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.first < self.stop:
            raise ValueError("a group has at least one member")


@attrs.frozen
class Place:
    """Copy the KV of ``segment`` into prompt tokens ``[start, end)``, its keys moved by
    ``delta`` positions. ``from_store``: the KV was stored before this call."""

    segment: int
    start: int
    end: int
    delta: int
    from_store: bool


@attrs.frozen
class ReuseGroup:
    """Copy the stored (repaired) KV of ``group`` into prompt tokens ``[start, end)``."""

    group: int
    start: int
    end: int


@attrs.frozen
class ComputeMember:
    """Compute member ``segment`` after its anchor only, its first token at ``position``.
    ``store``: computed right after the anchor, so it is stored under its key."""

    segment: int
    position: int
    num_tokens: int
    store: bool


@attrs.frozen
class RecomputeTokens:
    """Recompute the KV of prompt tokens at ``slots`` in place (all layers)."""

    slots: tuple[int, ...]


@attrs.frozen
class BlendTokens:
    """Recompute, in place, the ``count`` tokens of ``candidates`` whose KV deviates most
    from a full-context recompute at layer ``BLEND_CHECK_LAYER``, and the ``forced``
    tokens (not candidates) in any case."""

    candidates: tuple[int, ...]
    count: int
    forced: tuple[int, ...] = ()


@attrs.frozen
class PlaceGroup:
    """Assemble one parallel group: compute its missing members (one forward after the
    anchor), place every member, repair, and store the group's KV if ``store``."""

    group: int
    compute: tuple[ComputeMember, ...]
    place: tuple[Place, ...]
    repair: RecomputeTokens | BlendTokens | None
    store: bool


Step = Place | ReuseGroup | Compute | PlaceGroup


@attrs.frozen
class PlacementPlan:
    """Steps that assemble the cache for ``[0, tail.start)``, then the final call.

    Token counts: ``cached_tokens`` were placed from the store (``moved_tokens`` of them
    at a new position); the rest of the prompt is computed this call, of which
    ``fallback_tokens`` at their place because keys cannot move on this model.
    ``recomputed_tokens`` are run a second time, in place, by repair; ``checked_tokens``
    are run through layers ``0..BLEND_CHECK_LAYER`` by ``blend`` to choose them.
    """

    steps: tuple[Step, ...]
    tail: Compute
    total_tokens: int
    repair: Repair

    def _places(self) -> list[Place]:
        out: list[Place] = []
        for step in self.steps:
            if isinstance(step, Place):
                out.append(step)
            elif isinstance(step, PlaceGroup):
                out.extend(step.place)
        return out

    def _groups(self) -> list[PlaceGroup]:
        return [s for s in self.steps if isinstance(s, PlaceGroup)]

    @property
    def cached_tokens(self) -> int:
        placed = sum(p.end - p.start for p in self._places() if p.from_store)
        return placed + sum(s.end - s.start for s in self.steps if isinstance(s, ReuseGroup))

    @property
    def computed_tokens(self) -> int:
        return self.total_tokens - self.cached_tokens

    @property
    def moved_tokens(self) -> int:
        return sum(p.end - p.start for p in self._places() if p.delta != 0)

    @property
    def fallback_tokens(self) -> int:
        return sum(c.num_tokens for step in self._groups() for c in step.compute if not c.store)

    @property
    def recomputed_tokens(self) -> int:
        total = 0
        for step in self._groups():
            if isinstance(step.repair, RecomputeTokens):
                total += len(step.repair.slots)
            elif isinstance(step.repair, BlendTokens):
                total += step.repair.count + len(step.repair.forced)
        return total

    @property
    def checked_tokens(self) -> int:
        return sum(len(s.repair.candidates) for s in self._groups() if isinstance(s.repair, BlendTokens))


def plan_placement(segments: Sequence[PlanSegment], groups: Sequence[GroupLayout],
                   is_stored: Callable[[bytes], bool], movable: bool, repair: Repair) -> PlacementPlan:
    """Plan the cache of a prompt of ``segments`` (in prompt order; group members are the
    segments ``[first, stop)`` of each of ``groups``), following the module rules."""
    starts = span_starts(segments)
    total = starts[-1]
    nodes = _nodes(len(segments), groups)

    def is_barrier(node: tuple[str, int]) -> bool:
        kind, index = node
        return kind == "group" or is_stored(segments[index].key)

    last = max((n for n, node in enumerate(nodes) if is_barrier(node)), default=-1)
    steps: list[Step] = []
    run: list[int] = []
    for n, (kind, index) in enumerate(nodes[: last + 1]):
        if kind == "span" and not is_stored(segments[index].key):
            run.append(index)
            continue
        if run:
            steps.append(Compute(tuple(run), starts[run[0]], starts[run[-1] + 1]))
            run = []
        if kind == "span":
            steps.append(Place(index, starts[index], starts[index + 1], 0, True))
            continue
        group = groups[index]
        ends_prompt = n == len(nodes) - 1
        if is_stored(group.key):
            steps.append(ReuseGroup(index, starts[group.first], starts[group.stop]))
        else:
            steps.append(_plan_group(index, group, segments, starts, is_stored, movable, repair, ends_prompt))

    tail_segments = tuple(index for _, index in nodes[last + 1:])
    if tail_segments:
        return PlacementPlan(tuple(steps), Compute(tail_segments, starts[tail_segments[0]], total), total, repair)
    steps[-1:] = _clip_last(steps[-1], total - 1)
    return PlacementPlan(tuple(steps), Compute((), total - 1, total), total, repair)


def _nodes(num_segments: int, groups: Sequence[GroupLayout]) -> list[tuple[str, int]]:
    """The prompt's nodes in order: ``("span", segment)`` or ``("group", group index)``."""
    nodes: list[tuple[str, int]] = []
    group_at = {g.first: (i, g) for i, g in enumerate(groups)}
    index = 0
    while index < num_segments:
        if index in group_at:
            i, group = group_at[index]
            if group.stop > num_segments:
                raise ValueError(f"group {i} ends past the last segment")
            nodes.append(("group", i))
            index = group.stop
        else:
            nodes.append(("span", index))
            index += 1
    if len({n for kind, n in nodes if kind == "group"}) != len(groups):
        raise ValueError("groups must start on distinct segments and not overlap")
    return nodes


def _plan_group(index: int, group: GroupLayout, segments: Sequence[PlanSegment], starts: Sequence[int],
                is_stored: Callable[[bytes], bool], movable: bool, repair: Repair, ends_prompt: bool) -> PlaceGroup:
    if group.anchor_end > starts[group.first]:
        raise ValueError(f"group {index}'s anchor ends at {group.anchor_end}, after the group starts")
    compute: list[ComputeMember] = []
    place: list[Place] = []
    to_compute: set[bytes] = set()
    candidates: list[range] = []  # tokens of the members that are not exact
    for seg in range(group.first, group.stop):
        start, end, key = starts[seg], starts[seg + 1], segments[seg].key
        delta = start - group.anchor_end
        if delta != 0:
            candidates.append(range(start, end))
        if delta != 0 and not movable:
            compute.append(ComputeMember(seg, start, end - start, store=False))
            place.append(Place(seg, start, end, 0, False))
            continue
        stored = is_stored(key)
        if not stored and key not in to_compute:
            to_compute.add(key)
            compute.append(ComputeMember(seg, group.anchor_end, end - start, store=True))
        place.append(Place(seg, start, end, delta, stored))
    fix = _repair_tokens(repair, candidates)
    return PlaceGroup(index, tuple(compute), tuple(place), fix, store=fix is not None and not ends_prompt)


def _repair_tokens(repair: Repair, candidates: list[range]) -> RecomputeTokens | BlendTokens | None:
    if repair.kind == "head+blend":
        forced = tuple(t for r in candidates for t in r[: repair.k])
        rest = tuple(t for r in candidates for t in r[repair.k:])
        if not rest:
            return RecomputeTokens(forced) if forced else None
        return BlendTokens(rest, math.ceil(round(repair.fraction * len(rest), 9)), forced)
    if repair.kind == "head":
        slots = tuple(t for r in candidates for t in r[: repair.k])
    elif repair.kind in ("full", "blend"):
        slots = tuple(t for r in candidates for t in r)
    else:
        slots = ()
    if not slots:
        return None
    if repair.kind == "blend":
        return BlendTokens(slots, math.ceil(round(repair.fraction * len(slots), 9)))
    return RecomputeTokens(slots)


def _clip_last(step: Step, end: int) -> list[Step]:
    """``step`` (the last before the final call) cut to end at prompt token ``end``."""
    if isinstance(step, (Place, ReuseGroup)):
        return [attrs.evolve(step, end=end)] if end > step.start else []
    if not isinstance(step, PlaceGroup):
        raise AssertionError(f"a {type(step).__name__} cannot end the placed prompt")
    place = tuple(attrs.evolve(p, end=min(p.end, end)) for p in step.place if p.start < end)
    fix = step.repair
    if isinstance(fix, RecomputeTokens):
        slots = tuple(t for t in fix.slots if t < end)
        fix = RecomputeTokens(slots) if slots else None
    elif isinstance(fix, BlendTokens):
        kept = tuple(t for t in fix.candidates if t < end)
        forced = tuple(t for t in fix.forced if t < end)
        fix = BlendTokens(kept, min(fix.count, len(kept)), forced) if kept else (
            RecomputeTokens(forced) if forced else None)
    return [attrs.evolve(step, place=place, repair=fix, store=False)]
