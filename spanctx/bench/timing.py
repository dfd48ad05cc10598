"""Clocks for the benchmark: synchronized wall time, first-token time, peak memory.

Every clock read is preceded by a device synchronize, so a time covers the work the
call queued, not just its launch. A ``Sample`` is one timed call; ``Summary`` is the
median and p90 over the timed repeats of one row (warm-up calls are never summarized).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import attrs
import torch
from transformers.generation.streamers import BaseStreamer


def synchronize(device: torch.device) -> None:
    """Wait for every kernel queued on ``device`` (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    """Seconds on a monotonic clock, read after the device has caught up."""
    synchronize(device)
    return time.perf_counter()


class FirstTokenClock(BaseStreamer):
    """A streamer for HF ``generate`` that records when the first NEW token is ready.

    ``generate`` hands the prompt to the streamer first, then each new token; the
    second ``put`` is the first token, already copied to the host.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.puts = 0
        self.first_token_at: float | None = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_token_at = now(self.device)

    def end(self) -> None:
        pass


@attrs.frozen
class Outcome:
    """What one request did, as reported by the method that ran it."""

    ttft_s: float  # call start to the first new token on the host
    new_ids: tuple[int, ...]  # generated tokens (empty for calls that generate none)
    computed_tokens: int  # prompt tokens run through the model
    cached_tokens: int  # prompt tokens reused from a cache
    verdicts: tuple[bool, ...] = ()  # checks only: one verdict per requirement
    probabilities: tuple[float, ...] = ()  # checks only: P(yes) per requirement
    executor: str | None = None  # spanctx only: the executor that ran the call (GenerationStats.executor)
    executor_fallback: str | None = None  # spanctx only: why the static executor did not run it


@attrs.frozen
class Sample:
    """One timed request: its outcome, its synchronized end-to-end time, and the peak
    device memory during it (MiB; None on CPU)."""

    outcome: Outcome
    total_s: float
    peak_mem_mb: float | None


def timed(call: Callable[[], Outcome], device: torch.device) -> Sample:
    """Run ``call`` once between two synchronized clock reads (peak memory reset before)."""
    reset_peak_memory(device)
    start = now(device)
    outcome = call()
    total = now(device) - start
    return Sample(outcome, total, peak_memory_mb(device))


@attrs.frozen
class Summary:
    """Median and p90 over the timed repeats of one row; times in milliseconds."""

    ttft_ms: float
    ttft_p90_ms: float
    total_ms: float
    total_p90_ms: float
    computed_tokens: int  # mean over repeats (rounded; computed + cached = prompt tokens)
    cached_tokens: int  # mean over repeats (rounded)
    repeats: int


def summarize(samples: Sequence[Sample]) -> Summary:
    if not samples:
        raise ValueError("no timed samples to summarize (repeats must be >= 1)")
    ttft = [s.outcome.ttft_s * 1e3 for s in samples]
    total = [s.total_s * 1e3 for s in samples]
    cached = round(statistics.mean(s.outcome.cached_tokens for s in samples))
    prompt = round(statistics.mean(s.outcome.computed_tokens + s.outcome.cached_tokens for s in samples))
    return Summary(
        ttft_ms=statistics.median(ttft),
        ttft_p90_ms=percentile(ttft, 90),
        total_ms=statistics.median(total),
        total_p90_ms=percentile(total, 90),
        computed_tokens=prompt - cached,
        cached_tokens=cached,
        repeats=len(samples),
    )


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between order statistics."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@attrs.frozen
class Measured:
    """The timed samples of one row and the peak device memory over them."""

    samples: tuple[Sample, ...]

    @property
    def peak_mem_mb(self) -> float | None:
        peaks = [s.peak_mem_mb for s in self.samples if s.peak_mem_mb is not None]
        return max(peaks) if peaks else None


def run_repeats(request: Callable[[int], Outcome], *, warmup: int, repeats: int, device: torch.device,
                prepare: Callable[[int], None] | None = None) -> Measured:
    """Call ``request(i)`` for ``i`` in ``range(warmup + repeats)``, each timed; keep the
    last ``repeats``. ``prepare(i)``, if given, runs before request ``i``, untimed.

    Request ``i`` must be the same work for every method of a row, so that their outputs
    can be compared request by request."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    samples = []
    for i in range(warmup + repeats):
        if prepare is not None:
            prepare(i)
        samples.append(timed(lambda i=i: request(i), device))
    return Measured(tuple(samples[warmup:]))


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak allocated device memory since the last reset, in MiB (None on CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20
