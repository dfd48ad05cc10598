"""The scheduler: concurrent requests admitted into batched model calls, not a lock.

Policy (docs/serving.md says the same for users):

- **Admission.** ``submit`` puts a job in a FIFO queue of at most ``max_queue`` waiting
  jobs; a full queue raises ``QueueFull`` at once (the server answers 429). Running jobs
  do not count against the queue.
- **Batching when the model frees.** One worker thread owns the model. Each time it is
  free it takes the oldest waiting job and, when that job can share a batch, every other
  waiting job compatible with it (same sampling options; FIFO, at most ``max_batch``), and
  runs them as ONE call: a left-padded batch over each row's own stored spans (the
  session's row calls, as ``Runtime.generate_batch`` uses; greedy rows give the tokens
  they give alone). A group of one runs as a single ``generate`` (on a GPU, the static
  executor). Jobs that cannot share a batch run alone: a ``seed`` (its tokens must not
  depend on the other rows), an ``adapter``, a context with parallel groups (its
  positions are not the batch's), and checks. Rows with different ``max_tokens`` share a
  batch: each row stops at its own limit.
- **Streaming and stops.** Every row streams its text as it is decoded; ``stop`` strings
  are matched on the text (cut before the match) and end that row at once.
- **Cancellation.** ``Job.cancel`` (the server calls it when a client disconnects) drops
  a waiting job from the queue, or ends a running row at the next decode step; the batch
  goes on for the other rows and the worker takes new jobs when the call ends.
- **Batch size.** ``max_batch`` defaults to 8. On a CUDA GPU the static executor packs a
  batch's rows into its buffers (the spans they share laid once) and decodes them in
  one captured step per token; elsewhere they run as a left-padded eager batch.
- **What is not done.** Jobs are admitted only between calls (no step-level continuous
  batching: HF ``generate``'s loop is closed). A job arriving mid-batch waits for that
  batch to end. Step-level admission needs an executor that runs one decode step of a
  changing batch; ``Executor`` below is the seam where it plugs in (see docs/serving.md).
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import attrs
import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..features.batch import decode_rows, eos_ids
from ..core.options import CallOptions
from .protocol import ApiError, GenRequest

if TYPE_CHECKING:
    from ..runtime import Runtime

__all__ = ["Done", "Job", "QueueFull", "Scheduler"]

DEFAULT_MAX_BATCH = 8


class QueueFull(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(429, f"the server's queue is full ({limit} requests waiting); retry later",
                         type="rate_limit_error", code="queue_full")


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


Sink = Callable[[object], None]  # gets str deltas, then one Done; called from the worker thread


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

    @property
    def solo(self) -> bool:
        """Whether the job must run alone (see the module's policy)."""
        r = self.request
        return r is None or self.opts.seed is not None or r.adapter is not None or r.ctx.has_parallel

    def batch_key(self) -> tuple:
        return (self.opts.do_sample, tuple(sorted((k, repr(v)) for k, v in self.opts.generate_kwargs.items())))

    def cancel(self) -> None:
        self.cancelled = True
        self.stopped.set()


class Executor(Protocol):
    """Runs a group of compatible generation jobs as one model call, feeding each job's
    ``Row``. Today: ``run_rows`` (HF generate over a padded batch, eager); a batched static
    executor (fixed buffers, graphs) would implement the same and replace it."""

    def __call__(self, rt: Runtime, jobs: Sequence[Job], rows: Sequence[Row]) -> list[tuple[int, int]]: ...


class Scheduler:
    """Owns ``rt``'s model through one worker thread (see the module's policy)."""

    def __init__(self, rt: Runtime, *, max_batch: int | None = None, max_queue: int = 64,
                 executor: Executor | None = None) -> None:
        max_batch = DEFAULT_MAX_BATCH if max_batch is None else max_batch
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch}, {max_queue}")
        self.rt, self.max_batch, self.max_queue = rt, max_batch, max_queue
        self.executor = executor or run_rows
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.running = 0
        self.counts = collections.Counter()  # submitted, rejected, cancelled, completed, failed, batches, rows
        self.batch_sizes: list[int] = []  # every call's rows, in order (for the metrics and tests)
        self._thread = threading.Thread(target=self._loop, name="spanctx-scheduler", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, job: Job) -> Job:
        """Queue ``job`` (FIFO); ``QueueFull`` when ``max_queue`` jobs wait already."""
        with self._cond:
            if self._closed:
                raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
            if len(self._waiting) >= self.max_queue:
                self.counts["rejected"] += 1
                raise QueueFull(self.max_queue)
            self._waiting.append(job)
            self.counts["submitted"] += 1
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Cancel ``job``: out of the queue now, or its row ends at the next step."""
        job.cancel()
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                self.counts["cancelled"] += 1
                job.sink(Done("cancelled"))

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking jobs, cancel the waiting ones, let the running call end."""
        with self._cond:
            self._closed = True
            dropped = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
        for job in dropped:
            job.cancel()
            job.sink(Done("cancelled"))
        self._thread.join(timeout)

    # -- the worker -------------------------------------------------------------------------

    def _next_group(self) -> list[Job] | None:
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            head = self._waiting.popleft()
            group = [head]
            if not head.solo:
                key = head.batch_key()
                for job in list(self._waiting):
                    if len(group) == self.max_batch:
                        break
                    if not job.solo and job.batch_key() == key:
                        self._waiting.remove(job)
                        group.append(job)
            self.running = len(group)
            return group

    def _loop(self) -> None:
        while (group := self._next_group()) is not None:
            try:
                self._run(group)
            finally:
                with self._cond:
                    self.running = 0

    def _run(self, group: list[Job]) -> None:
        self.counts["batches"] += 1
        self.counts["rows"] += len(group)
        self.batch_sizes.append(len(group))
        eos = eos_ids(self.rt.generation_config.eos_token_id)
        rows = [Row(job, self.rt.tokenizer, eos) for job in group if job.call is None]
        try:
            if group[0].call is not None:
                value = group[0].call(self.rt)
                self._finish(group[0], Done("stop", value=value))
                return
            usage = run_single(self.rt, group, rows) if len(group) == 1 else self.executor(self.rt, group, rows)
            for job, row, (prompt, cached) in zip(group, rows, usage):
                self._finish(job, row.done(prompt, cached))
        except (ValueError, TypeError, KeyError) as exc:
            if len(group) > 1 and not any(row.ids for row in rows):
                for job in group:  # a bad request refused before decoding: the others run one by one
                    self._run([job])
                return
            for job in group:
                self._finish(job, Done("error", error=exc))
        except Exception as exc:  # noqa: BLE001 - reported to the client as a 500
            for job in group:
                self._finish(job, Done("error", error=exc))

    def _finish(self, job: Job, done: Done) -> None:
        self.counts[{"cancelled": "cancelled", "error": "failed"}.get(done.finish_reason, "completed")] += 1
        job.sink(done)


