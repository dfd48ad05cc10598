"""The one interpreter of plan steps, and the only writer of the store.

A plan (``core/plan.py`` for dependent spans, ``core/placement.py`` with parallel groups) is a list
of steps over one prompt, in prompt order:

- ``Reuse``: stored KV of a span, as is;
- ``Place``: stored (or just computed) KV of a group member, keys moved to its place;
- ``ReuseGroup``: a stored, repaired group, as is;
- ``Compute``: a run of missing spans, one forward after the KV assembled so far;
- ``PlaceGroup``: a group's missing members computed after their anchor, every member
  placed, the group repaired.

``assemble`` runs the steps and returns the KV slices of the prompt up to the plan's tail;
the final call (``Engine``) copies them into its cache once and computes the tail. Everything computed
is stored (unless ``store=False``), by this class only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from ..cache import kv as kvops
from ..cache.rope import KeyMover
from ..cache.span_kv import SpanKV
from ..cache.store import KVStore
from ..core.placement import BlendTokens, Place, PlaceGroup, PlacementPlan, ReuseGroup
from ..core.plan import Compute, Plan, Reuse
from ..core.prompt import ResolvedPrompt
from .executor import Executor
from .repair import blend_select, compute_isolated, moved_together, recompute

__all__ = ["Interpreter", "store_reads"]


class Interpreter:
    """Runs plan steps with ``executor`` over ``store``; ``mover()`` gives the model's key
    mover (probed on first use)."""

    def __init__(self, executor: Executor, store: KVStore, mover: Callable[[], KeyMover], num_layers: int) -> None:
        self.executor = executor
        self.store = store
        self.mover = mover
        self.num_layers = num_layers

    def assemble(self, plan: Plan | PlacementPlan, prompt: ResolvedPrompt, found: Mapping[bytes, SpanKV | None],
                 input_ids: torch.Tensor, *, store: bool = True) -> list[kvops.KVSlice]:
        """Run ``plan``'s steps; the slices that cover ``[0, plan.tail.start)`` laid one
        after the other (views of stored or fresh KV: read them, never write them; an
        executor copies them into its cache once). ``found``: the stored KV of every key
        the plan reads (looked up under lock)."""
        ranges = prompt.span_ranges()
        pieces: list[kvops.KVSlice] = []  # the prompt's KV so far, laid one after the other
        for step in plan.steps:
            if isinstance(step, Reuse):
                offset = ranges[step.segment][0]
                pieces.append(kvops.KVSlice(found[prompt.segments[step.segment].key], step.start - offset,
                                            step.end - offset))
            elif isinstance(step, Place):
                kv = found[prompt.segments[step.segment].key]
                offset = ranges[step.segment][0]
                pieces.append(self._moved(kv, step.start - offset, step.end - offset, step.delta))
            elif isinstance(step, ReuseGroup):
                group_start = ranges[prompt.groups[step.group].first][0]
                kv = found[prompt.groups[step.group].key]
                pieces.append(kvops.KVSlice(kv, step.start - group_start, step.end - group_start))
            elif isinstance(step, Compute):
                cache = kvops.assemble(pieces)
                self.executor.forward(input_ids[:, step.start:step.end], cache)
                if store:
                    self.store_spans(prompt, cache, step.segments)
                pieces = [kvops.KVSlice.whole(kvops.as_slices(cache))]
            else:
                pieces = self._place_group(step, prompt, input_ids, found, pieces, store)
        return pieces

    def promote(self, fetched: Mapping[bytes, SpanKV]) -> None:
        """Store spans that came from a lower tier (not written back to the tiers)."""
        for key, kv in fetched.items():
            self.store.put(key, kv, write=False)

    def store_spans(self, prompt: ResolvedPrompt, cache, segments: Sequence[int], *, row: int = 0,
                    offset: int = 0) -> None:
        """Store spans ``segments`` of ``prompt`` from batch row ``row`` of ``cache``, where
        the prompt starts at slot ``offset`` (after left padding). Group members are never
        stored from a final cache: there they saw their siblings."""
        ranges = prompt.span_ranges()
        members = {i for g in prompt.groups for i in range(g.first, g.stop)}
        for i in segments:
            if i in members:
                raise RuntimeError(f"segment {i} is a parallel member: its KV is stored by its group's step only")
            start, end = ranges[i]
            self.store.put(prompt.segments[i].key, kvops.extract(cache, offset + start, offset + end, row))

    def _moved(self, kv: SpanKV, start: int, end: int, delta: int) -> kvops.KVSlice:
        """Tokens ``[start, end)`` of ``kv``, moved by ``delta`` where the final call lays
        them (``KVSlice.laid``; no moved copy is made here)."""
        if delta == 0:
            return kvops.KVSlice(kv, start, end)
        mover = self.mover()
        if not mover.movable:
            raise ValueError(f"cannot move keys on this model: {mover.reason}")
        return kvops.KVSlice(kv, start, end, delta, mover)

    def _place_group(self, step: PlaceGroup, prompt: ResolvedPrompt, input_ids: torch.Tensor,
                     found: Mapping[bytes, SpanKV | None], pieces: list[kvops.KVSlice], store: bool
                     ) -> list[kvops.KVSlice]:
        """Compute the group's missing members, place all of them after ``pieces``, repair.
        Returns the pieces covering the prompt up to the end of the group."""
        group = prompt.groups[step.group]
        ranges = prompt.span_ranges()
        computed: dict[bytes, SpanKV] = {}  # at the anchor, by key
        in_place: dict[int, SpanKV] = {}  # at their place, by segment
        if step.compute:
            anchor = kvops.assemble(kvops.cut(pieces, group.anchor_end))
            spans = [(ranges[c.segment][0], c.num_tokens, c.position) for c in step.compute]
            for c, kv in zip(step.compute, compute_isolated(self.executor, anchor, input_ids, spans)):
                key = prompt.segments[c.segment].key
                if c.store:
                    computed[key] = kv
                    if store:
                        self.store.put(key, kv)
                else:
                    in_place[c.segment] = kv
        members, deltas = [], []
        for place in step.place:
            key = prompt.segments[place.segment].key
            if place.segment in in_place:
                kv = in_place[place.segment]
            else:
                kv = found[key] if place.from_store else computed[key]
            offset = ranges[place.segment][0]
            members.append(kvops.KVSlice(kv, place.start - offset, place.end - offset))
            deltas.append(place.delta)
        if step.repair is None:  # moved where the final call lays them (``KVSlice.moved_by``): no copy here
            return pieces + [self._moved(m.kv, m.start, m.end, d) for m, d in zip(members, deltas)]
        if members:
            pieces.append(kvops.KVSlice.whole(moved_together(self.mover(), members, deltas)))
        cache = kvops.assemble(pieces)
        if isinstance(step.repair, BlendTokens):
            slots = blend_select(self.executor, self.num_layers, cache, input_ids, step.repair)
        else:
            slots = step.repair.slots
        if slots:
            recompute(self.executor, cache, input_ids, slots)
        if step.store and store:
            start, end = ranges[group.first][0], ranges[group.stop - 1][1]
            self.store.put(group.key, kvops.extract(cache, start, end))
        return [kvops.KVSlice.whole(kvops.as_slices(cache))]


def store_reads(plan: Plan | PlacementPlan, prompt: ResolvedPrompt) -> list[tuple[bytes, int, int]]:
    """``(key, start, end)``: the prompt tokens ``[start, end)`` that ``plan`` reads from
    the store under ``key``, in prompt order."""
    reads = []
    for step in plan.steps:
        if isinstance(step, Reuse):
            reads.append((prompt.segments[step.segment].key, step.start, step.end))
        elif isinstance(step, ReuseGroup):
            reads.append((prompt.groups[step.group].key, step.start, step.end))
        else:
            places = [step] if isinstance(step, Place) else step.place if isinstance(step, PlaceGroup) else []
            reads += [(prompt.segments[p.segment].key, p.start, p.end) for p in places if p.from_store]
    return reads
