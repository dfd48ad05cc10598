"""Which attention lengths the static executor steps over, and building all of them at start-up.

A captured step attends over a fixed number of slots (its bucket's ``length``), so a
call whose length was never captured pays a capture on the user's request (on an H200
with an 8B model ~170 ms per bucket, two per new length: the 345-380 ms chat turns of
issue 19). The executor therefore rounds a call's slots up to a rung of a short
*ladder* and builds every rung's buckets once, before the first request (``warm_up``).

The ladder trades attention over padding slots against the number of buckets. A decode
step reads the weights (``W`` bytes) and, for ``L`` attention slots, ``L * b`` bytes of
KV cache (``b`` = 131 KB on the Llama-3.1-8B shape, ``W`` = 16 GB). Measured, the split
attention reads the cache at about a quarter of the rate the matrix products read the
weights (H100: 1.1-1.7 ms of attention per step at 8K, where reading the 1.07 GB once
takes 0.36 ms; benchmarks/results/NOTES-static.md), so a step costs about
``c + L`` slot-times, with ``c = ATTENTION_RATE * W / b`` (~31K slots on the 8B shape).
A call needing ``n`` slots that runs on rung ``L >= n`` pays ``(L - n) / (c + n)`` more
than on an exact-length step; bounding that by ``padding`` for every ``n`` gives rungs
with ``L[k+1] + c = (1 + padding) * (L[k] + c)`` and ``L[0] = padding * c``: additive
steps of ``padding * c`` while the cache is small next to the weights, a geometric
ratio ``1 + padding`` once it dominates. With ``padding`` = 0.1 the 8B shape's 16K
buffers get 5 rungs (3072, 6400, 9984, 14080, 17408), 32K gets 8, 128K 18.
The old lengths (a sixteenth of a power of two, 256-slot granules below 4K) padded less
(<= 6%) but needed a new capture every 256-512 slots of a growing chat.

Warm-up builds each bucket by running a call that needs it through the executor's own
``generate`` (or ``forward``: a junk prompt, junk prefix KV of the right length, two new
tokens), so it builds exactly the buckets requests build, by the same code: per rung
and number of rows asked for (one by default; a check loop runs N rows over a shared
context), every padded tail (``suffix_bucket``: 16, 32, ..., 2048 tokens) and the decode
step (one token per row; a one-row 1-token tail is the same bucket), each row's last
logits, for the adapter state switched on at the time. A padded tail may run past the call's slots (by
up to 1023: ``suffix_bucket(1025) = 2048``), so the buffers hold ``OVERHANG`` slots more
than ``max_tokens`` and the top rung is the buffers' size: no call needs a length off
the ladder. Buckets a warm-up does not build (other row counts, rows over different
prefixes, ``logits_to_keep != 1``, another adapter state) are built by the call that needs them,
and its ``ExecStats.builds`` says so.
"""

from __future__ import annotations

import bisect
import sys
import time
from collections.abc import Sequence

import attrs
import torch
from tqdm import tqdm

from ..cache import kv as kvops
from ..cache.span_kv import SpanKV
from ..core.options import merge_options
from .static_layout import (
    GRAPH_TOKENS,
    MAX_ROWS,
    SLOT_GRANULE,
    Packing,
    Row,
    pack,
    suffix_bucket,
)

__all__ = ["ATTENTION_RATE", "OVERHANG", "PADDING", "Sizing", "WarmUpStats", "granules", "ladder", "ladder_for",
           "rung"]

ATTENTION_RATE = 0.25  # the split attention's cache-read rate over the weight-read rate (H100, 8K)
PADDING = 0.1  # the most a step may cost over an exact-length one, by the cost model above
TAILS = sorted({suffix_bucket(t) for t in range(2, GRAPH_TOKENS + 1)})  # the padded tails: 16 .. 2048


