"""A Redis or Valkey server: span KV shared by processes and machines.

A span is stored as a header (``spanctx:v<FORMAT>:<key hex>``, JSON: see ``codec``, plus
the chunk count) and its bytes in chunks of ``chunk_bytes`` (default 4 MiB, the size
LMCache's notes measured fastest) under ``<header key>:<i>``. Chunks are written before
the header, so a reader that finds the header finds the chunks unless the server evicted
some: eviction is the server's own (``maxmemory`` with ``maxmemory-policy allkeys-lru``);
a missing or short chunk makes the value a miss, and what is left of it is deleted.

Every call has a socket timeout. When the server cannot be reached, the tier warns once,
answers as if empty (gets miss, puts refuse) for ``retry_s`` seconds, then tries again; a
success after an outage re-arms the warning. Requests never fail because of this tier.
"""

from __future__ import annotations

import json
import threading
import time
import warnings
from collections.abc import Callable
from typing import TypeVar

from ..store import SpanKV
from .codec import FORMAT, BadValue, decode, encode, validate

__all__ = ["RemoteTier"]

T = TypeVar("T")
PIPELINE_CHUNKS = 16  # chunks per round trip (64 MiB at the default chunk size)


class RemoteTier:
    """Span KV on the Redis/Valkey server at ``url`` (``redis://host:port/db``)."""

    def __init__(self, url: str, *, timeout: float = 2.0, chunk_bytes: int = 4 << 20, retry_s: float = 30.0) -> None:
        try:
            import redis
        except ImportError:
            raise ImportError("a redis:// tier needs the redis client: pip install 'spanctx[redis]'") from None
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be > 0, got {chunk_bytes}")
        self.url = url
        self.chunk_bytes = chunk_bytes
        self.retry_s = retry_s
        self._client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._unreachable = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
        self._refused = redis.exceptions.ResponseError  # e.g. OOM under maxmemory with noeviction
        self._down_until = 0.0
        self._warned = False
        self._lock = threading.Lock()

    @staticmethod
    def _name(key: bytes) -> str:
        return f"spanctx:v{FORMAT}:{key.hex()}"

    def _call(self, op: Callable[[], T], default: T) -> T:
        """``op()``, or ``default`` while the server is unreachable (see the module doc)."""
        if time.monotonic() < self._down_until:
            return default
        try:
            out = op()
        except self._unreachable as exc:
            with self._lock:
                self._down_until = time.monotonic() + self.retry_s
                warn, self._warned = not self._warned, True
            if warn:
                warnings.warn(f"span tier {self.url} unreachable ({type(exc).__name__}: {exc}); spans it held "
                              f"are computed instead; retrying every {self.retry_s:g} s", RuntimeWarning,
                              stacklevel=2)
            return default
        self._warned = False
        return out

    def contains(self, key: bytes) -> bool:
        return bool(self._call(lambda: self._client.exists(self._name(key)), 0))

    def get(self, key: bytes) -> SpanKV | None:
        def read() -> SpanKV | None:
            raw = self._client.get(self._name(key))
            if raw is None:
                return None
            try:
                head = json.loads(raw)
                validate(head, key)
                return decode(head, key, self._read_chunks(key, head))
            except (BadValue, ValueError, TypeError, KeyError):
                self._delete(key, raw)  # corrupt, truncated, evicted in part, or foreign
                return None

        return self._call(read, None)

    def _read_chunks(self, key: bytes, head: dict) -> bytearray:
        """The value's bytes, read into one buffer; raises BadValue when a chunk is
        missing or the chunks do not add up to the header's size."""
        total, count = head["nbytes"], head["chunks"]
        buf, offset, name = bytearray(total), 0, self._name(key)
        for first in range(0, count, PIPELINE_CHUNKS):
            pipe = self._client.pipeline(transaction=False)
            for i in range(first, min(first + PIPELINE_CHUNKS, count)):
                pipe.get(f"{name}:{i}")
            for part in pipe.execute():
                if part is None or offset + len(part) > total:
                    raise BadValue("a chunk is missing or too long")
                buf[offset:offset + len(part)] = part
                offset += len(part)
        if offset != total:
            raise BadValue(f"chunks hold {offset} bytes, the header says {total}")
        return buf

    def put(self, key: bytes, kv: SpanKV) -> bool:
        head, data = encode(key, kv)
        view = memoryview(data)
        head["chunks"] = count = -(-len(data) // self.chunk_bytes)
        name = self._name(key)

        def write() -> bool:
            try:
                for first in range(0, count, PIPELINE_CHUNKS):
                    pipe = self._client.pipeline(transaction=False)
                    for i in range(first, min(first + PIPELINE_CHUNKS, count)):
                        pipe.set(f"{name}:{i}", view[i * self.chunk_bytes:(i + 1) * self.chunk_bytes])
                    pipe.execute()
                self._client.set(name, json.dumps(head))  # last: the value is complete
            except self._refused:
                return False
            return True

        return self._call(write, False)

    def drop(self, key: bytes) -> None:
        self._call(lambda: self._delete(key, self._client.get(self._name(key))), None)

    def _delete(self, key: bytes, raw_header: bytes | None) -> None:
        """Delete the header and every chunk it (if readable) names."""
        try:
            count = int(json.loads(raw_header)["chunks"]) if raw_header else 0
        except (ValueError, TypeError, KeyError):
            count = 0
        name = self._name(key)
        self._client.delete(name, *(f"{name}:{i}" for i in range(min(count, 1 << 20))))
