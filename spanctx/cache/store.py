"""A bounded store of span KV tensors, keyed by span keys.

It knows nothing of models: it holds ``SpanKV`` values under ``bytes`` keys, and its
``SpanIndex`` decides what stays. Stored tensors are never handed to anything that
mutates them: readers concatenate them into fresh caches (see ``kv.py``).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Iterator

import attrs
import torch

from .index import EvictionPolicy, SpanIndex, lru


@attrs.frozen(eq=False)
class SpanKV:
    """The KV cache of one span: per layer, keys and values ``[1, H_kv, S, D]``."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]

    def __attrs_post_init__(self) -> None:
        if len(self.keys) != len(self.values) or not self.keys:
            raise ValueError("a SpanKV needs one (keys, values) pair per layer")
        lengths = {t.shape[-2] for t in (*self.keys, *self.values)}
        if len(lengths) != 1:
            raise ValueError(f"all layers of a SpanKV must cover the same tokens, got {lengths}")

    @property
    def num_tokens(self) -> int:
        return self.keys[0].shape[-2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


@attrs.frozen
class StoreStats:
    """Counters of a store since it was made. Token counts are prompt tokens."""

    hits: int
    misses: int
    hit_tokens: int
    stored_tokens: int
    evictions: int
    rejected: int  # spans too large for the budget, not stored
    entries: int
    bytes_used: int
    bytes_budget: int


class KVStore:
    """Span KV tensors under a byte budget, evicting unlocked entries by ``policy``."""

    def __init__(self, budget_bytes: int, policy: EvictionPolicy = lru) -> None:
        self.index = SpanIndex(budget_bytes, policy)
        self._payloads: dict[bytes, SpanKV] = {}
        self._lock = threading.RLock()
        self._hits = self._misses = self._hit_tokens = 0
        self._stored_tokens = self._evictions = self._rejected = 0

    def __contains__(self, key: bytes) -> bool:
        return key in self._payloads

    def __len__(self) -> int:
        return len(self._payloads)

    def lookup(self, key: bytes) -> SpanKV | None:
        """The span's KV if stored (counted as a hit and touched), else None (a miss)."""
        with self._lock:
            kv = self._payloads.get(key)
            if kv is None:
                self._misses += 1
                return None
            self.index.touch(key)
            self._hits += 1
            self._hit_tokens += kv.num_tokens
            return kv

    def put(self, key: bytes, kv: SpanKV) -> bool:
        """Store ``kv`` under ``key``. Returns False when it cannot fit the budget."""
        with self._lock:
            admission = self.index.admit(key, kv.nbytes, kv.num_tokens)
            if not admission.admitted:
                self._rejected += 1
                return False
            self._forget(admission.evicted)
            if key not in self._payloads:
                self._payloads[key] = kv
                self._stored_tokens += kv.num_tokens
            return True

    @contextlib.contextmanager
    def locked(self, keys: Iterable[bytes]) -> Iterator[None]:
        """Pin the present ``keys`` against eviction for the duration of the block."""
        with self._lock:
            held = [k for k in dict.fromkeys(keys) if k in self._payloads]
            for key in held:
                self.index.lock(key)
        try:
            yield
        finally:
            with self._lock:
                for key in held:
                    self.index.unlock(key)

    def clear(self) -> None:
        """Drop every unlocked entry."""
        with self._lock:
            for entry in list(self.index.evictable()):
                self.index.remove(entry.key)
                del self._payloads[entry.key]

    def reserve(self, nbytes: int) -> None:
        """Take ``nbytes`` off the budget for memory held beside the store (a static
        executor's KV buffers), so that the two together stay within it. Unlocked
        entries are evicted (in policy order) until the store fits the smaller budget.
        Raises ValueError, changing nothing, when locked entries leave too little room."""
        with self._lock:
            self._forget(self.index.shrink(nbytes))

    def _forget(self, evicted: tuple[bytes, ...]) -> None:
        """Drop the payloads of keys the index evicted."""
        for key in evicted:
            del self._payloads[key]
        self._evictions += len(evicted)

    @property
    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(
                hits=self._hits,
                misses=self._misses,
                hit_tokens=self._hit_tokens,
                stored_tokens=self._stored_tokens,
                evictions=self._evictions,
                rejected=self._rejected,
                entries=len(self._payloads),
                bytes_used=self.index.bytes_used,
                bytes_budget=self.index.budget,
            )


def default_budget_bytes(device: torch.device) -> int:
    """Half of the free memory of ``device`` (CUDA), or a quarter of free RAM (CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        free_ram = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        free_ram = 8 << 30
    return free_ram // 4
