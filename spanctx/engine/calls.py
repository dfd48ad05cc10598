"""What the engine's calls take and give: an ``Assembly`` (a prompt with its KV assembled
up to its tail), a ``FinalCall`` (the one value every executor runs: rows over stored
prefixes, a forward or a decode, the spans to store) and its ``FinalOutput``, which names
the executor that ran it."""

from __future__ import annotations

from array import array
from collections.abc import Mapping, Sequence

import attrs
import torch

from ..cache import kv as kvops
from ..cache.tiers import TierCallStats
from ..core.options import CallOptions
from ..core.placement import PlacementPlan
from ..core.plan import Plan
from ..core.prompt import ResolvedPrompt
from .parallel_stats import ParallelStats
from .static_layout import ExecStats, Row

__all__ = ["Assembly", "FinalCall", "FinalOutput", "ids_tensor"]


def ids_tensor(token_ids: Sequence[int], device: torch.device) -> torch.Tensor:
    """``[S]`` int64 on ``device``, through an int64 buffer: ``torch.tensor`` over a long
    tuple of ints costs milliseconds."""
    return torch.frombuffer(array("q", token_ids), dtype=torch.long).to(device)


@attrs.define(eq=False)
class Assembly:
    """A prompt with its KV assembled up to ``tail_start``; the final call runs the rest.

    ``pieces``: the KV of ``[0, tail_start)`` as slices laid one after the other (None
    without reuse); the executor that runs the final call lays them where it needs them.
    """

    prompt: ResolvedPrompt
    input_ids: torch.Tensor  # [1, S] the whole prompt
    pieces: list[kvops.KVSlice] | None
    plan: Plan | PlacementPlan | None  # None without reuse
    parallel: ParallelStats | None = None
    tiers: TierCallStats | None = None  # what the lower tiers gave (None: the store has none)

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
class FinalCall:
    """One final call, as every executor takes it (``Executor.run``).

    ``rows``: per prompt of ``prompts``, its ids, the stored KV of its first ``start``
    tokens and an aLoRA offset (``static_layout.Row``). Either a forward, returning per
    row the logits of its last ``logits_to_keep`` tokens (0: every tail token; None: what
    the model returns, for heads without ``logits_to_keep``) or, with ``hidden``, the
    backbone's states; or a decode (``decode``: the options, ``kwargs``: HF ``generate``'s).
    ``kv``: also return the whole prompt's KV (one row). ``store_from[r]``: prompt ``r``'s
    spans from that segment on that the store lacks are stored (None: none).
    ``reuse``: the rows' prefixes came through the store (without it nothing is stored);
    ``floors[r]``: the fewest cached tokens row ``r`` may keep when an eager batch
    recomputes some causally (``Assembly.keep_at_least``). Build one with ``tails``,
    ``after`` or ``whole``.
    """

    prompts: tuple[ResolvedPrompt, ...]
    rows: tuple[Row, ...]
    store_from: tuple[int | None, ...]
    logits_to_keep: int | None = 1
    hidden: bool = False
    kv: bool = False
    decode: CallOptions | None = None
    kwargs: Mapping = attrs.field(factory=dict)
    reuse: bool = True
    floors: tuple[int, ...] | None = None

    @property
    def new_tokens(self) -> int:
        """Tokens a row decodes at most (0: a forward)."""
        return 0 if self.decode is None else self.decode.max_new_tokens

    @classmethod
    def tails(cls, calls: Sequence[Assembly], *, alora_starts: Sequence[int | None] | None = None,
              **what) -> FinalCall:
        """The rest of each assembled prompt (``alora_starts[r]``: the prompt index of row
        ``r``'s aLoRA invocation); each prompt's spans from its tail on are stored."""
        starts = alora_starts or [None] * len(calls)
        rows = tuple(Row(c.input_ids[0], tuple(c.pieces or ()), c.tail_start,
                         None if a is None else c.prompt.num_tokens - a) for c, a in zip(calls, starts))
        tails = tuple(c.plan.tail.segments[0] if c.plan is not None and c.plan.tail.segments else None
                      for c in calls)
        return cls(tuple(c.prompt for c in calls), rows, tails, reuse=all(c.pieces is not None for c in calls),
                   floors=tuple(c.keep_at_least for c in calls), **what)

    @classmethod
    def after(cls, context: Sequence[kvops.KVSlice], prompts: Sequence[ResolvedPrompt], start: int,
              device: torch.device, *, store_from: int | None = None,
              alora_starts: Sequence[int] | None = None, **what) -> FinalCall:
        """The tokens from ``start`` on of every prompt after ``context``, the KV of their
        common first ``start`` tokens (checks, scores); ``store_from``: as the field, for
        every row."""
        rows = tuple(Row(ids_tensor(p.token_ids, device), tuple(context), start,
                         None if alora_starts is None else p.num_tokens - alora_starts[r])
                     for r, p in enumerate(prompts))
        return cls(tuple(prompts), rows, (store_from,) * len(prompts), **what)

    @classmethod
    def whole(cls, prompt: ResolvedPrompt, device: torch.device, *, store: bool, **what) -> FinalCall:
        """All of ``prompt`` from position 0 as one causal forward; with ``store`` its spans
        the store lacks are stored, when it has no parallel groups (a causal forward is not
        what a group's KV is)."""
        row = Row(ids_tensor(prompt.token_ids, device))
        return cls((prompt,), (row,), (0 if store and not prompt.groups else None,), logits_to_keep=None, **what)


@attrs.frozen(eq=False)
class FinalOutput:
    """What a final call gave. A forward: ``logits`` ``[R, K, V]`` (``FinalCall``'s keep;
    with 0, ``[R, W, V]``: row ``r``'s tail tokens first, padding after) or ``hidden``
    ``[R, T, H]``; ``kv``: the whole prompt's KV as slices that stay valid (when asked). A
    decode: ``sequences`` ``[B, W + N]`` (prompts left-padded to the longest ``W``), when
    its first new token was on the host, per new token the ``[B, V]`` scores / logits it
    asked for. Both: the executor that ran it, why the static one did not (when it was
    set up), the static executor's own stats, and per row how many of its stored prefix
    tokens the call kept (``kept``; the eager left-padded batch recomputes some, causally).

    ``cache``, ``offsets`` and ``batch`` say where the prompts' KV sits after the call
    (row ``r``'s prompt from slot ``offsets[r]`` of batch row ``r``, or of one row): what
    the engine stores from.
    """

    executor: str
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    kv: list[kvops.KVSlice] | None = None
    sequences: torch.Tensor | None = None
    scores: tuple[torch.Tensor, ...] | None = None
    step_logits: tuple[torch.Tensor, ...] | None = None
    first_token_at: float | None = None
    fallback: str | None = None
    static: ExecStats | None = None  # what the static executor ran and paid (buckets built on this call)
    kept: tuple[int, ...] | None = None  # set by the engine when the executor kept every row's whole prefix
    cache: object = attrs.field(default=None, repr=False)
    offsets: tuple[int, ...] | None = attrs.field(default=None, repr=False)
    batch: bool = attrs.field(default=False, repr=False)
