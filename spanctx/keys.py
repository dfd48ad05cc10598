"""Content keys of spans: 128-bit xxhash digests chained like vLLM's block hashes.

A span's key names its KV cache. Two spans share a key only if their KV is the same
tensor: same model (namespace), same tokens, and the same past they were computed
after (the parent key). Keys are plain ``bytes`` so the store and the planner never
see a tensor or a model.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Sequence

import torch
import xxhash

__all__ = [
    "FINGERPRINT_CHUNK",
    "KEY_BYTES",
    "adapter_namespace",
    "group_key",
    "model_namespace",
    "parallel_key",
    "root_key",
    "span_key",
    "weights_fingerprint",
]

KEY_BYTES = 16
FINGERPRINT_CHUNK = 1 << 24  # elements weighted per step: bounds each int64 temporary to 128 MiB


def _digest(*parts: bytes) -> bytes:
    h = xxhash.xxh3_128()
    for part in parts:
        # length-prefix every part so that ("ab", "c") and ("a", "bc") never collide
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


def _ids_bytes(token_ids: Sequence[int]) -> bytes:
    return array("I", token_ids).tobytes()


def root_key(namespace: bytes) -> bytes:
    """Key of the empty prompt of one namespace: the parent of every first span."""
    return _digest(b"root", namespace)


def span_key(parent_key: bytes, token_ids: Sequence[int], namespace: bytes) -> bytes:
    """Key of a span's KV computed right after the prompt named by ``parent_key``."""
    if len(parent_key) != KEY_BYTES:
        raise ValueError(f"parent key must be {KEY_BYTES} bytes, got {len(parent_key)}")
    return _digest(b"span", parent_key, _ids_bytes(token_ids), namespace)


def parallel_key(anchor_key: bytes, token_ids: Sequence[int], namespace: bytes) -> bytes:
    """Key of a parallel span's KV computed right after its anchor (named by ``anchor_key``).

    Valid wherever the span follows that anchor, whatever sits between them: the KV is
    moved to the span's place at use. Tagged apart from ``span_key``.
    """
    if len(anchor_key) != KEY_BYTES:
        raise ValueError(f"anchor key must be {KEY_BYTES} bytes, got {len(anchor_key)}")
    return _digest(b"parallel", anchor_key, _ids_bytes(token_ids), namespace)


def group_key(parent_key: bytes, member_keys: Sequence[bytes], repair: str, namespace: bytes) -> bytes:
    """Key of a parallel group as placed after the prompt named by ``parent_key``: its
    members in order and the repair that made its KV. What follows the group chains it."""
    if len(parent_key) != KEY_BYTES:
        raise ValueError(f"parent key must be {KEY_BYTES} bytes, got {len(parent_key)}")
    return _digest(b"group", parent_key, b"".join(member_keys), repair.encode(), namespace)


def model_namespace(model: torch.nn.Module, identity: str | None = None, *, adapter: str | None = None) -> bytes:
    """Fingerprint of everything that changes a span's KV besides its tokens and past.

    It covers the model's class, config and dtype, the ``adapter`` id, and either:

    - without ``identity``: every parameter and buffer, read where it lives
      (``weights_fingerprint``): models that differ in any element of any weight get
      different namespaces. It reads each weight once (about the time of one forward
      pass over a few tokens for memory-bound shapes; see benchmarks/fingerprint_cost.py);
    - with ``identity``: that string, and no weight is read. The caller promises that
      models with different weights never get the same identity (e.g. a hub id and
      revision, plus the hashes of any adapters merged into it). Two models with one
      identity, one config and one dtype share stored KV: a broken promise gives wrong
      answers, silently.
    """
    if identity is not None and not identity:
        raise ValueError("identity must be a non-empty string (or None to read the weights)")
    config = model.config.to_dict()
    config.pop("_name_or_path", None)
    config.pop("transformers_version", None)
    parts = [
        type(model).__name__.encode(),
        json.dumps(config, sort_keys=True, default=str).encode(),
        str(model.dtype).encode(),
        (adapter or "").encode(),
    ]
    if identity is not None:
        return _digest(b"namespace", *parts, b"identity", identity.encode())
    return _digest(b"namespace", *parts, b"weights", weights_fingerprint(model))


