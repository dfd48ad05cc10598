"""Content keys of spans: 128-bit xxhash digests chained like vLLM's block hashes.

A span's key names its KV cache. Two spans share a key only if their KV is the same
tensor: same model (namespace), same tokens, and the same past they were computed
after (the parent key). Keys are plain ``bytes`` so the store and the planner never
see a tensor or a model.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import xxhash

__all__ = [
    "KEY_BYTES",
    "adapter_namespace",
    "digest",
    "group_key",
    "parallel_key",
    "root_key",
    "salted_namespace",
    "span_key",
]

KEY_BYTES = 16


def digest(*parts: bytes) -> bytes:
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
    return digest(b"root", namespace)


def span_key(parent_key: bytes, token_ids: Sequence[int], namespace: bytes) -> bytes:
    """Key of a span's KV computed right after the prompt named by ``parent_key``."""
    if len(parent_key) != KEY_BYTES:
        raise ValueError(f"parent key must be {KEY_BYTES} bytes, got {len(parent_key)}")
    return digest(b"span", parent_key, _ids_bytes(token_ids), namespace)


def parallel_key(anchor_key: bytes, token_ids: Sequence[int], namespace: bytes) -> bytes:
    """Key of a parallel span's KV computed right after its anchor (named by ``anchor_key``).

    Valid wherever the span follows that anchor, whatever sits between them: the KV is
    moved to the span's place at use. Tagged apart from ``span_key``.
    """
    if len(anchor_key) != KEY_BYTES:
        raise ValueError(f"anchor key must be {KEY_BYTES} bytes, got {len(anchor_key)}")
    return digest(b"parallel", anchor_key, _ids_bytes(token_ids), namespace)


def group_key(parent_key: bytes, member_keys: Sequence[bytes], repair: str, namespace: bytes) -> bytes:
    """Key of a parallel group as placed after the prompt named by ``parent_key``: its
    members in order and the repair that made its KV. What follows the group chains it."""
    if len(parent_key) != KEY_BYTES:
        raise ValueError(f"parent key must be {KEY_BYTES} bytes, got {len(parent_key)}")
    return digest(b"group", parent_key, b"".join(member_keys), repair.encode(), namespace)


def adapter_namespace(base_namespace: bytes, adapter_fingerprint: bytes) -> bytes:
    """Namespace of KV computed with an adapter on the model named by ``base_namespace``.

    ``adapter_fingerprint`` must cover everything of the adapter that changes KV (its
    config and weights), so that reloading other weights under one name never hits
    entries of the old ones.
    """
    return digest(b"adapter", base_namespace, adapter_fingerprint)


def salted_namespace(namespace: bytes, salt: str | None) -> bytes:
    """``namespace`` for one tenant: KV computed under one salt is never found under
    another (or under none), as vLLM's ``cache_salt``. No salt: ``namespace`` itself."""
    return namespace if salt is None else digest(b"salt", namespace, salt.encode())
