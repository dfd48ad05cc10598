"""Helpers shared by the scenarios: method selection, spanctx calls, output agreement."""

from __future__ import annotations

from collections.abc import Sequence

from ...spans import Context
from ..fidelity import match_fraction
from ..timing import Measured, Outcome


def select_methods(scenario: str, available: Sequence[str], chosen: Sequence[str] | None) -> tuple[str, ...]:
    """The chosen methods in the scenario's canonical order (``full`` first); all if None."""
    if chosen is None:
        return tuple(available)
    unknown = [m for m in chosen if m not in available]
    if unknown:
        raise ValueError(f"scenario {scenario!r} has no method {unknown}; its methods: {', '.join(available)}")
    return tuple(m for m in available if m in chosen)


def spanctx_generate(runtime, ctx: Context, new_tokens: int, **kwargs) -> Outcome:
    """``runtime.generate`` of exactly ``new_tokens`` greedy tokens, as an ``Outcome``
    (TTFT is the runtime's own: from the call's start to the first token on the host)."""
    result = runtime.generate(ctx, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    stats = result.stats
    return Outcome(stats.ttft_s, result.token_ids, stats.computed_tokens, stats.cached_tokens)


def greedy_match(reference: Measured | None, measured: Measured) -> float | None:
    """Mean fraction of generated tokens equal to the reference's, request by request
    (None without a reference, for the reference itself, or when nothing was generated)."""
    if reference is None or reference is measured:
        return None
    pairs = [(r.outcome.new_ids, m.outcome.new_ids) for r, m in zip(reference.samples, measured.samples)]
    pairs = [(r, m) for r, m in pairs if r]
    if not pairs:
        return None
    return sum(match_fraction(r, m) for r, m in pairs) / len(pairs)