def adapter_namespace(base_namespace: bytes, adapter_fingerprint: bytes) -> bytes:
    """Namespace of KV computed with an adapter on the model named by ``base_namespace``.

    ``adapter_fingerprint`` must cover everything of the adapter that changes KV (its
    config and weights), so that reloading other weights under one name never hits
    entries of the old ones.
    """
    return _digest(b"adapter", base_namespace, adapter_fingerprint)


def salted_namespace(namespace: bytes, salt: str | None) -> bytes:
    """``namespace`` for one tenant: KV computed under one salt is never found under
    another (or under none), as vLLM's ``cache_salt``. No salt: ``namespace`` itself."""
    return namespace if salt is None else _digest(b"salt", namespace, salt.encode())


# -- weights ---------------------------------------------------------------------------

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# splitmix64 constants, as the signed int64 values of their bits
_SPLITMIX = tuple(c - (1 << 64) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def weights_fingerprint(model: torch.nn.Module, chunk_elements: int = FINGERPRINT_CHUNK) -> bytes:
    """A digest of every parameter and buffer of ``model``: names, dtypes, shapes, bits.

    Each tensor is read on its own device as integers (its bits: bf16 as int16, fp32 as
    int32, ...) in chunks of ``chunk_elements``; a chunk's elements ``x_i`` give
    ``sum_i c_i * x_i`` in int64, wrapping around, where ``c_i`` are fixed pseudo-random
    odd integers (splitmix64 of ``i``). An odd ``c`` is invertible modulo 2**64, so
    changing any single element always changes its chunk's sum; changing several leaves
    it equal with odds near 2**-64 (not against an adversary who picks the weights).
    Every chunk's sum enters the digest on its own, after its tensor's name, dtype and
    shape, so sums of different chunks and tensors never mix. Extra memory per device:
    the coefficients and one product, ``chunk_elements`` int64 each. One transfer to
    the host per device. Raises ValueError for weights on the meta device.
    """
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
    tensors = [(name, t.detach()) for name, t in (*model.named_parameters(), *model.named_buffers())]
    if meta := [name for name, t in tensors if t.is_meta]:
        raise ValueError(f"{meta[0]} is on the meta device: its values cannot be read; "
                         "pass an explicit identity to model_namespace instead")
    coefficients = {}
    for device in {t.device for _, t in tensors}:
        longest = max(t.numel() for _, t in tensors if t.device == device)
        coefficients[device] = _odd_coefficients(min(longest, chunk_elements), device)
    header, sums = [], []
    for name, tensor in tensors:
        header.append(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}")
        flat = tensor.reshape(-1)
        bits = flat.view(_INT_OF_SIZE.get(flat.element_size(), torch.uint8))
        c = coefficients[tensor.device]
        for start in range(0, bits.numel(), chunk_elements):
            chunk = bits[start:start + chunk_elements]  # [n] ints
            sums.append((chunk * c[:chunk.numel()]).sum())  # promoted to int64, wraps
    return _digest(b"weights", "\n".join(header).encode(), array("q", _to_host(sums)).tobytes())


def _odd_coefficients(length: int, device: torch.device) -> torch.Tensor:
    """``[length]`` int64: splitmix64 of 0..length-1 with the low bit set."""
    golden, mix1, mix2 = _SPLITMIX
    z = (torch.arange(length, dtype=torch.int64, device=device) + 1) * golden
    z = (z ^ _shift_right(z, 30)) * mix1
    z = (z ^ _shift_right(z, 27)) * mix2
    return (z ^ _shift_right(z, 31)) | 1


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` copies the sign bit)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _to_host(scalars: list[torch.Tensor]) -> list[int]:
    """The 0-d tensors ``scalars`` as ints, in order, with one transfer per device."""
    values = [0] * len(scalars)
    for device in {s.device for s in scalars}:
        positions = [i for i, s in enumerate(scalars) if s.device == device]
        for i, value in zip(positions, torch.stack([scalars[i] for i in positions]).tolist()):
            values[i] = value
    return values
