"""The lower tiers of one store, in order (fastest first), and the rule of when to use them.

Reads: on a tier-0 miss the engine asks ``fetch`` for the keys the store lacks. For each
key the first tier that holds it is asked, but only when moving the span's bytes at that
tier's measured rate is expected to cost less than computing its tokens at the model's
measured prefill rate (a tier whose rate is not measured yet is read once, to measure
it). A fetched span is checked against the model's KV layout, moved to the model's
device, and handed back for the interpreter to promote into tier 0.

Writes (``write``): ``"through"`` (default) hands every span stored in tier 0 to every
tier, so other processes find it at once; ``"back"`` hands a span to the tiers only when
tier 0 evicts it. Either way writes run on one background thread in order (``flush``
waits for them; the process flushes at exit); stored tensors are never changed, so the
thread reads them safely. Queued spans stay alive (on the model's device) until written:
a write that would queue more than ``max_pending_bytes`` is skipped and counted (one
span is always taken when none waits). A span fetched from a lower tier is also written
to the tiers above it.
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence

import attrs
import torch

from ..kv import layout as kv_layout
from ..store import SpanKV
from .base import Tier

__all__ = ["TierCallStats", "TierStack", "TierTotals"]

WRITE_MODES = ("through", "back")


@attrs.frozen
class TierCallStats:
    """What one call's assembly did with the lower tiers (span counts; a span a lower
    tier held is a hit, recomputed, or failed)."""

    hits: int = 0  # fetched from a lower tier and reused
    misses: int = 0  # missing from tier 0 and from every lower tier
    recomputed: int = 0  # held by a lower tier, computed because that was expected to be cheaper
    failed: int = 0  # held by a lower tier but unreadable (corrupt, foreign, unreachable): computed
    bytes: int = 0  # fetched
    fetch_s: float = 0.0  # spent fetching (device copy included)
    decisions: tuple[str, ...] = ()  # per span a lower tier held: what was done and why


@attrs.frozen
class TierTotals:
    """Counters of a tier stack since it was made; ``rates``: measured bytes/s per tier."""

    hits: int
    misses: int
    recomputed: int
    failed: int
    fetched_bytes: int
    written: int
    written_bytes: int
    write_skipped: int
    rates: dict[str, float]  # measured bytes/s per tier URL (reads; writes where none)


class TierStack:
    """Lower tiers, fastest first (see the module doc). ``cost_aware=False`` fetches
    every span a tier holds, whatever it costs."""

    def __init__(self, tiers: Sequence[Tier], *, write: str = "through", cost_aware: bool = True,
                 max_pending_bytes: int = 4 << 30) -> None:
        if write not in WRITE_MODES:
            raise ValueError(f"write is one of {WRITE_MODES}, got {write!r}")
        if not tiers:
            raise ValueError("a tier stack needs at least one tier")
        self.tiers = tuple(tiers)
        self.write = write
        self.cost_aware = cost_aware
        self.max_pending_bytes = max_pending_bytes
        # per tier URL, reads and writes apart: decayed sums [bytes, seconds] of transfers
        self._transfers: dict[tuple[str, bool], list[float]] = {}
        self._counts = dict(hits=0, misses=0, recomputed=0, failed=0, fetched_bytes=0, written=0, written_bytes=0,
                            write_skipped=0)
        self._lock = threading.Lock()
        self._queue: deque[tuple[bytes, SpanKV, tuple[Tier, ...]]] = deque()
        self._wake = threading.Condition(self._lock)
        self._writing = 0  # writes taken off the queue, not finished
        self._pending_bytes = 0  # of the queued spans
        self._thread: threading.Thread | None = None
        atexit.register(_flush_at_exit, weakref.ref(self))

    # -- reads ----------------------------------------------------------------------------

    def fetch(self, wanted: Mapping[bytes, int], *, device: torch.device, layout, bytes_per_token: int,
              prefill_seconds: Callable[[int], float]) -> tuple[dict[bytes, SpanKV], TierCallStats]:
        """The KV of the keys of ``wanted`` (key: its token count) that a lower tier holds
        and that are worth fetching, on ``device``; and what was done. ``layout``: the
        model's (``kv.layout``); ``prefill_seconds(n)``: the model's cost of ``n`` tokens."""
        found: dict[bytes, SpanKV] = {}
        n = dict(hits=0, misses=0, recomputed=0, failed=0, bytes=0, fetch_s=0.0)
        decisions: list[str] = []
        for key, tokens in wanted.items():
            holders = [i for i, tier in enumerate(self.tiers) if tier.contains(key)]
            if not holders:
                n["misses"] += 1
                continue
            nbytes = tokens * bytes_per_token
            fetch, why = self._worth(self.tiers[holders[0]], nbytes, tokens, prefill_seconds)
            if not fetch:
                n["recomputed"] += 1
                decisions.append(f"{key.hex()[:8]} recomputed: {why}")
                continue
            for i in holders:
                tier = self.tiers[i]
                started = time.perf_counter()
                kv = self._read(tier, key, device, layout)
                if kv is None:
                    decisions.append(f"{key.hex()[:8]} unreadable in {tier.url} (dropped)")
                    continue
                seconds = time.perf_counter() - started
                self._measured(tier, kv.nbytes, seconds, read=True)
                found[key] = kv
                n["hits"] += 1
                n["bytes"] += kv.nbytes
                n["fetch_s"] += seconds
                decisions.append(f"{key.hex()[:8]} fetched from {tier.url} in {seconds * 1e3:.1f} ms: {why}")
                self._enqueue(key, kv, self.tiers[:i])
                break
            else:
                n["failed"] += 1
        with self._lock:
            for name in ("hits", "misses", "recomputed", "failed"):
                self._counts[name] += n[name]
            self._counts["fetched_bytes"] += n["bytes"]
        return found, TierCallStats(decisions=tuple(decisions), **n)

    def _worth(self, tier: Tier, nbytes: int, tokens: int, prefill_seconds: Callable[[int], float]) -> tuple[bool, str]:
        """Whether reading ``nbytes`` from ``tier`` is expected to beat computing ``tokens``."""
        if not self.cost_aware:
            return True, "cost-aware fetching is off"
        rate = self.rate(tier)
        if rate is None:
            return True, f"first read of {tier.url} (measures its rate)"
        fetch, compute = nbytes / rate, prefill_seconds(tokens)
        line = (f"fetch {nbytes / 2**20:.1f} MiB at {rate / 1e9:.2f} GB/s ~ {fetch * 1e3:.1f} ms vs recompute "
                f"{tokens} tokens ~ {compute * 1e3:.1f} ms")
        return fetch <= compute, line

    def _read(self, tier: Tier, key: bytes, device: torch.device, layout) -> SpanKV | None:
        """``key``'s KV from ``tier`` on ``device``, or None (a foreign layout is dropped)."""
        kv = tier.get(key)
        if kv is None:
            return None
        if kv_layout(kv) != layout:
            tier.drop(key)
            return None
        if device.type != "cpu":
            kv = SpanKV(tuple(t.to(device, non_blocking=True) for t in kv.keys),
                        tuple(t.to(device, non_blocking=True) for t in kv.values))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return kv

    def _measured(self, tier: Tier, nbytes: int, seconds: float, *, read: bool) -> None:
        """Fold one transfer into ``tier``'s sums (halved at each transfer, so that recent
        ones weigh most; large transfers weigh more than small ones; those under 64 KiB,
        latency-bound, are left out)."""
        if nbytes < (1 << 16) or seconds <= 0:  # latency, not bandwidth: says nothing of large spans
            return
        with self._lock:
            sums = self._transfers.setdefault((tier.url, read), [0.0, 0.0])
            sums[0] = sums[0] / 2 + nbytes
            sums[1] = sums[1] / 2 + seconds

    def rate(self, tier: Tier) -> float | None:
        """``tier``'s measured bytes per second: of reads (device copy and checks
        included), else of writes, else None (nothing measured yet)."""
        with self._lock:
            sums = self._transfers.get((tier.url, True)) or self._transfers.get((tier.url, False))
            return None if sums is None else sums[0] / sums[1]

    # -- writes ---------------------------------------------------------------------------

    def stored(self, key: bytes, kv: SpanKV) -> None:
        """Tier 0 stored ``kv`` under ``key`` (write-through hands it to every tier)."""
        if self.write == "through":
            self._enqueue(key, kv, self.tiers)

    def evicted(self, key: bytes, kv: SpanKV) -> None:
        """Tier 0 evicted ``key`` (write-back hands it to every tier)."""
        if self.write == "back":
            self._enqueue(key, kv, self.tiers)

    def _enqueue(self, key: bytes, kv: SpanKV, tiers: tuple[Tier, ...]) -> None:
        if not tiers:
            return
        with self._lock:
            if self._queue and self._pending_bytes + kv.nbytes > self.max_pending_bytes:
                self._counts["write_skipped"] += 1
                return
            self._queue.append((key, kv, tiers))
            self._pending_bytes += kv.nbytes
            if self._thread is None:
                self._thread = threading.Thread(target=self._writer, name="spanctx-tier-writer", daemon=True)
                self._thread.start()
            self._wake.notify_all()

    def _writer(self) -> None:
        while True:
            with self._lock:
                while not self._queue:
                    self._wake.wait()
                key, kv, tiers = self._queue.popleft()
                self._pending_bytes -= kv.nbytes
                self._writing += 1
            try:
                host = None
                for tier in tiers:
                    if tier.contains(key):
                        continue
                    if host is None:  # one device-to-host copy for every tier
                        host = SpanKV(tuple(t.cpu() for t in kv.keys), tuple(t.cpu() for t in kv.values))
                    started = time.perf_counter()
                    if tier.put(key, host):
                        self._measured(tier, host.nbytes, time.perf_counter() - started, read=False)
                        with self._lock:
                            self._counts["written"] += 1
                            self._counts["written_bytes"] += host.nbytes
            finally:
                with self._lock:
                    self._writing -= 1
                    self._wake.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write is done (False if ``timeout`` seconds passed first)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._queue or self._writing:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._wake.wait(left)
        return True

    @property
    def totals(self) -> TierTotals:
        with self._lock:
            rates = {url: b / s for (url, read), (b, s) in self._transfers.items()
                     if read or (url, True) not in self._transfers}
            return TierTotals(rates=rates, **self._counts)


def _flush_at_exit(ref: weakref.ref) -> None:
    stack = ref()
    if stack is not None:
        stack.flush(timeout=60)
