"""Host memory: span KV kept on the CPU, pinned when a CUDA device is there (so that
copies to the GPU run at PCIe speed, asynchronously), least recently used evicted."""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from ..store import SpanKV

__all__ = ["MemoryTier"]


class MemoryTier:
    """At most ``max_bytes`` of span KV in host memory; ``pin``: page-locked buffers (only
    where CUDA is available: elsewhere plain memory, and ``pinned`` says so)."""

    def __init__(self, max_bytes: int, *, pin: bool = False) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.pinned = pin and torch.cuda.is_available()
        self.url = f"{'pinned' if pin else 'cpu'}?max_bytes={max_bytes}"
        self._entries: OrderedDict[bytes, SpanKV] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def get(self, key: bytes) -> SpanKV | None:
        with self._lock:
            kv = self._entries.get(key)
            if kv is not None:
                self._entries.move_to_end(key)
            return kv

    def contains(self, key: bytes) -> bool:
        return key in self._entries

    def put(self, key: bytes, kv: SpanKV) -> bool:
        if kv.nbytes > self.max_bytes:
            return False
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return True
        host = SpanKV(tuple(self._copy(t) for t in kv.keys), tuple(self._copy(t) for t in kv.values))
        with self._lock:
            while self._bytes + host.nbytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.nbytes
            if key not in self._entries:
                self._entries[key] = host
                self._bytes += host.nbytes
            return True

    def drop(self, key: bytes) -> None:
        with self._lock:
            kv = self._entries.pop(key, None)
            if kv is not None:
                self._bytes -= kv.nbytes

    def _copy(self, t: torch.Tensor) -> torch.Tensor:
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pinned)
        return out.copy_(t)
