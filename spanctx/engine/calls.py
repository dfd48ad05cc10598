"""What the engine's calls take and give: an ``Assembly`` (a prompt with its KV assembled
up to its tail, for the final call), ``Generated`` (a decode) and ``RowLogits`` (rows of
logits), the last two naming the executor that ran them."""

from __future__ import annotations

import attrs
import torch

from ..cache import kv as kvops
from ..cache.tiers import TierCallStats
from ..core.placement import PlacementPlan
from ..core.plan import Plan
from ..core.prompt import ResolvedPrompt
from .parallel_stats import ParallelStats
from .static_layout import ExecStats

__all__ = ["Assembly", "Generated", "RowLogits"]


@attrs.define(eq=False)
class Assembly:
    """A prompt with its KV assembled up to ``tail_start``; the final call runs the rest.

    ``pieces``: the KV of ``[0, tail_start)`` as slices laid one after the other (None
    without reuse); ``cache`` copies them into a fresh ``DynamicCache`` on first use (the
    eager final call's; a static executor copies the pieces into its own buffers).
    """

    prompt: ResolvedPrompt
    input_ids: torch.Tensor  # [1, S] the whole prompt
    pieces: list[kvops.KVSlice] | None
    plan: Plan | PlacementPlan | None  # None without reuse
    parallel: ParallelStats | None = None
    tiers: TierCallStats | None = None  # what the lower tiers gave (None: the store has none)
    _cache: object | None = None

    @property
    def cache(self):
        """A fresh ``DynamicCache`` of ``[0, tail_start)`` (None without reuse)."""
        if self._cache is None and self.pieces is not None:
            self._cache = kvops.assemble(self.pieces)
        return self._cache

    @property
    def tail_start(self) -> int:
        return self.plan.tail.start if self.plan else 0

    @property
    def cached_tokens(self) -> int:
        return self.plan.cached_tokens if self.plan else 0

    @property
    def keep_at_least(self) -> int:
        """The fewest of its cached tokens a final call may keep and recompute the rest
        causally: the end of its last parallel group (a group's KV is not what a causal
        forward computes, nor is what was stored after it), at most ``tail_start``."""
        ranges = self.prompt.span_ranges()
        group_end = max((ranges[g.stop - 1][1] for g in self.prompt.groups), default=0)
        return min(group_end, self.tail_start) if self.plan is not None else 0


@attrs.frozen(eq=False)
class Generated:
    """What a decode made: ``sequences`` ``[B, S + N]``, when its first new token was on
    the host, per new token the ``[B, V]`` scores / logits it asked for (else None), the
    executor that ran it and, when the static one was set up but not used, why."""

    sequences: torch.Tensor
    first_token_at: float | None
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    executor: str = "eager"
    fallback: str | None = None
    static: ExecStats | None = None  # what the static executor ran and paid (buckets built on this call)


@attrs.frozen(eq=False)
class RowLogits:
    """What ``forward_rows`` computed: float32 ``logits``, the executor that ran them and,
    when the static one was set up but not used, why."""

    logits: torch.Tensor
    executor: str = "eager"
    fallback: str | None = None
    static: ExecStats | None = None
