"""Helpers shared by the scenarios: method selection, spanctx calls, output agreement."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ...core.spans import Context
from ..agreement import match_fraction
from ..records import Row
from ..timing import Measured, Outcome, run_repeats


def select_methods(scenario: str, available: Sequence[str], chosen: Sequence[str] | None) -> tuple[str, ...]:
    """The chosen methods in the scenario's canonical order (``full`` first); all if None."""
    if chosen is None:
        return tuple(available)
    unknown = [m for m in chosen if m not in available]
    if unknown:
        raise ValueError(f"scenario {scenario!r} has no method {unknown}; its methods: {', '.join(available)}")
    return tuple(m for m in available if m in chosen)


_FALLBACKS_SHOWN: set[str] = set()  # each reason the static executor stepped aside, printed once


def spanctx_generate(runtime, ctx: Context, new_tokens: int, **kwargs) -> Outcome:
    """``runtime.generate`` of exactly ``new_tokens`` greedy tokens, as an ``Outcome``
    (TTFT is the runtime's own: from the call's start to the first token on the host)."""
    result = runtime.generate(ctx, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    stats = result.stats
    if stats.executor_fallback and stats.executor_fallback not in _FALLBACKS_SHOWN:
        _FALLBACKS_SHOWN.add(stats.executor_fallback)
        print(f"note: a spanctx call ran on the {stats.executor} executor: {stats.executor_fallback}", flush=True)
    return Outcome(stats.ttft_s, result.token_ids, stats.computed_tokens, stats.cached_tokens,
                   executor=stats.executor, executor_fallback=stats.executor_fallback)


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


def measure_methods(h, scenario: str, methods: Sequence[str], context_tokens: int, new_tokens: int,
                    request_for: Callable[[str], Callable[[int], Outcome]], bar,
                    before_each: Callable[[], None] | None = None) -> list[Row]:
    """One row per method for one case: ``request_for(method)`` timed over the harness's
    repeats (``before_each`` runs before each method), greedy tokens compared with the
    ``full`` method's (``full`` first)."""
    rows, reference = [], None
    for method in methods:
        bar.set_postfix_str(f"{context_tokens} tokens, {method}")
        if before_each is not None:
            before_each()
        measured = run_repeats(request_for(method), warmup=h.warmup, repeats=h.repeats_for(scenario), device=h.device)
        if method == "full":
            reference = measured
        rows.append(Row.measured(scenario, method, context_tokens, new_tokens, measured,
                                 greedy_match=greedy_match(reference, measured)))
        bar.update()
    return rows
