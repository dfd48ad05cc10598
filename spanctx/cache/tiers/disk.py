"""Local disk: one safetensors file per span, its header in the file's metadata.

Files are written to a temporary name and renamed into place, so a reader never sees a
half-written file under a span's name (a crash leaves at most a ``.tmp`` file). Several
processes may share one folder. With ``max_bytes`` the least recently used files
(by modification time, touched on each read) are removed to make room.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from pathlib import Path

import safetensors
from safetensors.torch import save_file

from ..store import SpanKV
from .codec import FORMAT, BadValue, from_tensors, header, tensors

__all__ = ["DiskTier"]

_READ_ERRORS = (OSError, ValueError, TypeError, RuntimeError, KeyError, safetensors.SafetensorError)


class DiskTier:
    """Span KV as safetensors files under ``root`` (created if needed)."""

    def __init__(self, root: str | os.PathLike, *, max_bytes: int | None = None) -> None:
        self.root = Path(root) / f"spanctx-v{FORMAT}"
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.url = f"disk://{Path(root).resolve()}" + ("" if max_bytes is None else f"?max_bytes={max_bytes}")
        self._lock = threading.Lock()

    def _path(self, key: bytes) -> Path:
        return self.root / f"{key.hex()}.safetensors"

    def contains(self, key: bytes) -> bool:
        return self._path(key).exists()

    def get(self, key: bytes) -> SpanKV | None:
        path = self._path(key)
        try:
            with safetensors.safe_open(path, framework="pt") as f:
                head = json.loads((f.metadata() or {}).get("spanctx", "null"))
                names = sorted(f.keys(), key=lambda n: int(n[1:]))
                ts = [f.get_tensor(name) for name in names]
            kv = from_tensors(head, key, ts)
        except FileNotFoundError:
            return None
        except (*_READ_ERRORS, BadValue, json.JSONDecodeError):
            self.drop(key)  # corrupt, truncated or foreign: a miss, and gone
            return None
        try:
            os.utime(path)
        except OSError:
            pass
        return kv

    def put(self, key: bytes, kv: SpanKV) -> bool:
        host = SpanKV(tuple(t.cpu() for t in kv.keys), tuple(t.cpu() for t in kv.values))
        if self.max_bytes is not None and host.nbytes > self.max_bytes:
            return False
        path = self._path(key)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            save_file({f"t{i}": t.contiguous() for i, t in enumerate(tensors(host))}, tmp,
                      metadata={"spanctx": json.dumps(header(key, host))})
            with self._lock:
                if self.max_bytes is not None:
                    self._make_room(tmp.stat().st_size, keep=path)
                os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            return False
        return True

    def drop(self, key: bytes) -> None:
        self._path(key).unlink(missing_ok=True)

    def _make_room(self, nbytes: int, keep: Path) -> None:
        """Remove the least recently used files until ``nbytes`` more fit ``max_bytes``."""
        files = []
        for p in self.root.glob("*.safetensors"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime, st.st_size, p))
        used = sum(size for _, size, p in files if p != keep)
        for _, size, p in sorted(files):
            if used + nbytes <= self.max_bytes:
                break
            if p != keep:
                p.unlink(missing_ok=True)
                used -= size
