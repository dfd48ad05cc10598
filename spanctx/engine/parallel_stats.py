"""What a call did with its parallel groups: the planner's placement, counted for the stats."""

from __future__ import annotations

import attrs

from ..core.placement import PlaceGroup, PlacementPlan, ReuseGroup

__all__ = ["ParallelStats", "parallel_stats"]


@attrs.frozen
class ParallelStats:
    """What one call did with its parallel groups (token counts are prompt tokens).

    moved_tokens: reused with their keys rotated to a new position.
    fallback_tokens: computed at their place because keys cannot move on this model
        (``fallback_reason`` says why); counted in ``computed_tokens`` too.
    recomputed_tokens: run again, in place and through all layers, by ``repair``.
    checked_tokens: run through the first layers by ``blend`` to choose which tokens to
        recompute (``spanctx.core.placement.BLEND_CHECK_LAYER``).
    """

    repair: str
    groups: int
    moved_tokens: int
    fallback_tokens: int
    fallback_reason: str | None
    recomputed_tokens: int
    checked_tokens: int


def parallel_stats(plan: PlacementPlan, reason: str | None) -> ParallelStats:
    """What ``plan`` does with its groups; ``reason``: why keys cannot move, if they cannot."""
    return ParallelStats(
        repair=str(plan.repair),
        groups=sum(1 for s in plan.steps if isinstance(s, (PlaceGroup, ReuseGroup))),
        moved_tokens=plan.moved_tokens,
        fallback_tokens=plan.fallback_tokens,
        fallback_reason=reason if plan.fallback_tokens else None,
        recomputed_tokens=plan.recomputed_tokens,
        checked_tokens=plan.checked_tokens,
    )