def granules(slots: int) -> int:
    """``slots`` rounded up to a multiple of ``SLOT_GRANULE``."""
    return -(-slots // SLOT_GRANULE) * SLOT_GRANULE


def shortest_tail(bucket: int) -> int:
    """The fewest tail tokens padded to ``bucket`` (the one reaching furthest past the prompt)."""
    return min(t for t in range(2, bucket + 1) if suffix_bucket(t) == bucket)


OVERHANG = granules(max(tail - shortest_tail(tail) for tail in TAILS))  # 1024: slots past max_tokens


def ladder(top: int, step: float, padding: float = PADDING) -> tuple[int, ...]:
    """Attention lengths up to ``top`` (a multiple of ``SLOT_GRANULE``, always the last
    rung), multiples of ``SLOT_GRANULE``, such that when a step over ``L`` slots costs
    ``step + L``, the rung above ``n`` slots costs at most ``padding`` more than ``n``."""
    if top <= 0 or top % SLOT_GRANULE:
        raise ValueError(f"the ladder's top must be a positive multiple of {SLOT_GRANULE}, got {top}")
    rungs, length = [], granules(max(1, round(padding * step)))
    while length < top:
        rungs.append(length)
        length = max(length + SLOT_GRANULE, granules(int((1 + padding) * (length + step) - step)))
    return (*rungs, top)


def ladder_for(model: torch.nn.Module, buffers) -> tuple[int, ...]:
    """The ladder of ``buffers`` (``spanctx.slots.KVBuffers``) for ``model``: ``step`` is
    ``ATTENTION_RATE`` times the bytes of weights a step reads over one slot's KV bytes.
    The input embedding table is gathered, not read, unless the output layer shares it."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    table, head = model.get_input_embeddings(), model.get_output_embeddings()
    if table is not None and (head is None or head.weight is not table.weight):
        weights -= table.weight.numel() * table.weight.element_size()
    slot_bytes = buffers.nbytes / buffers.max_tokens
    return ladder(buffers.max_tokens, ATTENTION_RATE * weights / slot_bytes)


def rung(lengths: Sequence[int], slots: int) -> int:
    """The shortest length of the ladder covering ``slots``."""
    at = bisect.bisect_left(lengths, slots)
    if at == len(lengths):
        raise ValueError(f"{slots} slots exceed the ladder's top of {lengths[-1]}")
    return lengths[at]


@attrs.frozen
class WarmUpStats:
    """What one ``warm_up`` ran and built."""

    calls: int  # calls run (each builds up to one tail bucket and one decode bucket)
    builds: int  # buckets built (captured on CUDA; prepared, without graphs)
    seconds: float  # wall time of the warm-up
    build_seconds: float  # of which building (capturing, compiling)
    lengths: tuple[int, ...]  # the ladder it covered
    refused: int = 0  # calls the executor refuses (masks past max_mask_bytes): they run eagerly, nothing to build

    def plus(self, other: WarmUpStats) -> WarmUpStats:
        """Both warm-ups' counts and seconds (over ``other``'s ladder: the latest)."""
        return WarmUpStats(self.calls + other.calls, self.builds + other.builds, self.seconds + other.seconds,
                           self.build_seconds + other.build_seconds, other.lengths, self.refused + other.refused)


class Sizing:
    """The static executor's sizes, start-up and growth, mixed into ``StaticExecutor``: what
    fits its buffers, and building and growing them; it uses the executor's calls, its
    buffers and step inputs, and its constructor."""

    def warm_up(self, *, rows: Sequence[int] = (1,), decode: bool = True, bar: bool | None = None) -> WarmUpStats:
        """Build now every bucket that calls of ``rows`` rows over one shared prefix (keeping
        each row's last logits, with the adapters switched on now) can need up to
        ``max_tokens`` slots, so that such calls build nothing later; without ``decode``,
        only their tail steps (calls that decode nothing: checks, scores). Tail steps of
        2 to ``MAX_ROWS`` rows share their buckets (``keep_bucket``), so ``rows=(2,)``
        covers them all. ``bar``: a progress bar (None: when stderr is a terminal). The
        calls leave junk KV in the buffers (forgotten as placed)."""
        calls = [(count, *call) for count in rows for call in self._warm_calls(count, decode)]
        before, started, skipped = self.build_stats, time.perf_counter(), 0
        layers = [(k.shape[1], k.shape[-1]) for k in self.buffers.keys]
        junk = [torch.zeros(1, h, 1, d, dtype=self.dtype, device=self.device) for h, d in layers]
        for count, prefix, tail, new in tqdm(calls, desc="capturing step graphs", unit="call", leave=False,
                                             disable=not (sys.stderr.isatty() if bar is None else bar)):
            kv = SpanKV(*([t.expand(-1, -1, prefix, -1) for t in junk] for _ in "kv"))  # no copy of zeros
            pieces = [kvops.KVSlice(kv, 0, prefix)] if prefix else []
            tails = [tail // count + (r < tail % count) for r in range(count)]
            call = [Row(torch.zeros(prefix + t, dtype=torch.long, device=self.device), pieces, prefix) for t in tails]
            if self._fits(pack(call), new):  # refused (its masks past max_mask_bytes): such calls run eagerly
                skipped += 1
                continue
            if new:
                self.generate(call, options=merge_options({}, {"max_new_tokens": new}))
            else:
                self.forward(call)
        built = self.build_stats.since(before)
        return WarmUpStats(len(calls) - skipped, built.builds, time.perf_counter() - started, built.seconds,
                           self.ladder, skipped)

    def _warm_calls(self, rows: int, decode: bool = True) -> list[tuple[int, int, int]]:
        """``(prefix, tail tokens, new tokens)`` of one call of ``rows`` rows per (rung, padded
        tail) that some such call reaches: the fewest tail tokens padded to that bucket,
        ending at the rung's end or as late as ``max_tokens`` allows (a rung reached only
        through padding). Two new tokens where they fit and ``decode`` asks (the call then
        runs a decode step on the rung too), else a forward. ``tests/test_static_warmup.py`` checks the buckets
        against those of every call of ``rows`` rows."""
        calls, lower = [], 0
        for length in self.ladder:
            for bucket in TAILS:
                tail = max(rows, shortest_tail(bucket))
                if suffix_bucket(tail) != bucket:
                    continue  # no call of `rows` rows pads its tail to `bucket`
                for new in (2, 0) if decode else (0,):
                    used = max(tail + rows * new, bucket)  # slots after the prefix (Packing.slots_needed)
                    prefix = max(0, min(length - used, self.max_tokens - tail - rows * new))
                    if prefix + tail + rows * new <= self.max_tokens and lower < prefix + used <= length:
                        calls.append((prefix, tail, new))
                        break
            lower = length
        return calls

    def _fits(self, packing: Packing, new_tokens: int) -> str | None:
        """Why a call packed as ``packing`` does not fit the buffers and the mask budget
        (None: it does)."""
        if packing.rows > MAX_ROWS:
            return f"a call of {packing.rows} rows exceeds the executor's {MAX_ROWS}"
        needed = packing.slots_needed(new_tokens, packing.tail_tokens)  # a padded tail's overhang fits beyond
        if needed > self.max_tokens:
            return f"the call needs {needed} slots; the buffers hold {self.max_tokens}"
        tail, length = self._buckets(packing, new_tokens)
        mask_bytes = self._group * tail * length * self.dtype.itemsize * len(self.windows)
        if mask_bytes > self.max_mask_bytes:
            return (f"the {packing.tail_tokens}-token tail's attention masks would take {mask_bytes >> 20} MiB "
                    f"(max_mask_bytes: {self.max_mask_bytes >> 20} MiB); eager attention needs none")
        return None

    def _buckets(self, packing: Packing, new_tokens: int) -> tuple[int, int]:
        """The tail step's padded tokens and every step's attention slots."""
        tail = packing.tail_tokens  # a long tail is arithmetic-bound: no graph, no padding
        tail_bucket = suffix_bucket(tail) if tail <= GRAPH_TOKENS else tail
        return tail_bucket, rung(self.ladder, packing.slots_needed(new_tokens, tail_bucket))  # OVERHANG holds it

    def grow_bytes(self, max_tokens: int) -> int:
        """``memory_bytes`` after ``grow(max_tokens)`` (to reserve them before growing)."""
        added = max(0, granules(max_tokens) - self.max_tokens)
        sized = (self._ids, self._pos, self._slots, self._who, self._keep, self.owners, self.slot_positions,
                 self._adapters.adapt)  # [..., the buffers' slots]
        per_slot = self.buffers.nbytes // self.buffers.max_tokens + sum(t.nbytes // t.shape[-1] for t in sized)
        return self.memory_bytes + added * per_slot

    def grow(self, max_tokens: int) -> int:
        """Reallocate, as the constructor does, for ``max_tokens`` slots per row (nothing
        when the buffers hold that many). Every built step and every placed prefix is
        dropped (they point into the old buffers, freed first): ``warm_up`` again after.
        Returns the new ``memory_bytes``."""
        if max_tokens > self.max_tokens:
            with self._lock:
                kept = {"graphs": self.graphs, "compile": self.compiled, "attention": self.attention,
                        "chunks": self._chunks}
                mask_bytes, self._steps, self._caches, self.buffers = self.max_mask_bytes, None, {}, None
                # the constructor is the one place that sizes every slot-sized tensor
                self.__init__(self.model, max_tokens=max_tokens, **kept)
                self.max_mask_bytes = mask_bytes
        return self.memory_bytes
