"""The forwards behind parallel groups: members computed after their anchor only, and
repair of chosen tokens in place (``placement.py`` plans them, ``masks.py`` says what
each query sees). Every model call goes through the executor given."""

from __future__ import annotations

import torch

from ..cache import kv as kvops
from ..cache.rope import KeyMover
from ..cache.span_kv import SpanKV
from ..core.placement import BLEND_CHECK_LAYER, BlendTokens
from .executor import Executor
from .masks import in_place_allowed, isolated_allowed

__all__ = ["blend_select", "compute_isolated", "moved_together", "recompute"]


def compute_isolated(executor: Executor, anchor, input_ids: torch.Tensor,
                     spans: list[tuple[int, int, int]]) -> list[SpanKV]:
    """KV of each ``(start, num_tokens, position)`` span of the prompt, computed at
    ``position`` after the ``anchor`` cache only (not after each other): one forward."""
    anchor_len = kvops.cache_length(anchor)
    device = input_ids.device
    ids = torch.cat([input_ids[:, s:s + n] for s, n, _ in spans], dim=1)  # [1, Q]
    positions = torch.cat([torch.arange(p, p + n, device=device) for _, n, p in spans])  # [Q]
    member_of = torch.cat([torch.full((n,), i, device=device) for i, (_, n, _) in enumerate(spans)])
    executor.forward(ids, anchor, positions=positions, allowed=isolated_allowed(anchor_len, member_of, positions))
    out, offset = [], anchor_len
    for _, n, _ in spans:
        out.append(kvops.extract(anchor, offset, offset + n))
        offset += n
    return out


def recompute(executor: Executor, cache, input_ids: torch.Tensor, slots: tuple[int, ...]) -> None:
    """Recompute the KV of prompt tokens ``slots`` in place, through all layers."""
    cache_len = kvops.cache_length(cache)
    slots_t = torch.tensor(slots, device=input_ids.device)
    executor.forward(input_ids[:, slots_t], cache, positions=slots_t, allowed=in_place_allowed(cache_len, slots_t))
    kvops.move_tail_into(cache, cache_len, slots_t)


def blend_select(executor: Executor, num_layers: int, cache, input_ids: torch.Tensor,
                 blend: BlendTokens) -> tuple[int, ...]:
    """CacheBlend-style selection. Runs every candidate through layers ``0..c`` (``c =
    BLEND_CHECK_LAYER``) attending to everything before it, as a sequential prefill over
    the cache before the group would; keeps that KV of layers ``0..c`` for all
    candidates (it is what ``full`` computes there); returns the ``blend.count``
    candidates whose layer-``c`` KV moved most (squared L2 of the key and value changes,
    summed over heads), with ``blend.forced``: the caller recomputes them through all layers.
    """
    cache_len = kvops.cache_length(cache)
    check_layer = min(BLEND_CHECK_LAYER, num_layers - 1)
    candidates = torch.tensor(blend.candidates, device=input_ids.device)
    executor.forward(input_ids[:, candidates], cache, positions=candidates,
                     allowed=in_place_allowed(cache_len, candidates), stop_after_layer=check_layer)
    k, v = kvops.layer_kv(cache, check_layer)  # [1, H, cache_len + Q, D]
    deviation = ((k[:, :, cache_len:] - k[:, :, candidates]).float().pow(2).sum(dim=(0, 1, 3))
                 + (v[:, :, cache_len:] - v[:, :, candidates]).float().pow(2).sum(dim=(0, 1, 3)))  # [Q]
    kvops.move_tail_into(cache, cache_len, candidates)
    chosen = candidates[deviation.topk(blend.count).indices]
    return tuple(sorted(chosen.tolist() + list(blend.forced)))


def moved_together(mover: KeyMover, members: list[kvops.KVSlice], deltas: list[int]) -> SpanKV:
    """``members`` laid one after the other, each moved by its delta: one concatenation
    and one rotation per layer for the whole group (not one per member)."""
    group = kvops.as_slices(kvops.assemble(members))
    if not any(deltas):
        return group
    # per_token: [S] the delta of each token's member
    per_token = torch.repeat_interleave(torch.tensor(deltas), torch.tensor([m.num_tokens for m in members]))
    return mover.shift(group, per_token)
