"""Per-token log-probabilities of generated tokens.

``Runtime.generate(..., output_scores=True)`` keeps, for every new token, the scores it
was chosen from: the model's logits after the call's logits processors (temperature,
top-k/p, a grammar mask ...), as Hugging Face ``generate`` reports them in ``scores``.
A token's log-probability is ``log_softmax`` of its step's scores at that token: the
distribution it was drawn from (for greedy decoding without processors, the model's
own). ``output_logits=True`` keeps the raw logits (before any processor) as well.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch

__all__ = ["TokenLogprob", "token_logprobs"]


@attrs.frozen
class TokenLogprob:
    """One generated token, its log-probability and the ``top`` most likely tokens of
    its step (``(token_id, logprob)``, most likely first; the token itself may be among them)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(scores: Sequence[torch.Tensor], token_ids: Sequence[int], top: int = 0) -> tuple[TokenLogprob, ...]:
    """The log-probability of each of ``token_ids`` under its step's ``scores`` (one
    ``[V]`` tensor per token), with the ``top`` best alternatives. Pure."""
    if len(scores) != len(token_ids):
        raise ValueError(f"{len(scores)} score steps for {len(token_ids)} tokens")
    if top < 0:
        raise ValueError(f"top must be >= 0, got {top}")
    if not token_ids:
        return ()
    logprobs = torch.log_softmax(torch.stack([s.float() for s in scores]), dim=-1)  # [N, V]
    chosen = logprobs.gather(-1, torch.tensor(token_ids, device=logprobs.device)[:, None])[:, 0].tolist()
    if top:
        values, indices = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)  # [N, top]
        tops = [tuple(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    else:
        tops = [()] * len(token_ids)
    return tuple(TokenLogprob(t, lp, alt) for t, lp, alt in zip(token_ids, chosen, tops))
