"""The tier protocol: one span's KV by spanctx's own key, below the in-process store.

A tier is a place a span's KV can be kept outside the store (tier 0): host memory, a
local disk, a remote server. Contract of every tier:

- ``get(key)``: the span's KV on the CPU, or None. A value that is corrupt, truncated,
  of another format or another key is a miss and is dropped, never returned. A tier
  that cannot be reached answers None (and warns once, see ``RemoteTier``).
- ``put(key, kv)``: keep ``kv`` (on any device; the tier copies it). False when it
  refused (too large, unreachable); it may evict other entries to make room.
- ``contains(key)``: whether ``get`` would probably find it (cheap; no bytes move).
- ``drop(key)``: forget it (no error when absent).

Keys are span keys (``spanctx.keys``): they already name the model, adapter, salt and
the span's past, so a key found means the same KV. Tiers are thread-safe.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ..store import SpanKV

__all__ = ["Tier", "parse_bytes"]


@runtime_checkable
class Tier(Protocol):
    """A lower tier of span KV (see the module contract)."""

    url: str  # how it was configured, e.g. "redis://127.0.0.1:6379/0"

    def get(self, key: bytes) -> SpanKV | None: ...

    def put(self, key: bytes, kv: SpanKV) -> bool: ...

    def contains(self, key: bytes) -> bool: ...

    def drop(self, key: bytes) -> None: ...


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str | int) -> int:
    """``"512M"``, ``"8G"``, ``"4096"`` (or an int) as bytes."""
    if isinstance(text, int):
        return text
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _UNITS else ""
    try:
        return int(float(t[: len(t) - len(unit)]) * _UNITS[unit])
    except ValueError:
        raise ValueError(f"not a byte size: {text!r} (e.g. 512M, 8G)") from None
