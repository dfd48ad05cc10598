"""Parallel spans at run time: resolve a context with parallel groups, assemble its cache.

``resolve_layout`` turns a context into prompt ids, one segment per span (group members
included) and one ``GroupLayout`` per group, with their keys:
- a dependent span: ``span_key(parent key, ids)``, exactly as for plain prompts, so the
  spans before a group are shared with plain prompts;
- a group member: ``parallel_key(anchor key, ids)``: its KV, computed right after its
  anchor, is valid wherever it follows that anchor;
- a group: ``group_key(parent key, member keys in order, repair)``; what follows a group
  chains this key, since its KV depends on the group's order and repair (a lone member
  right after its anchor is exact, so its group key names no repair).

``build_cache`` plans the prompt against the store (``placement.py``) and executes the
plan: reuse and move stored KV (``rope.py``), compute missing members after their anchor
and repair selected tokens in place (``inplace.py``), store what it computed.
"""

from __future__ import annotations

import attrs
import torch

from . import kv as kvops
from .hf import cache_kwargs
from .inplace import forward_queries, in_place_allowed, isolated_allowed
from .keys import group_key, parallel_key, root_key, span_key
from .placement import (
    BLEND_CHECK_LAYER,
    BlendTokens,
    GroupLayout,
    Place,
    PlaceGroup,
    PlacementPlan,
    Repair,
    ReuseGroup,
    plan_placement,
)
from .plan import Compute, PlanSegment
from .prompt import PromptResolver, ResolvedPrompt
from .spans import Context, ParallelGroup
from .store import SpanKV


@attrs.frozen
class ParallelPrompt(ResolvedPrompt):
    """A resolved prompt with parallel groups: ``segments`` holds every span, members
    included, in prompt order; ``groups`` says which segments form each group."""

    groups: tuple[GroupLayout, ...] = ()


@attrs.frozen
class ParallelStats:
    """What one call did with its parallel groups (token counts are prompt tokens).

    moved_tokens: reused with their keys rotated to a new position.
    fallback_tokens: computed at their place because keys cannot move on this model
        (``fallback_reason`` says why); counted in ``computed_tokens`` too.
    recomputed_tokens: run again, in place and through all layers, by ``repair``.
    checked_tokens: run through layers ``0..BLEND_CHECK_LAYER`` by ``blend`` to choose
        which tokens to recompute.
    """

    repair: str
    groups: int
    moved_tokens: int
    fallback_tokens: int
    fallback_reason: str | None
    recomputed_tokens: int
    checked_tokens: int


def resolve_layout(resolver: PromptResolver, ctx: Context, repair: Repair) -> ParallelPrompt:
    """Ids, segments and groups of ``ctx`` (see the module docstring for the keys)."""
    nodes = ctx.spans
    if not nodes:
        raise ValueError("the context is empty: append at least one span before generating")
    namespace = resolver.namespace
    key = root_key(namespace)
    token_ids: list[int] = []
    segments: list[PlanSegment] = []
    groups: list[GroupLayout] = []
    if resolver.bos:
        key = span_key(key, resolver.bos, namespace)
        segments.append(PlanSegment(key, len(resolver.bos)))
        token_ids += resolver.bos
    after_node = [(key, len(token_ids))]  # (key, tokens) of the path's first d nodes, BOS included
    for node in nodes:
        if isinstance(node, ParallelGroup):
            if node.anchor_depth >= len(after_node):
                raise ValueError(f"a group's anchor ({node.anchor_depth} nodes) is longer than the path before it")
            anchor_key, anchor_end = after_node[node.anchor_depth]
            first, exact = len(segments), len(node.members) == 1 and len(token_ids) == anchor_end
            for member in node.members:
                ids = resolver.span_ids(member)
                segments.append(PlanSegment(parallel_key(anchor_key, ids, namespace), len(ids)))
                token_ids += ids
            # a lone member right after its anchor is exact: no repair mode changes it
            mode = "none" if exact else str(repair)
            key = group_key(key, [s.key for s in segments[first:]], mode, namespace)
            groups.append(GroupLayout(key, first, len(segments), anchor_end))
        else:
            ids = resolver.span_ids(node)
            key = span_key(key, ids, namespace)
            segments.append(PlanSegment(key, len(ids)))
            token_ids += ids
        after_node.append((key, len(token_ids)))
    return ParallelPrompt(tuple(token_ids), tuple(segments), tuple(groups))


