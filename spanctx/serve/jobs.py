"""A request in the scheduler: its ``Job``, the events it emits (``Delta``s, then one
``Done``) and the ``Row`` that turns its decoded tokens into them during a model call
(``RowStreamer`` feeds the rows of one call, ``RowsStopped`` ends them, ``StepScores``
keeps each step's scores for log-probabilities).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import attrs
import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from ..core.options import CallOptions
from ..session.logprobs import token_logprobs
from .protocol import GenRequest

if TYPE_CHECKING:
    from typing import Self  # Python 3.11

    from ..runtime import Runtime

__all__ = ["Delta", "Done", "Job", "Row", "RowStreamer", "TokenInfo", "prompt_usage"]


@attrs.frozen
class Done:
    """A job's last event. ``finish_reason``: "stop" (EOS or a stop string), "length",
    "cancelled", or "error" (``error`` says what)."""

    finish_reason: str
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    error: BaseException | None = None
    value: object = None  # what a call job returned
    ttft_s: float | None = None  # submission to the first token


@attrs.frozen
class TokenInfo:
    """A generated token's log-probability (the model's distribution at its step, before
    temperature and top-p) and the ``top`` most likely tokens there, as text."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


class Delta(str):
    """New text of a job (a ``str``) with ``logprobs``: one ``TokenInfo`` per token decoded
    since the last delta when the request asked for them, else empty. A token's text may
    come in a later delta than its ``TokenInfo`` (held back for a stop string)."""

    logprobs: tuple[TokenInfo, ...]

    def __new__(cls, text: str, logprobs: tuple[TokenInfo, ...] = ()) -> Self:
        delta = super().__new__(cls, text)
        delta.logprobs = logprobs
        return delta


def prompt_usage(dones: Sequence[Done]) -> tuple[int, int]:
    """``(prompt_tokens, cached_tokens)`` of a request from its choices' ``Done``s: one
    prompt for all of them, cached what no choice had to compute."""
    return dones[0].prompt_tokens, min(d.cached_tokens for d in dones)


Sink = Callable[[object], None]  # gets Deltas, then one Done; called from the worker thread


@attrs.define(eq=False)
class Job:
    """One request in the scheduler: a generation (``request`` + ``opts``) or an exclusive
    call (``call(rt)``, e.g. a check). ``sink`` gets its events."""

    sink: Sink
    request: GenRequest | None = None
    opts: CallOptions | None = None
    call: Callable[[Runtime], object] | None = None
    stopped: threading.Event = attrs.field(factory=threading.Event)  # end this row (cancel or stop string)
    cancelled: bool = False
    enqueued: float = attrs.field(factory=time.perf_counter)
    alone: str | None = None  # why the running batch (``engine.lanes``) refused it: it runs alone
    assembled: object = None  # its FinalCall, once assembled for the lanes (held back a step: kept)

    @property
    def solo(self) -> bool:
        """Whether the job must run alone (see the module's policy)."""
        r = self.request
        return (r is None or self.alone is not None or self.opts.seed is not None or r.adapter is not None
                or r.ctx.has_parallel)

    @property
    def laneable(self) -> bool:
        """Whether the job may run as a lane of a running batch (``engine.lanes``): a
        generation without a seed or an adapter that the lanes did not refuse."""
        r = self.request
        return r is not None and self.alone is None and self.opts.seed is None and r.adapter is None

    def batch_key(self) -> tuple:
        return (self.opts.do_sample, tuple(sorted((k, repr(v)) for k, v in self.opts.generate_kwargs.items())))

    def cancel(self) -> None:
        self.cancelled = True
        self.stopped.set()


