"""Many prompts in one left-padded batch, each row reusing its own stored spans.

Each row is prepared as a single request would be (its plan, its reused and computed
spans), so it ends with a cache of its first ``c_i`` prompt tokens; one final call then
decodes every row. The static executor packs the rows into its buffers (the slices they
share laid once); the eager one runs a left-padded batch laid out by
``core.batch_layout.plan_batch``, which also says how many cached tokens each row keeps.

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

from ..core import inputs
from ..core.spans import Context, as_context
from ..session.api import FinalCall
from ..session.results import Result

if TYPE_CHECKING:
    from ..session.api import SessionAPI
    from ..session.session import PreparedCall

# generate options that would need per-row stop positions, which a padded batch hides
_UNSUPPORTED = ("stop_strings", "stopping_criteria")


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


def generate_batch(rt: SessionAPI, contexts: Sequence[Context | str], max_new_tokens: int | None = None, *,
                   reuse: bool = True, salt: str | None = None, repair: str | None = None,
                   **generate_kwargs) -> list[Result]:
    """Generate after several contexts (or plain strings) in one left-padded batch, each
    row reusing its own stored spans; greedy results equal one ``generate`` per row.
    ``salt`` and ``repair`` apply to every row (None: the runtime's)."""
    opts = rt.options(max_new_tokens, **generate_kwargs)
    contexts = [as_context(c, "generate_batch") for c in inputs.not_one_string(contexts, "generate_batch")]
    if not contexts:
        return []
    unsupported = [k for k in _UNSUPPORTED if opts.generate_kwargs.get(k) is not None]
    if unsupported:
        raise ValueError(f"generate_batch does not support {unsupported}: rows would stop at positions the "
                         "padded output does not show; use generate per context")
    # the runtime is held before the seed is set: no other call can draw from the RNG between
    with rt.holding(opts.seed), contextlib.ExitStack() as held:
        started = time.perf_counter()
        n = len(contexts)
        rows = decode_rows(rt, contexts, opts, held, reuse=reuse, salts=[salt] * n, repairs=[repair] * n,
                           max_new_tokens=[opts.max_new_tokens] * n)
        end = time.perf_counter()
        results = []
        for row, call in enumerate(rows.calls):
            new_ids = _until_eos(rows.out.sequences[row, rows.width:].tolist(), rows.eos)
            stats = rt.stats(call, len(new_ids), rows.out.first_token_at, cached_tokens=rows.cached[row],
                             started=started, end=end, generated=rows.out)
            results.append(Result(rt.tokenizer.decode(new_ids, skip_special_tokens=True), new_ids, stats))
        return results


@attrs.frozen
class DecodedRows:
    """A decoded batch: the prepared rows, the longest prompt (the sequences' new tokens
    start there), the decoder's output, each row's reused tokens (spans computed for it
    just before the batch excluded), the stop ids."""

    calls: list[PreparedCall]
    width: int
    out: object  # the engine's FinalOutput: sequences [B, W + N], first_token_at
    cached: list[int]
    eos: frozenset[int]


def decode_rows(rt: SessionAPI, contexts: Sequence[Context], opts, held: contextlib.ExitStack, *,
                reuse: bool = True, salts: Sequence[str | None], repairs: Sequence[str | None],
                max_new_tokens: Sequence[int]) -> DecodedRows:
    """The batch's steps, for ``generate_batch`` and any caller that batches rows itself (the
    server's scheduler): store the shared prefixes the store lacks, prepare every row (held
    open on ``held``), lay them out (``plan_batch``), decode them in one left-padded call.
    Row ``i`` resolves with ``salts[i]`` and ``repairs[i]`` and is checked against the
    model's positions with ``max_new_tokens[i]`` (the batch decodes ``opts.max_new_tokens``;
    callers stop shorter rows themselves). Call it holding the session."""
    warmed: list[set[bytes]] = [set() for _ in contexts]  # span keys computed for each row beforehand
    if reuse:
        for row, prefix in shared_prefixes(contexts):
            warmed[row] |= _warm(rt, prefix, salts[row], repairs[row])
    calls = [held.enter_context(rt.prepared(ctx, reuse=reuse, max_new_tokens=limit, salt=salt, repair=repair))
             for ctx, salt, repair, limit in zip(contexts, salts, repairs, max_new_tokens)]
    kwargs = rt.generate_kwargs(opts)
    out = rt.engine.run(FinalCall.tails([c.assembly for c in calls], decode=opts, kwargs=kwargs))
    # what each row read from the store and the call kept (the eager batch recomputes some)
    cached = [c.reused_before(k, w) if reuse else 0 for c, k, w in zip(calls, out.kept, warmed)]
    return DecodedRows(calls, max(c.prompt.num_tokens for c in calls), out, cached,
                       eos_ids(kwargs.get("eos_token_id", rt.generation_config.eos_token_id)))


def _warm(rt: SessionAPI, prefix: Context, salt: str | None, repair: str | None) -> set[bytes]:
    """Compute and store the spans of ``prefix`` that are not stored; returns their keys."""
    prompt, _ = rt.resolve(prefix, salt=salt, repair=repair)
    missing = rt.unstored(prompt)
    if missing:
        rt.next_token_logits(prefix, salt=salt, repair=repair)  # computes exactly the missing spans, stores them
    return missing


def eos_ids(eos: int | Sequence[int] | torch.Tensor | None) -> frozenset[int]:
    """The stop ids of a generation config's ``eos_token_id`` (an int, ids, a tensor or None)."""
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