def parallel_stats(plan: PlacementPlan, reason: str | None) -> ParallelStats:
    return ParallelStats(
        repair=str(plan.repair),
        groups=sum(1 for s in plan.steps if isinstance(s, (PlaceGroup, ReuseGroup))),
        moved_tokens=plan.moved_tokens,
        fallback_tokens=plan.fallback_tokens,
        fallback_reason=reason if plan.fallback_tokens else None,
        recomputed_tokens=plan.recomputed_tokens,
        checked_tokens=plan.checked_tokens,
    )


def build_cache(rt, prompt: ParallelPrompt, input_ids: torch.Tensor, repair: Repair):
    """Plan ``prompt`` against ``rt.store`` and assemble its cache for ``[0, plan.tail.start)``.

    ``rt`` is the ``Runtime``: its model, store and key mover are used, and what is
    computed is stored. Returns ``(plan, cache)``; the cache is fresh (owns its tensors).
    """
    keys = [s.key for s in prompt.segments]
    if repair.kind != "none":  # only repaired groups are ever stored
        keys += [g.key for g in prompt.groups]
    with rt.store.locked(keys):
        found = {key: rt.store.lookup(key) for key in dict.fromkeys(keys)}
        for kv in found.values():
            if kv is not None:
                rt._check_layout(kv)
        plan = plan_placement(prompt.segments, prompt.groups, lambda key: found.get(key) is not None,
                              rt.key_mover.movable, repair)
        cache = _execute(rt, plan, prompt, input_ids, found)
    return plan, cache


def _execute(rt, plan: PlacementPlan, prompt: ParallelPrompt, input_ids: torch.Tensor,
             found: dict[bytes, SpanKV | None]):
    """Run the plan's steps in prompt order; returns a fresh cache of ``[0, plan.tail.start)``."""
    ranges = prompt.span_ranges()
    pieces: list[kvops.KVSlice] = []  # the prompt's KV so far, laid one after the other
    for step in plan.steps:
        if isinstance(step, Place):
            pieces.append(_placed(rt.key_mover, found[prompt.segments[step.segment].key], step,
                                  ranges[step.segment][0]))
        elif isinstance(step, ReuseGroup):
            group_start = ranges[prompt.groups[step.group].first][0]
            kv = found[prompt.groups[step.group].key]
            pieces.append(kvops.KVSlice(kv, step.start - group_start, step.end - group_start))
        elif isinstance(step, Compute):
            cache = kvops.assemble(pieces)
            rt.model(input_ids=input_ids[:, step.start:step.end], use_cache=True, **cache_kwargs(rt.model, cache),
                     logits_to_keep=1)
            rt.store_spans(prompt, cache, step.segments)
            pieces = [kvops.KVSlice.whole(kvops.as_slices(cache))]
        else:
            pieces = _place_group(rt, step, prompt, input_ids, found, pieces)
    return kvops.assemble(pieces)


def _placed(mover, kv: SpanKV, place: Place, segment_start: int) -> kvops.KVSlice:
    """The tokens ``place`` takes from ``kv`` (a whole segment), moved by ``place.delta``."""
    start, end = place.start - segment_start, place.end - segment_start
    if place.delta == 0:
        return kvops.KVSlice(kv, start, end)
    return kvops.KVSlice.whole(mover.shift(kvops.take(kv, start, end), place.delta))


def _moved_together(mover, members: list[kvops.KVSlice], deltas: list[int]) -> SpanKV:
    """``members`` laid one after the other, each moved by its delta: one concatenation
    and one rotation per layer for the whole group (not one per member)."""
    group = kvops.as_slices(kvops.assemble(members))
    if not any(deltas):
        return group
    # per_token: [S] the delta of each token's member
    per_token = torch.repeat_interleave(torch.tensor(deltas), torch.tensor([m.num_tokens for m in members]))
    return mover.shift(group, per_token)