class Row:
    """A job's decoded tokens as text: emits ``Delta``s (a streamed job's as they come,
    another's once at the end), cuts at stop strings, holds back what could be the start of
    one (or a partial UTF-8 character) until it is sure. ``top``: the request's top
    alternatives per token when it asked for log-probabilities, else None."""

    def __init__(self, job: Job, tokenizer, eos: frozenset[int]) -> None:
        self.job, self.tokenizer, self.eos = job, tokenizer, eos
        self.limit = job.opts.max_new_tokens
        self.stops = job.request.stop
        self.top = job.request.logprobs
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.lazy = not self.stops and not job.request.stream  # its text is needed only at the end
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.unsent_logprobs: list[TokenInfo] = []
        self.reason: str | None = None
        self.first_token_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.reason is not None

    def add(self, token: int, scores: torch.Tensor | None = None) -> None:
        """The row's next token; ``scores`` (``[V]``, the token's step) when ``top`` is set."""
        if self.finished:
            return
        if self.job.stopped.is_set():  # cancelled: the token is not the client's any more
            self.reason = "cancelled"
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if token in self.eos:
            self.reason = "stop"
            self._flush()
            return
        self.ids.append(token)
        if self.top is not None:
            self.unsent_logprobs.append(self._info(token, scores))
        if not self.lazy:
            self._decode()
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.reason = self.text[:cut], "stop"
            self.job.stopped.set()
        elif len(self.ids) >= self.limit:
            self.reason = "length"
        if self.finished:
            self._flush()
            return
        if not self.job.request.stream:  # a whole reply is sent once, at the end: no wake-up per token
            return
        safe = len(self.text) - self.hold
        for _ in range(3):  # a character cut short decodes as U+FFFD (at most 3 bytes of a 4-byte one)
            if safe > self.sent and self.text[safe - 1] == "\ufffd":
                safe -= 1
        self._send(safe)

    def _info(self, token: int, scores: torch.Tensor) -> TokenInfo:
        (lp,) = token_logprobs([scores], [token], self.top)
        text = self.tokenizer.decode
        return TokenInfo(text([token]), lp.logprob, tuple((text([t]), p) for t, p in lp.top))

    def _decode(self) -> None:
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _flush(self) -> None:
        if self.lazy:
            self._decode()
        self._send(len(self.text))

    def _send(self, upto: int) -> None:
        if upto > self.sent or (self.unsent_logprobs and upto == len(self.text)):
            self.job.sink(Delta(self.text[self.sent:upto], tuple(self.unsent_logprobs)))
            self.sent = upto
            self.unsent_logprobs.clear()

    def done(self, prompt_tokens: int, cached_tokens: int) -> Done:
        if self.job.cancelled:
            reason = "cancelled"
        else:
            if not self.finished:  # the call ended without our limit (e.g. the model's positions)
                self._flush()
            reason = self.reason if self.reason not in (None, "cancelled") else "length"
        ttft = None if self.first_token_at is None else self.first_token_at - self.job.enqueued
        return Done(reason, prompt_tokens, cached_tokens, len(self.ids), ttft_s=ttft)


class RowStreamer(BaseStreamer):
    """Hands each decode step's tokens ``[B]`` to the rows (the first ``put``, the prompt, is
    skipped), with the step's scores ``[B, V]`` (kept by ``StepScores``) when a row wants them."""

    def __init__(self, rows: Sequence[Row]) -> None:
        self.rows, self.prompt_seen = rows, False
        self.scores = StepScores() if any(row.top is not None for row in rows) else None

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        scores = self.scores.last if self.scores is not None else None
        for i, (row, token) in enumerate(zip(self.rows, value.reshape(-1).tolist())):
            row.add(token, None if scores is None else scores[i])

    def end(self) -> None:
        pass

    def call_kwargs(self) -> dict:
        """``generate`` kwargs that feed the rows: this streamer, the rows' stops and, when
        a row wants log-probabilities, the processor that keeps each step's scores."""
        kwargs = {"streamer": self, "stopping_criteria": StoppingCriteriaList([RowsStopped(self.rows)])}
        if self.scores is not None:
            kwargs["logits_processor"] = LogitsProcessorList([self.scores])
        return kwargs


class StepScores(LogitsProcessor):
    """Keeps a copy of each step's scores as the caller's logits processors see them: the
    model's logits before temperature, top-k and top-p (the order ``generate`` and the
    static executor apply). A copy: the static executor reuses its logits buffer."""

    last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.last = scores.detach().clone()
        return scores


class RowsStopped(StoppingCriteria):
    """Per-row stop: a row ends when its job is stopped (cancelled, stop string) or finished."""

    def __init__(self, rows: Sequence[Row]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        done = [row.finished or row.job.stopped.is_set() for row in self.rows]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


