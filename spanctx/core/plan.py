"""Pure planning of one prompt: which spans are reused, which are computed, and how.

Given the spans of a path (key and length each) and which keys the store holds, the
planner returns the steps that build the prompt's KV cache and the tail that the final
model call (``generate`` or a logits forward) must compute. No tensors, no model.

Rules:
- Spans are dependent: a stored span is valid after the same path, whatever was
  evicted before it, so every span is a hit or a miss on its own.
- Misses before the last hit are computed in runs of consecutive misses, each run in
  one forward after the KV assembled so far, and stored.
- Everything after the last hit is the tail: the final call computes it, and its spans
  are stored from the final cache afterwards.
- At least one prompt token is always left to the final call (it needs that token's
  logits, and transformers silently misbehaves when the cache covers the whole prompt).
  When the last span is a hit, its last token is cut from the reused KV and recomputed.
- Reuse must pay: when the reused tokens are fewer than ``min_reuse_fraction`` of the
  tokens that must be computed anyway, the whole prompt is computed from position 0 in
  the final call (a long prefill after a short cached prefix, e.g. a lone BOS, runs with
  an explicit attention mask instead of the causal kernel's fast path, and costs more
  than the few tokens it saves). The spans are stored afterwards all the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs


@attrs.frozen
class PlanSegment:
    """A span of the prompt as the planner sees it."""

    key: bytes
    num_tokens: int

    def __attrs_post_init__(self) -> None:
        if self.num_tokens <= 0:
            raise ValueError("a segment has at least one token")


@attrs.frozen
class Reuse:
    """Copy the stored KV of ``segment`` for prompt tokens ``[start, end)``."""

    segment: int
    start: int
    end: int


@attrs.frozen
class Compute:
    """Run the model on prompt tokens ``[start, end)`` after the KV assembled so far,
    then store each of ``segments`` (indices of spans fully inside the range)."""

    segments: tuple[int, ...]
    start: int
    end: int


@attrs.frozen
class Plan:
    """Steps that assemble the cache for ``[0, tail.start)``, then the final call."""

    steps: tuple[Reuse | Compute, ...]
    tail: Compute
    total_tokens: int

    @property
    def cached_tokens(self) -> int:
        return sum(s.end - s.start for s in self.steps if isinstance(s, Reuse))

    @property
    def computed_tokens(self) -> int:
        return self.total_tokens - self.cached_tokens

    @property
    def reused_segments(self) -> tuple[int, ...]:
        return tuple(s.segment for s in self.steps if isinstance(s, Reuse))


def plan_prompt(segments: Sequence[PlanSegment], is_stored: Callable[[bytes], bool],
                min_reuse_fraction: float = 0.0) -> Plan:
    """Plan the cache of a prompt made of ``segments`` (see the module rules)."""
    plan = _plan_reuse(segments, is_stored)
    if plan.cached_tokens < min_reuse_fraction * plan.computed_tokens:
        return Plan((), Compute(tuple(range(len(segments))), 0, plan.total_tokens), plan.total_tokens)
    return plan


def span_starts(segments: Sequence[PlanSegment]) -> list[int]:
    """Where each segment starts in the prompt, then the prompt's length."""
    if not segments:
        raise ValueError("cannot plan an empty prompt")
    starts = [0]
    for seg in segments:
        starts.append(starts[-1] + seg.num_tokens)
    return starts


def _plan_reuse(segments: Sequence[PlanSegment], is_stored: Callable[[bytes], bool]) -> Plan:
    """The plan that reuses every stored span."""
    starts = span_starts(segments)
    total = starts[-1]
    hits = [is_stored(seg.key) for seg in segments]
    last_hit = max((i for i, hit in enumerate(hits) if hit), default=-1)

    steps: list[Reuse | Compute] = []
    run: list[int] = []
    for i in range(last_hit + 1):
        if hits[i]:
            if run:
                steps.append(Compute(tuple(run), starts[run[0]], starts[i]))
                run = []
            steps.append(Reuse(i, starts[i], starts[i + 1]))
        else:
            run.append(i)

    if last_hit == len(segments) - 1:
        # the whole prompt is stored: leave its last token to the final call
        last = steps[-1]
        assert isinstance(last, Reuse)
        if last.end - last.start == 1:
            steps.pop()
        else:
            steps[-1] = Reuse(last.segment, last.start, last.end - 1)
        return Plan(tuple(steps), Compute((), total - 1, total), total)

    tail_segments = tuple(range(last_hit + 1, len(segments)))
    return Plan(tuple(steps), Compute(tail_segments, starts[last_hit + 1], total), total)


def plan_shared(segments: Sequence[PlanSegment], shared: int, is_stored: Callable[[bytes], bool]) -> Plan:
    """The plan of a batch row made of ``segments`` whose first ``shared`` spans every row has.

    Its steps assemble ALL of the shared spans: stored ones are reused, each run of
    missing ones is computed (and stored). Unlike ``plan_prompt``'s, no shared token is
    left to the final call, since the rows run after them. Its tail is the row's own
    spans, which the batch computes whether they are stored or not.
    """
    shared_keys = {seg.key for seg in segments[:shared]}
    plan = plan_prompt(segments, lambda key: key in shared_keys and is_stored(key))
    missing = tuple(i for i in plan.tail.segments if i < shared)
    if not missing:
        return plan
    end = plan.tail.start + sum(segments[i].num_tokens for i in missing)
    return Plan((*plan.steps, Compute(missing, plan.tail.start, end)),
                Compute(plan.tail.segments[len(missing):], end, plan.total_tokens), plan.total_tokens)
