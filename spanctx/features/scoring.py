"""Scoring candidate continuations of a context: log-probabilities and ranking.

``score(rt, ctx, candidates)`` gives, per candidate, the log-probability of its tokens
after the context. The context's KV is assembled through the store (reused spans are not
recomputed; computed spans are stored), extended to the context's end once, and then all
candidates run in ONE batched forward after it. Each candidate is tokenized as a span
after the context (``prompt.py``'s rule), so its ids are exactly the ids that
``rt.generate(ctx.append(candidate))`` would see after the context.

Cost of one call, in tokens run through the model:
``computed(ctx) + B * (L_max - 1)`` where ``B`` candidates have at most ``L_max``
tokens, and ``computed(ctx)`` is the context's uncached part (at least one token). A
full-prefill baseline (one forward of context + candidate per candidate) costs
``B * len(ctx) + sum(L_i)``. Candidates are not stored: their KV is a one-off. Memory:
a batch holds ``batch_size`` copies of the context's KV, so large contexts want smaller
batches.

Batching: candidates are right-padded. Padding at the END of a row is never attended by
the row's real tokens (attention is causal), so no attention mask is needed and every
real position's logits are those of the unpadded row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import attrs
import torch

from ..core.spans import Context, Span, as_context
from ..session.api import FinalCall

if TYPE_CHECKING:
    from ..session.api import SessionAPI

Candidate = str | Sequence[int] | Span


@attrs.frozen
class Score:
    """Log-probabilities (natural log) of one candidate's tokens after a context."""

    token_ids: tuple[int, ...]
    token_logprobs: tuple[float, ...]

    @property
    def logprob(self) -> float:
        """log P(candidate | context): the sum over its tokens."""
        return sum(self.token_logprobs)

    @property
    def mean_logprob(self) -> float:
        """The per-token mean: a length-normalized score."""
        return self.logprob / len(self.token_logprobs)


@attrs.frozen
class Ranked:
    """One candidate in a ranking: its position in the input, itself, and its score."""

    index: int
    candidate: Candidate
    score: Score


def score(rt: SessionAPI, ctx: Context | str, candidates: Sequence[Candidate], *, reuse: bool = True,
          batch_size: int = 16, salt: str | None = None) -> list[Score]:
    """Scores of ``candidates`` after ``ctx``, in input order (see the module doc).

    Candidates run ``batch_size`` at a time after the context's cache. ``reuse=False``
    computes the whole context without reading or writing the store (still once for all
    candidates). ``salt``: the call's tenant salt (None: the runtime's).
    """
    ctx = as_context(ctx, "score")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(candidates, (str, Span)):
        raise TypeError("candidates is a sequence of candidates; wrap a single one in a list")
    if not candidates:
        return []
    cand_ids = [rt.span_ids(c if isinstance(c, Span) else Span(c)) for c in candidates]
    with rt.prepared(ctx, reuse=reuse, max_new_tokens=max(len(ids) for ids in cand_ids), salt=salt) as call:
        out = rt.engine.run(FinalCall.tails([call.assembly], kv=True))
        first, context = torch.log_softmax(out.logits[0, -1].float(), dim=-1).cpu(), out.kv  # [V]
        context_end = call.prompt.num_tokens
        scores = []
        for start in range(0, len(cand_ids), batch_size):
            batch = cand_ids[start:start + batch_size]
            # rows: each candidate but its last token, after the context; row position j
            # predicts the candidate's token j + 1
            rows = [rt.resolve(ctx.append(ids[:-1]), salt=salt)[0] for ids in batch if len(ids) > 1]
            logprobs = None  # [r, W, V]
            if rows:
                out = rt.engine.run(FinalCall.after(context, rows, context_end, rt.device, logits_to_keep=0))
                logprobs = torch.log_softmax(out.logits.float(), -1).cpu()
            row = 0
            for ids in batch:
                rest = []
                if len(ids) > 1:
                    targets = torch.tensor(ids[1:])[:, None]  # [L - 1, 1]
                    rest = logprobs[row, : len(ids) - 1].gather(-1, targets).squeeze(-1).tolist()
                    row += 1
                scores.append(Score(tuple(ids), (first[ids[0]].item(), *rest)))
    return scores


def rank(rt: SessionAPI, ctx: Context | str, candidates: Sequence[Candidate], *,
         by: Literal["logprob", "mean_logprob"] = "logprob", reuse: bool = True, batch_size: int = 16,
         salt: str | None = None) -> list[Ranked]:
    """``candidates`` best first by ``by`` (ties keep input order)."""
    ctx = as_context(ctx, "rank")
    if by not in ("logprob", "mean_logprob"):
        raise ValueError(f"rank by 'logprob' or 'mean_logprob', got {by!r}")
    scores = score(rt, ctx, candidates, reuse=reuse, batch_size=batch_size, salt=salt)
    ranked = [Ranked(i, c, s) for i, (c, s) in enumerate(zip(candidates, scores))]
    return sorted(ranked, key=lambda r: -getattr(r.score, by))