# -- rows: a job's tokens as text ----------------------------------------------------------


class Row:
    """A job's decoded tokens as text: emits deltas (a streamed job's as they come, another's
    once at the end), cuts at stop strings, holds back what could be the start of one (or a
    partial UTF-8 character) until it is sure."""

    def __init__(self, job: Job, tokenizer, eos: frozenset[int]) -> None:
        self.job, self.tokenizer, self.eos = job, tokenizer, eos
        self.limit = job.opts.max_new_tokens
        self.stops = job.request.stop
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.reason: str | None = None
        self.first_token_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.reason is not None

    def add(self, token: int) -> None:
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
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
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

    def _flush(self) -> None:
        self._send(len(self.text))

    def _send(self, upto: int) -> None:
        if upto > self.sent:
            self.job.sink(self.text[self.sent:upto])
            self.sent = upto

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
    """Hands each decode step's tokens ``[B]`` to the rows (the first ``put``, the prompt, is skipped)."""

    def __init__(self, rows: Sequence[Row]) -> None:
        self.rows, self.prompt_seen = rows, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for row, token in zip(self.rows, value.reshape(-1).tolist()):
            row.add(token)

    def end(self) -> None:
        pass


class RowsStopped(StoppingCriteria):
    """Per-row stop: a row ends when its job is stopped (cancelled, stop string) or finished."""

    def __init__(self, rows: Sequence[Row]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.BoolTensor:
        done = [row.finished or row.job.stopped.is_set() for row in self.rows]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def run_single(rt: Runtime, jobs: Sequence[Job], rows: Sequence[Row]) -> list[tuple[int, int]]:
    """One job as one ``Runtime.generate`` (the static executor on a GPU). Returns
    ``[(prompt_tokens, cached_tokens)]``."""
    (job,) = jobs
    r = job.request
    result = rt.generate(r.ctx, job.opts.max_new_tokens, adapter=r.adapter, repair=r.repair, salt=r.salt,
                         streamer=RowStreamer(rows), stopping_criteria=StoppingCriteriaList([RowsStopped(rows)]),
                         **r.generate_kwargs)
    return [(result.stats.prompt_tokens, result.stats.cached_tokens)]


def run_rows(rt: Runtime, jobs: Sequence[Job], rows: Sequence[Row]) -> list[tuple[int, int]]:
    """Compatible jobs as one left-padded batch over each row's stored spans (the session's
    row calls; layout in ``spanctx.features.batch``), up to the longest row's ``max_tokens``.
    Spans that several rows share and the store lacks are computed once, first."""
    contexts = [job.request.ctx for job in jobs]
    salts = [job.request.salt for job in jobs]
    opts = jobs[0].opts
    opts = attrs.evolve(opts, max_new_tokens=max(j.opts.max_new_tokens for j in jobs), generate_kwargs={
        **opts.generate_kwargs, "streamer": RowStreamer(rows),
        "stopping_criteria": StoppingCriteriaList([RowsStopped(rows)])})
    with rt.holding(), contextlib.ExitStack() as held:  # rows of another salt compute a shared prefix alone
        decoded = decode_rows(rt, contexts, opts, held, salts=salts, repairs=[job.request.repair for job in jobs],
                              max_new_tokens=[job.opts.max_new_tokens for job in jobs])
        return [(c.prompt.num_tokens, cached) for c, cached in zip(decoded.calls, decoded.cached)]
