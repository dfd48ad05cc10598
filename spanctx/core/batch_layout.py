"""Where the rows of a left-padded batch sit, and which of their cached tokens they keep. Pure.

Each row of a batch is prepared as a single request would be, so it ends with a cache of
its first ``c_i`` prompt tokens. The rows are then left-padded to the longest prompt
``W``: row ``i`` starts at slot ``pad_i = W - n_i``. One batch cache covers slots
``[0, C)`` for every row, and the final call computes slots ``[C, W)`` of all rows.

Which ``C``. Row ``i`` can supply slots ``[pad_i, pad_i + c_i)``, so ``C <= c_i + pad_i``
for every row, and row ``i`` keeps ``max(0, C - pad_i)`` of its cached tokens: more for
every row as ``C`` grows. So ``C = min_i(c_i + pad_i)`` maximises reuse, and the row that
sets the minimum keeps all of its cache. Every other row recomputes the cached tokens
past ``C``; they sit in slots that would otherwise be padding of the final call, whose
length is ``W - C = max_i(n_i - c_i)``, the longest uncached tail: the final call is
exactly as long as it must be.

Parallel groups. Recomputing cached tokens causally is exact only for tokens after a
row's last parallel group: a group's KV (placed, repaired) is not what a causal forward
computes, and neither is what follows it. So row ``i`` keeps at least ``f_i`` tokens, the
end of its last group, and ``C >= max_i(f_i + pad_i)``. When that bound exceeds the
minimum above, the rows with fewer cached tokens first run the start of their own tail
causally, in a forward of their own (``EagerExecutor.run``): exact, since a tail is
causal anyway.

Pad slots hold zeros and are hidden by the attention mask; position ids come from the
mask (``cumsum - 1``), so every real token keeps the position it has alone, and the
stored keys (RoPE already applied) fit. Greedy results equal one ``generate`` per row.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

__all__ = ["BatchLayout", "plan_batch"]


@attrs.frozen
class BatchLayout:
    """Where each row of a left-padded batch sits and how much of its cache it keeps.

    Row ``i``'s prompt fills slots ``[pads[i], width)``; the batch cache covers slots
    ``[0, cached_width)``, where row ``i`` holds its first ``kept[i]`` prompt tokens.
    """

    width: int
    cached_width: int
    pads: tuple[int, ...]
    kept: tuple[int, ...]


def plan_batch(prompt_lengths: Sequence[int], cached_lengths: Sequence[int],
               floors: Sequence[int] | None = None) -> BatchLayout:
    """The layout that maximises reuse (see the module docstring). Pure.

    ``cached_lengths[i]`` is how many leading prompt tokens row ``i`` has a cache for; at
    least one token of every row must be left uncached. ``floors[i]`` (default 0, at most
    ``cached_lengths[i]``): the fewest cached tokens row ``i`` may keep (the end of its
    parallel group, ``Assembly.keep_at_least``). A row that must keep more than another
    row has cached raises ``cached_width``; that row then keeps more than its cache, and
    the engine runs those tokens (the start of its causal tail) first.
    """
    floors = [0] * len(prompt_lengths) if floors is None else floors
    if not len(prompt_lengths) == len(cached_lengths) == len(floors) or not prompt_lengths:
        raise ValueError("one prompt length, cached length and floor per row, at least one row")
    for n, c, floor in zip(prompt_lengths, cached_lengths, floors):
        if not 0 <= floor <= c < n:
            raise ValueError(f"a row of {n} tokens cannot have {c} cached and keep at least {floor} "
                             "(0 <= floor <= cached < prompt)")
    width = max(prompt_lengths)
    pads = tuple(width - n for n in prompt_lengths)
    cached_width = max(min(c + pad for c, pad in zip(cached_lengths, pads)),
                       max((floor + pad for floor, pad in zip(floors, pads) if floor), default=0))
    kept = tuple(max(0, cached_width - pad) for pad in pads)
    return BatchLayout(width, cached_width, pads, kept)
