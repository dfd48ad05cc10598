"""Span-affinity routing, pure: which replica should run a request.

A request's routing key hashes the first ``depth`` nodes of its context (as JSON) and its
salt, so requests whose contexts start alike (the same system prompt, the same
document) share a key. Each key prefers one replica by rendezvous hashing (highest
``hash(key, replica)``): the choice is stable while replicas come and go, and only the
keys of a removed replica move. A preferred replica whose load (queued + running) has
reached ``spill`` is tried last when another replica is less loaded: the request spills
to the least loaded one, which computes the spans once and holds them too.

Why a key from the first nodes and not from the whole path: a replica's store holds
spans, and a request reuses its path from the root down to the first span it lacks; the
first nodes are where contexts of one conversation, tenant or document agree.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import TypeVar

from ..core.spans import Context
from .protocol import context_to_json

R = TypeVar("R")

__all__ = ["affinity_ranks", "route_key"]


def route_key(ctx: Context, salt: str | None, depth: int = 1) -> str:
    """The routing key of a request for ``ctx`` under ``salt`` (stable across processes)."""
    head = json.dumps([context_to_json(ctx)[:depth], salt], sort_keys=True)
    return hashlib.blake2b(head.encode(), digest_size=8).hexdigest()


def _weight(key: str, replica: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}|{replica}".encode(), digest_size=8).digest(), "big")


def affinity_ranks(key: str | None, replicas: Sequence[R], ident: Callable[[R], str],
                   load: Callable[[R], int | None], spill: int) -> list[list[R]]:
    """Replicas in the order to try them, one per rank (Ray Serve's ``choose_replicas``
    shape). No key: every replica in one rank (the least loaded wins). ``load`` may be
    None (unknown: counted as 0)."""
    if not replicas:
        return []
    if key is None:
        return [list(replicas)]
    ranked = sorted(replicas, key=lambda r: _weight(key, ident(r)), reverse=True)
    preferred = load(ranked[0]) or 0
    if preferred >= spill:
        others = sorted(ranked[1:], key=lambda r: load(r) or 0)
        if others and (load(others[0]) or 0) < preferred:  # spill only to a less loaded replica
            ranked = [*others, ranked[0]]
    return [[r] for r in ranked]