def _place_group(rt, step: PlaceGroup, prompt: ParallelPrompt, input_ids: torch.Tensor,
                 found: dict[bytes, SpanKV | None], pieces: list[kvops.KVSlice]) -> list[kvops.KVSlice]:
    """Compute the group's missing members, place all of them after ``pieces``, repair.
    Returns the pieces covering the prompt up to the end of the group."""
    group = prompt.groups[step.group]
    ranges = prompt.span_ranges()
    computed: dict[bytes, SpanKV] = {}  # at the anchor, by key
    in_place: dict[int, SpanKV] = {}  # at their place, by segment
    if step.compute:
        anchor = kvops.assemble(kvops.cut(pieces, group.anchor_end))
        spans = [(ranges[c.segment][0], c.num_tokens, c.position) for c in step.compute]
        for c, kv in zip(step.compute, _compute_isolated(rt.model, anchor, input_ids, spans)):
            key = prompt.segments[c.segment].key
            if c.store:
                computed[key] = kv
                rt.store.put(key, kv)
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
    if members:
        pieces.append(kvops.KVSlice.whole(_moved_together(rt.key_mover, members, deltas)))
    if step.repair is None:
        return pieces
    cache = kvops.assemble(pieces)
    if isinstance(step.repair, BlendTokens):
        slots = _blend_select(rt.model, cache, input_ids, step.repair)
    else:
        slots = step.repair.slots
    if slots:
        _recompute(rt.model, cache, input_ids, slots)
    if step.store:
        start, end = ranges[group.first][0], ranges[group.stop - 1][1]
        rt.store.put(group.key, kvops.extract(cache, start, end))
    return [kvops.KVSlice.whole(kvops.as_slices(cache))]


def _compute_isolated(model, anchor, input_ids: torch.Tensor,
                      spans: list[tuple[int, int, int]]) -> list[SpanKV]:
    """KV of each ``(start, num_tokens, position)`` span of the prompt, computed at
    ``position`` after the ``anchor`` cache only (not after each other): one forward."""
    anchor_len = kvops.cache_length(anchor)
    device = input_ids.device
    ids = torch.cat([input_ids[:, s:s + n] for s, n, _ in spans], dim=1)  # [1, Q]
    positions = torch.cat([torch.arange(p, p + n, device=device) for _, n, p in spans])  # [Q]
    member_of = torch.cat([torch.full((n,), i, device=device) for i, (_, n, _) in enumerate(spans)])
    forward_queries(model, anchor, ids, positions, isolated_allowed(anchor_len, member_of, positions))
    out, offset = [], anchor_len
    for _, n, _ in spans:
        out.append(kvops.extract(anchor, offset, offset + n))
        offset += n
    return out


def _recompute(model, cache, input_ids: torch.Tensor, slots: tuple[int, ...]) -> None:
    """Recompute the KV of prompt tokens ``slots`` in place, through all layers."""
    cache_len = kvops.cache_length(cache)
    slots_t = torch.tensor(slots, device=input_ids.device)
    forward_queries(model, cache, input_ids[:, slots_t], slots_t, in_place_allowed(cache_len, slots_t))
    kvops.move_tail_into(cache, cache_len, slots_t)


def _blend_select(model, cache, input_ids: torch.Tensor, blend: BlendTokens) -> tuple[int, ...]:
    """CacheBlend-style selection. Runs every candidate through layers ``0..c`` (``c =
    BLEND_CHECK_LAYER``) attending to everything before it, as a sequential prefill over
    the cache before the group would; keeps that KV of layers ``0..c`` for all
    candidates (it is what ``full`` computes there); returns the
    ``blend.count`` candidates whose layer-``c`` KV moved most (squared L2 of the key and
    value changes, summed over heads), which the caller then recomputes through all layers.
    """
    cache_len = kvops.cache_length(cache)
    check_layer = min(BLEND_CHECK_LAYER, model.config.get_text_config().num_hidden_layers - 1)
    candidates = torch.tensor(blend.candidates, device=input_ids.device)
    forward_queries(model, cache, input_ids[:, candidates], candidates, in_place_allowed(cache_len, candidates),
                    stop_after_layer=check_layer)
    k, v = kvops.layer_kv(cache, check_layer)  # [1, H, cache_len + Q, D]
    deviation = ((k[:, :, cache_len:] - k[:, :, candidates]).float().pow(2).sum(dim=(0, 1, 3))
                 + (v[:, :, cache_len:] - v[:, :, candidates]).float().pow(2).sum(dim=(0, 1, 3)))  # [Q]
    kvops.move_tail_into(cache, cache_len, candidates)
    chosen = candidates[deviation.topk(blend.count).indices]
    return tuple(sorted(chosen.tolist()))
