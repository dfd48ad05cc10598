"""How a span's KV travels outside the process: a header and the raw tensor bytes.

A header (a small JSON-able dict) names everything a reader must check before it trusts
the bytes: the format version, the span key, the layout (``BHSD``: per layer keys and
values ``[1, H_kv, S, D]``), each tensor's dtype and shape, the byte count and an
xxh3-64 checksum of the bytes. ``decode`` turns a header and its bytes back into a
``SpanKV`` or raises ``BadValue``: a value that fails any check is a miss, never KV.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import xxhash

from ..store import SpanKV

__all__ = ["FORMAT", "BadValue", "decode", "encode", "from_tensors", "header", "tensors"]

FORMAT = 1  # bump when the header or the byte layout changes: old values become misses
LAYOUT = "BHSD"
_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn,
                               torch.float8_e5m2, torch.int8, torch.uint8)}


class BadValue(ValueError):
    """A stored value that is corrupt, truncated, of another format, or not the asked key's."""


def tensors(kv: SpanKV) -> list[torch.Tensor]:
    """The span's tensors in value order: keys then values of layer 0, then layer 1, ..."""
    return [t for pair in zip(kv.keys, kv.values) for t in pair]


def checksum(parts: Sequence[memoryview | bytes | bytearray]) -> str:
    """xxh3-64 of the concatenated ``parts``, as hex."""
    h = xxhash.xxh3_64()
    for part in parts:
        h.update(part)
    return h.hexdigest()


def as_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor (copied once if not contiguous)."""
    return memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy()).cast("B")


def header(key: bytes, kv: SpanKV) -> dict:
    """The header of ``kv`` (on the CPU) stored under ``key``."""
    ts = tensors(kv)
    return {"format": FORMAT, "key": key.hex(), "layout": LAYOUT, "layers": len(kv.keys),
            "tokens": kv.num_tokens, "dtypes": [str(t.dtype) for t in ts], "shapes": [list(t.shape) for t in ts],
            "nbytes": sum(t.numel() * t.element_size() for t in ts),
            "checksum": checksum([as_bytes(t) for t in ts])}


def encode(key: bytes, kv: SpanKV) -> tuple[dict, bytes]:
    """``(header, bytes)`` of ``kv`` under ``key``: the tensors' bytes one after the other."""
    kv = SpanKV(tuple(k.cpu() for k in kv.keys), tuple(v.cpu() for v in kv.values))
    return header(key, kv), b"".join(as_bytes(t) for t in tensors(kv))


def validate(head: dict, key: bytes) -> None:
    """Raise ``BadValue`` unless ``head`` is a header of this format, layout and key."""
    if not isinstance(head, dict) or head.get("format") != FORMAT or head.get("layout") != LAYOUT:
        raise BadValue(f"not a spanctx format-{FORMAT} {LAYOUT} value")
    if head.get("key") != key.hex():
        raise BadValue(f"value of key {head.get('key')}, asked for {key.hex()}")
    dtypes, shapes = head.get("dtypes"), head.get("shapes")
    if (not isinstance(dtypes, list) or not isinstance(shapes, list) or len(dtypes) != len(shapes)
            or len(dtypes) != 2 * head.get("layers", -1) or any(d not in _DTYPES for d in dtypes)):
        raise BadValue("malformed dtypes or shapes")


def decode(head: dict, key: bytes, data: bytearray | memoryview) -> SpanKV:
    """The ``SpanKV`` of ``head`` and the writable buffer ``data`` (views of it: keep it
    alive and unchanged), after every check; raises ``BadValue``."""
    validate(head, key)
    if len(data) != head.get("nbytes"):
        raise BadValue(f"{len(data)} bytes, the header says {head.get('nbytes')}")
    flat = torch.frombuffer(data, dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
    ts, offset = [], 0
    for dtype_name, shape in zip(head["dtypes"], head["shapes"]):
        n = _DTYPES[dtype_name].itemsize * _numel(shape)
        if offset + n > len(data):
            raise BadValue(f"shapes need more than the {len(data)} bytes")
        ts.append(flat[offset:offset + n].view(_DTYPES[dtype_name]).view(shape))
        offset += n
    return from_tensors(head, key, ts)


def from_tensors(head: dict, key: bytes, ts: Sequence[torch.Tensor]) -> SpanKV:
    """The ``SpanKV`` of the CPU tensors ``ts`` (in ``tensors`` order) read under ``head``,
    after every check; raises ``BadValue``."""
    validate(head, key)
    if [str(t.dtype) for t in ts] != head["dtypes"] or [list(t.shape) for t in ts] != head["shapes"]:
        raise BadValue("tensors do not match the header's dtypes and shapes")
    if sum(t.numel() * t.element_size() for t in ts) != head.get("nbytes"):
        raise BadValue("tensors do not hold the header's byte count")
    if checksum([as_bytes(t) for t in ts]) != head.get("checksum"):
        raise BadValue("checksum mismatch")
    try:
        kv = SpanKV(tuple(ts[0::2]), tuple(ts[1::2]))
    except ValueError as exc:
        raise BadValue(str(exc)) from exc
    if kv.num_tokens != head.get("tokens") or any(t.dim() != 4 or t.shape[0] != 1 for t in ts):
        raise BadValue("tensors are not [1, H_kv, S, D] of the header's token count")
    return kv


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        if not isinstance(d, int) or d < 0:
            raise BadValue(f"bad shape {shape}")
        n *= d
    return n
