"""Many prompts in one left-padded batch, each row reusing its own stored spans.

Each row is prepared as a single request would be (its plan, its reused and computed
spans), so it ends with a cache of its first ``c_i`` prompt tokens. The rows are then
left-padded to the longest prompt ``W``: row ``i`` starts at slot ``pad_i = W - n_i``.
One batch cache covers slots ``[0, C)`` for every row, and ``generate`` computes slots
``[C, W)`` of all rows in one call.

Which ``C``. Row ``i`` can supply slots ``[pad_i, pad_i + c_i)``, so ``C <= c_i + pad_i``
for every row, and row ``i`` keeps ``max(0, C - pad_i)`` of its cached tokens: more for
every row as ``C`` grows. So ``C = min_i(c_i + pad_i)`` maximises reuse, and the row that
sets the minimum keeps all of its cache. Every other row recomputes the cached tokens
past ``C``; they sit in slots that would otherwise be padding of the final call, whose
length is ``W - C = max_i(n_i - c_i)``, the longest uncached tail: the final call is
exactly as long as it must be.

Pad slots hold zeros and are hidden by the attention mask; position ids come from the
mask (``cumsum - 1``), so every real token keeps the position it has alone, and the
stored keys (RoPE already applied) fit. Greedy results equal one ``generate`` per row.

Shared prefixes. Rows that share a prefix of spans that is not stored yet would each
compute it in the batch. So before the batch, each row's deepest span prefix shared with
another row is computed once and stored (a batch-of-one forward over what is missing);
the rows then reuse it. Its tokens count as computed for the first row that uses it.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs
import torch

from ..core.options import CallOptions
from ..core.spans import Context
from ..engine.decoding import seeded
from ..engine.interpreter import store_reads
from ..session.results import Result

if TYPE_CHECKING:
    from ..runtime import PreparedCall, Runtime

# generate options that would need per-row stop positions, which a padded batch hides
_UNSUPPORTED = ("stop_strings", "stopping_criteria")


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


def plan_batch(prompt_lengths: Sequence[int], cached_lengths: Sequence[int]) -> BatchLayout:
    """The layout that maximises reuse (see the module docstring). Pure.

    ``cached_lengths[i]`` is how many leading prompt tokens row ``i`` has a cache for; at
    least one token of every row must be left uncached.
    """
    if len(prompt_lengths) != len(cached_lengths) or not prompt_lengths:
        raise ValueError("one prompt length and one cached length per row, at least one row")
    for n, c in zip(prompt_lengths, cached_lengths):
        if not 0 <= c < n:
            raise ValueError(f"a row of {n} tokens cannot have {c} cached (0 <= cached < prompt)")
    width = max(prompt_lengths)
    pads = tuple(width - n for n in prompt_lengths)
    cached_width = min(c + pad for c, pad in zip(cached_lengths, pads))
    kept = tuple(max(0, cached_width - pad) for pad in pads)
    return BatchLayout(width, cached_width, pads, kept)


def shared_prefixes(contexts: Sequence[Context]) -> list[tuple[int, Context]]:
    """For each row, its deepest span prefix (itself included) that another row also has,
    once per distinct prefix, with the first row that has it. Pure."""
    prefixes = [_prefixes(ctx) for ctx in contexts]
    rows_having = Counter(p for own in prefixes for p in set(own))
    out: list[tuple[int, Context]] = []
    seen: set[Context] = set()
    for row, own in enumerate(prefixes):
        deepest = next((p for p in own if rows_having[p] >= 2), None)
        if deepest is not None and deepest not in seen:
            seen.add(deepest)
            out.append((row, deepest))
    return out


def _prefixes(ctx: Context) -> list[Context]:
    """``ctx`` and its ancestors, deepest first, the empty root left out."""
    out, node = [], ctx
    while node is not None and not node.is_root:
        out.append(node)
        node = node.parent
    return out


def generate_batch(rt: Runtime, contexts: Sequence[Context | str], opts: CallOptions, reuse: bool,
                   salt: str | None = None) -> list[Result]:
    """``Runtime.generate_batch``: one padded ``generate`` call for all ``contexts``."""
    contexts = [_as_context(c) for c in contexts]
    if not contexts:
        return []
    unsupported = [k for k in _UNSUPPORTED if opts.generate_kwargs.get(k) is not None]
    if unsupported:
        raise ValueError(f"generate_batch does not support {unsupported}: rows would stop at positions the "
                         "padded output does not show; use generate per context")
    # the runtime is held before the seed is set: no other call can draw from the RNG between
    with rt.holding(), contextlib.ExitStack() as held, seeded(opts.seed, rt.device):
        started = time.perf_counter()
        warmed: list[set[bytes]] = [set() for _ in contexts]  # span keys computed for each row beforehand
        if reuse:
            for row, prefix in shared_prefixes(contexts):
                warmed[row] |= _warm(rt, prefix, salt)
        calls = [held.enter_context(rt.prepared(ctx, reuse=reuse, max_new_tokens=opts.max_new_tokens, salt=salt))
                 for ctx in contexts]
        layout = plan_batch([c.prompt.num_tokens for c in calls],
                            [c.assembly.tail_start for c in calls])
        out = rt.generate_rows(calls, layout.kept, layout.cached_width, opts)
        eos = _eos_ids(rt.generate_kwargs(opts).get("eos_token_id", rt.model.generation_config.eos_token_id))
        end = time.perf_counter()
        results = []
        for row, call in enumerate(calls):
            new_ids = _until_eos(out.sequences[row, layout.width:].tolist(), eos)
            cached = _reused_before(call, layout.kept[row], warmed[row]) if reuse else 0
            stats = rt.stats(call, len(new_ids), out.first_token_at, cached_tokens=cached, started=started, end=end)
            results.append(Result(rt.tokenizer.decode(new_ids, skip_special_tokens=True), new_ids, stats))
        return results


def _as_context(item: Context | str) -> Context:
    if isinstance(item, Context):
        return item
    if isinstance(item, str):
        return Context().append(item)  # raw completion: one text span, no template
    raise TypeError(f"generate_batch takes Contexts or strings, got {type(item).__name__}")


def _warm(rt: Runtime, prefix: Context, salt: str | None) -> set[bytes]:
    """Compute and store the spans of ``prefix`` that are not stored; returns their keys."""
    prompt, _ = rt.resolve(prefix, salt=salt)
    missing = {seg.key for seg in prompt.segments if seg.key not in rt.store}
    if missing:
        rt.next_token_logits(prefix, salt=salt)  # computes exactly the missing spans and stores them
    return missing


def _reused_before(call: PreparedCall, end: int, computed_here: set[bytes]) -> int:
    """How many prompt tokens in ``[0, end)`` the row read from the store, leaving out the
    spans computed for it in this call."""
    return sum(max(0, min(read_end, end) - start) for key, start, read_end in store_reads(call.assembly.plan,
                                                                                      call.prompt)
               if key not in computed_here)


def _eos_ids(eos: int | Sequence[int] | torch.Tensor | None) -> frozenset[int]:
    if eos is None:
        return frozenset()
    if isinstance(eos, torch.Tensor):
        return frozenset(eos.reshape(-1).tolist())
    return frozenset([eos] if isinstance(eos, int) else eos)


def _until_eos(ids: list[int], eos: frozenset[int]) -> tuple[int, ...]:
    """A row's new tokens up to and including its first EOS; the padding after it goes."""
    for i, token in enumerate(ids):
        if token in eos:
            return tuple(ids[: i + 1])
    return tuple(ids)
