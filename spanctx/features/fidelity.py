"""How close a prompt with parallel spans comes to the sequential prefill of its ids.

Parallel spans do not see each other, so their KV (and everything after them) differs
from a plain prefill of the same token ids; repair narrows the gap. ``fidelity``
measures it on one context: the next-token distributions and greedy continuations of
the parallel prompt (with the store, under a repair mode) against those of the
sequential prefill (``reuse=False``).
"""

from __future__ import annotations

import attrs
import torch

from ..core.placement import Repair
from ..core.spans import Context


@attrs.frozen
class Fidelity:
    """One context's parallel-vs-sequential comparison.

    kl: KL(sequential || parallel) of the next-token distributions, in nats.
    top1_agrees: both put the most probability on the same next token.
    greedy_agreement: the fraction of the ``greedy_tokens`` greedy tokens that the two
        generate identically before they first differ (1.0: identical continuations;
        both are forced to generate all of them).
    """

    repair: str
    kl: float
    top1_agrees: bool
    greedy_agreement: float
    greedy_tokens: int


def fidelity(rt, ctx: Context, *, repair: str | None = None, greedy_tokens: int = 16) -> Fidelity:
    """Compare ``ctx`` run through ``rt`` (store and ``repair``; the runtime's mode when
    None) with the sequential prefill of the same ids. Fills the store as any call does."""
    if greedy_tokens < 1:
        raise ValueError("greedy_tokens must be >= 1")
    mode = str(rt.repair if repair is None else Repair.parse(repair))
    reference = rt.next_token_logits(ctx, reuse=False)
    candidate = rt.next_token_logits(ctx, repair=mode)
    sequential = rt.generate(ctx, greedy_tokens, reuse=False, do_sample=False, min_new_tokens=greedy_tokens)
    parallel = rt.generate(ctx, greedy_tokens, repair=mode, do_sample=False, min_new_tokens=greedy_tokens)
    return Fidelity(
        repair=mode,
        kl=kl_divergence(reference, candidate),
        top1_agrees=bool(reference.argmax() == candidate.argmax()),
        greedy_agreement=_common_prefix(sequential.token_ids, parallel.token_ids) / greedy_tokens,
        greedy_tokens=greedy_tokens,
    )


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(softmax(reference) || softmax(logits)) in nats, computed in float64."""
    log_p = reference_logits.double().log_softmax(-1)
    log_q = logits.double().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum().clamp_min(0.0).item()
