"""What a call returns: one small value type per operation's result, and its stats."""

from __future__ import annotations

import time

import attrs
import torch

from ..cache.tiers import TierCallStats
from ..engine.parallel_stats import ParallelStats
from ..engine.static_layout import ExecStats
from .logprobs import TokenLogprob, token_logprobs

__all__ = ["GenerationStats", "Result"]


@attrs.frozen
class GenerationStats:
    """Where one call's prompt tokens came from, and how long it took (seconds)."""

    prompt_tokens: int
    cached_tokens: int  # reused from the store
    computed_tokens: int  # run through the model
    new_tokens: int
    ttft_s: float  # call start to the first new token on the host
    total_s: float
    # prompt tokens whose KV was already placed and was computed again, in place, by
    # ``repair`` (parallel spans); not part of computed_tokens
    recomputed_tokens: int = 0
    parallel: ParallelStats | None = None  # details, for prompts with parallel groups
    executor: str = "eager"  # which executor ran the final call and the decode loop
    executor_fallback: str | None = None  # why the static executor, set up, did not run it
    tiers: TierCallStats | None = None  # lower-tier hits, misses, bytes and why (None: no tiers)
    # what the static executor ran and paid: graph or eager steps, buckets, slots copied,
    # buckets built (captured) by this call and their seconds (None: it did not run the call)
    static: ExecStats | None = None

    @classmethod
    def measured(cls, *, prompt_tokens: int, cached_tokens: int, new_tokens: int, started: float,
                 first_token_at: float | None, end: float | None = None, parallel: ParallelStats | None = None,
                 executor: str = "eager", executor_fallback: str | None = None,
                 tiers: TierCallStats | None = None, static: ExecStats | None = None) -> GenerationStats:
        """The stats of a call that started at ``started`` (``time.perf_counter``) and ends
        now (or at ``end``); with no first token (a logits call) TTFT is the whole call."""
        end = time.perf_counter() if end is None else end
        return cls(prompt_tokens=prompt_tokens, cached_tokens=cached_tokens,
                   computed_tokens=prompt_tokens - cached_tokens, new_tokens=new_tokens,
                   ttft_s=(first_token_at or end) - started, total_s=end - started,
                   recomputed_tokens=parallel.recomputed_tokens if parallel else 0, parallel=parallel,
                   executor=executor, executor_fallback=executor_fallback, tiers=tiers, static=static)


@attrs.frozen
class Result:
    """One generation: the NEW tokens only, their text, and the call's stats.

    ``scores`` / ``logits``: one ``[V]`` tensor per new token, when the call asked for
    them (``output_scores`` / ``output_logits``; see ``spanctx.session.logprobs``)."""

    text: str
    token_ids: tuple[int, ...]
    stats: GenerationStats
    scores: tuple[torch.Tensor, ...] | None = attrs.field(default=None, eq=False, repr=False)
    logits: tuple[torch.Tensor, ...] | None = attrs.field(default=None, eq=False, repr=False)

    def logprobs(self, top: int = 0) -> tuple[TokenLogprob, ...]:
        """Each new token's log-probability and its step's ``top`` best tokens (needs a
        call with ``output_scores=True``)."""
        if self.scores is None:
            raise ValueError("this result has no scores: generate with output_scores=True")
        return token_logprobs(self.scores, self.token_ids, top)
