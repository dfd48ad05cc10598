"""Stopping criteria the engine adds to HF ``generate``: a clock for the first token and a
cancel switch (the one cancellation rule: a set ``threading.Event`` stops every row within
one decode step)."""

from __future__ import annotations

import time

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

__all__ = ["FirstTokenClock", "StopWhenSet", "with_stopping_criterion"]


class FirstTokenClock(StoppingCriteria):
    """Stops nothing; records when ``generate`` has its first new token on the host."""

    def __init__(self) -> None:
        self.first_token_at: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        # input_ids: [B, S]
        if self.first_token_at is None:
            if input_ids.is_cuda:
                torch.cuda.synchronize(input_ids.device)
            self.first_token_at = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class StopWhenSet(StoppingCriteria):
    """Stops every row of a generation once ``event`` is set (a closed stream, a
    cancelled task): within one decode step."""

    def __init__(self, event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        # input_ids: [B, S]
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def with_stopping_criterion(kwargs: dict, criterion: StoppingCriteria) -> dict:
    """HF ``generate`` ``kwargs`` with ``criterion`` after their own stopping criteria."""
    own = kwargs.get("stopping_criteria") or []
    return {**kwargs, "stopping_criteria": StoppingCriteriaList([*own, criterion])}
