"""The scheduler: concurrent requests admitted into batched model calls, not a lock.

Policy (docs/serving.md says the same for users):

- **Admission.** ``submit`` puts jobs in a FIFO queue of at most ``max_queue`` waiting
  jobs, all or none (a request's ``n`` choices come together, so they batch together); a
  queue without room raises ``QueueFull`` at once (the server answers 429). Running jobs
  do not count against the queue.
- **Lanes: step-level admission (a runtime with a static executor: a CUDA model, or
  ``executor="static"``).** One worker thread owns the model. While the queue's head can
  be a lane (a generation without ``seed`` or ``adapter``), the worker runs a continuous
  batch (``spanctx.engine.lanes``): before every decode step, waiting jobs join in FIFO
  order while fewer than ``max_batch`` run, their slots fit and the tails joining in that
  step stay within ``join_tokens`` (default 512; the first joins whatever its length); a
  new job's prompt tail is prefilled in the same model step that decodes the running ones; a job leaves at EOS,
  its ``max_tokens``, a stop string or a cancel, and the next one takes its place at the
  next step. Stored prefix spans the lanes share (a system prompt) are laid once in the
  buffers. A job the lanes refuse (see ``Lanes.refuses``) is marked to run alone and
  waits, at the queue's head, for the lanes to drain. Greedy lanes give the tokens they
  give alone. Without a static executor (the eager CPU default), or with
  ``continuous=False``, waiting jobs are batched per call instead:
- **Batching when the model frees.** Each time the worker is free it takes the oldest
  waiting job and, when that job can share a batch, every other waiting job compatible
  with it (same sampling options; FIFO, at most ``max_batch``), and runs them as ONE call:
  a left-padded batch over each row's own stored spans (the session's row calls, as
  ``Runtime.generate_batch`` uses; greedy rows give the tokens they give alone). A group
  of one runs as a single ``generate``. Jobs that cannot share a batch run alone: a
  ``seed`` (its tokens must not depend on the other rows), an ``adapter``, a context with
  parallel groups (its positions are not the batch's), and checks. Rows with different
  ``max_tokens`` share a batch: each row stops at its own limit. A job arriving mid-batch
  waits for that batch to end.
- **Streaming and stops.** Every row streams its text as it is decoded (``Delta`` events,
  with each token's log-probability when the request asks for them); ``stop`` strings are
  matched on the text (cut before the match) and end that row at once.
- **Cancellation.** ``Job.cancel`` (the server calls it when a client disconnects) drops
  a waiting job from the queue, or ends a running row at the next decode step (a lane's
  slots are freed then); the other rows go on.
- **Batch size.** ``max_batch`` (default 8) bounds the lanes, or a call's rows.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import attrs

from ..engine.calls import FinalCall
from ..features.batch import decode_rows, eos_ids
from .jobs import Done, Job, Row, RowStreamer
from .protocol import ApiError

if TYPE_CHECKING:
    from ..runtime import Runtime

__all__ = ["QueueFull", "Scheduler"]

DEFAULT_MAX_BATCH = 8
# New prompt tokens joining the lanes in one step (more wait for the next): eight requests
# arriving at once then get first tokens over a few short steps, not all after one long one.
DEFAULT_JOIN_TOKENS = 512


class QueueFull(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(429, f"the server's queue is full ({limit} requests waiting); retry later",
                         type="rate_limit_error", code="queue_full")


class Executor(Protocol):
    """Runs a group of compatible generation jobs as one model call, feeding each job's
    ``Row`` (the per-call batching; default ``run_rows``)."""

    def __call__(self, rt: Runtime, jobs: Sequence[Job], rows: Sequence[Row]) -> list[tuple[int, int]]: ...


class Scheduler:
    """Owns ``rt``'s model through one worker thread (see the module's policy)."""

    def __init__(self, rt: Runtime, *, max_batch: int | None = None, max_queue: int = 64,
                 executor: Executor | None = None, continuous: bool | None = None,
                 join_tokens: int | None = None) -> None:
        max_batch = DEFAULT_MAX_BATCH if max_batch is None else max_batch
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch}, {max_queue}")
        if continuous and rt.engine.static is None:
            raise ValueError("continuous batching runs on the static executor (a CUDA model, or executor='static')")
        self.rt, self.max_batch, self.max_queue = rt, max_batch, max_queue
        self.executor = executor or run_rows
        # step-level admission (engine.lanes) where the runtime has a static executor
        self.continuous = rt.engine.static is not None if continuous is None else continuous
        # prompt tokens that may join the lanes in one step
        self.join_tokens = DEFAULT_JOIN_TOKENS if join_tokens is None else join_tokens
        if self.join_tokens < 1:
            raise ValueError(f"join_tokens must be >= 1, got {join_tokens}")
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.running = 0
        self.counts = collections.Counter()  # submitted, rejected, cancelled, completed, failed, batches, rows
        self.batch_sizes: list[int] = []  # every call's rows, in order (for the metrics and tests)
        self.seconds = collections.Counter()  # lanes: admitting (prompts assembled) and stepping, wall time
        self._thread = threading.Thread(target=self._loop, name="spanctx-scheduler", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, *jobs: Job) -> None:
        """Queue ``jobs`` (FIFO), all or none: ``QueueFull`` when fewer than ``len(jobs)``
        places are free (a 400 when more than ``max_queue`` would never fit)."""
        with self._cond:
            if self._closed:
                raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
            if len(self._waiting) + len(jobs) > self.max_queue:
                self.counts["rejected"] += len(jobs)
                raise QueueFull(self.max_queue)
            self._waiting.extend(jobs)
            self.counts["submitted"] += len(jobs)
            self._cond.notify()

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
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                lanes = not self._closed and self.continuous and self._waiting[0].laneable
            if lanes:
                self._run_lanes()
                continue
            group = self._next_group()
            if group is None:
                return
            try:
                self._run(group)
            finally:
                with self._cond:
                    self.running = 0

    # -- continuous batching ------------------------------------------------------------

    def _run_lanes(self) -> None:
        """Run lanes (``engine.lanes``) until none runs and the queue's head cannot join;
        waiting jobs join before each step (``_admit``)."""
        rows: dict = {}  # Lane -> Row
        with self.rt.holding(), self.rt.engine.lanes(self.max_batch) as lanes:
            try:
                while True:  # admit, then step while any lane runs
                    started = time.perf_counter()
                    self._admit(lanes, rows)
                    stepped = time.perf_counter()
                    self.seconds["admit"] += stepped - started
                    if not len(lanes):
                        break
                    wanted = frozenset(lane for lane, row in rows.items() if row.top is not None)
                    joined = lanes.joining > 0
                    events = lanes.step(logits_for=wanted)
                    self.counts["lane_steps"] += 1
                    self.counts["join_steps"] += joined
                    self.seconds["join_steps" if joined else "decode_steps"] += time.perf_counter() - stepped
                    for event in events:
                        row = rows[event.lane]
                        row.add(event.token, event.logits)
                        if event.finish is None and (row.finished or row.job.stopped.is_set()):
                            lanes.release(event.lane)
                        if event.lane.finish is not None:
                            del rows[event.lane]
                            self._finish(row.job, row.done(event.lane.prompt_tokens, event.lane.cached_tokens))
                    with self._cond:
                        self.running = len(lanes)
            except Exception as exc:  # noqa: BLE001 - reported to the clients as a 500
                for row in rows.values():
                    self._finish(row.job, Done("error", error=exc))
            finally:
                with self._cond:
                    self.running = 0

    def _admit(self, lanes, rows: dict) -> None:
        """Admit waiting jobs (FIFO, while the head may be a lane) as lanes, while the tails
        joining at the next step stay within ``join_tokens`` (the first always joins); a job
        the lanes refuse is marked to run alone, one without room now waits for a lane to
        end. A job held back keeps its assembled call for the next step."""
        while len(lanes) < self.max_batch:
            with self._cond:
                if self._closed or not self._waiting or not self._waiting[0].laneable:
                    return
                job = self._waiting.popleft()
            r, opts = job.request, job.opts
            try:
                if job.assembled is None:
                    with self.rt.prepared(r.ctx, max_new_tokens=opts.max_new_tokens, repair=r.repair,
                                          salt=r.salt) as prepared:
                        job.assembled = FinalCall.tails([prepared.assembly], decode=opts)
                    job.alone = lanes.refuses(job.assembled)
                call, row = job.assembled, job.assembled.rows[0]
                later = lanes.joining and lanes.joining + row.num_tokens - row.start > self.join_tokens
                lane = None if job.alone or later else lanes.admit(call)
            except Exception as exc:  # noqa: BLE001 - a bad request (4xx) or a failure (500), the client's
                self._finish(job, Done("error", error=exc))
                continue
            if lane is None:
                if not job.alone and not len(lanes):
                    job.alone = "it does not fit the static buffers beside nothing"
                with self._cond:
                    self._waiting.appendleft(job)
                return
            self.counts["lanes"] += 1
            rows[lane] = Row(job, self.rt.tokenizer, eos_ids(self.rt.generation_config.eos_token_id))

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


def run_single(rt: Runtime, jobs: Sequence[Job], rows: Sequence[Row]) -> list[tuple[int, int]]:
    """One job as one ``Runtime.generate`` (the static executor on a GPU). Returns
    ``[(prompt_tokens, cached_tokens)]``."""
    (job,) = jobs
    r = job.request
    result = rt.generate(r.ctx, job.opts.max_new_tokens, adapter=r.adapter, repair=r.repair, salt=r.salt,
                         **RowStreamer(rows).call_kwargs(), **r.generate_kwargs)
    return [(result.stats.prompt_tokens, result.stats.cached_tokens)]


def run_rows(rt: Runtime, jobs: Sequence[Job], rows: Sequence[Row]) -> list[tuple[int, int]]:
    """Compatible jobs as one left-padded batch over each row's stored spans (the session's
    row calls; layout in ``spanctx.features.batch``), up to the longest row's ``max_tokens``.
    Spans that several rows share and the store lacks are computed once, first."""
    contexts = [job.request.ctx for job in jobs]
    salts = [job.request.salt for job in jobs]
    opts = jobs[0].opts
    opts = attrs.evolve(opts, max_new_tokens=max(j.opts.max_new_tokens for j in jobs),
                        generate_kwargs={**opts.generate_kwargs, **RowStreamer(rows).call_kwargs()})
    with rt.holding(), contextlib.ExitStack() as held:  # rows of another salt compute a shared prefix alone
        decoded = decode_rows(rt, contexts, opts, held, salts=salts, repairs=[job.request.repair for job in jobs],
                              max_new_tokens=[job.opts.max_new_tokens for job in jobs])
        return [(c.prompt.num_tokens, cached) for c, cached in zip(decoded.calls, decoded.cached)]
