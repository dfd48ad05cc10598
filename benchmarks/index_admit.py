"""Time ``SpanIndex.admit`` under eviction pressure at 1k, 10k and 100k entries.

The index is filled to its byte budget with equal-sized entries (1% of them locked, as
spans of requests in flight are), then every timed admit inserts a new key and must
evict exactly one entry. Between admits one random earlier key is touched (a store hit),
so the LRU order is not simply insertion order. Prints the median and p90 µs per admit.

    PYTHONPATH=. python benchmarks/index_admit.py [--sizes 1000,10000,100000] [--admits 200]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from spanctx.cache.index import SpanIndex

ENTRY_BYTES = 1 << 20
LOCKED_FRACTION = 0.01


def key_of(i: int) -> bytes:
    return i.to_bytes(16, "little")


def time_admits(num_entries: int, admits: int, seed: int = 0) -> list[float]:
    """Seconds of each of ``admits`` evicting admits into a full index of ``num_entries``."""
    rng = random.Random(seed)
    index = SpanIndex(budget=num_entries * ENTRY_BYTES)
    for i in range(num_entries):
        index.admit(key_of(i), ENTRY_BYTES, 1)
    for i in rng.sample(range(num_entries), int(num_entries * LOCKED_FRACTION)):
        index.lock(key_of(i))
    seconds = []
    for n in range(num_entries, num_entries + admits):
        index.touch(key_of(rng.randrange(n - num_entries, n)))  # may be gone: then a no-op
        start = time.perf_counter()
        admission = index.admit(key_of(n), ENTRY_BYTES, 1)
        seconds.append(time.perf_counter() - start)
        assert admission.admitted and len(admission.evicted) == 1
    assert len(index) == num_entries and index.bytes_used == index.budget
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="entry counts, comma-separated")
    parser.add_argument("--admits", type=int, default=200, help="timed admits per size")
    args = parser.parse_args()
    print(f"{'entries':>8}  {'median µs/admit':>15}  {'p90 µs/admit':>12}")
    for size in (int(s) for s in args.sizes.split(",")):
        seconds = sorted(time_admits(size, args.admits))
        median = statistics.median(seconds) * 1e6
        p90 = seconds[int(0.9 * (len(seconds) - 1))] * 1e6
        print(f"{size:>8}  {median:>15.1f}  {p90:>12.1f}")


if __name__ == "__main__":
    main()
