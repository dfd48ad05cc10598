"""Lower tiers of the span store: host memory, local disk, Redis/Valkey.

Public surface (see docs/tiers.md):

- ``Runtime(..., tiers=["pinned", "disk:///var/cache/spanctx", "redis://127.0.0.1:6379/0"])``:
  a list of URLs or ``Tier`` objects, fastest first, or a ``TierStack`` (write policy,
  cost-aware fetching);
- URLs: ``cpu`` / ``pinned`` (host memory; pinned on CUDA), ``disk:///path``,
  ``redis://host:port/db`` (also ``rediss://``, ``valkey://``), each with an optional
  ``?max_bytes=8G`` (memory and disk; Redis is bounded by the server's ``maxmemory``);
  Redis also takes ``timeout=`` (seconds, default 2) and ``chunk_bytes=``;
- the ``Tier`` protocol (``get / put / contains / drop``) for other places.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import torch

from ..store import default_budget_bytes
from .base import Tier, parse_bytes
from .disk import DiskTier
from .memory import MemoryTier
from .remote import RemoteTier
from .stack import TierCallStats, TierStack, TierTotals

__all__ = ["DiskTier", "MemoryTier", "RemoteTier", "Tier", "TierCallStats", "TierStack", "TierTotals",
           "open_tier", "tier_stack"]


def open_tier(url: str) -> Tier:
    """The tier a URL names (see the module doc)."""
    parts = urlsplit(url)
    options = dict(parse_qsl(parts.query))
    scheme = parts.scheme or parts.path  # "cpu", "pinned" have no "://"
    allowed = {"cpu": {"max_bytes"}, "pinned": {"max_bytes"}, "disk": {"max_bytes"},
               "redis": {"timeout", "chunk_bytes"}, "rediss": {"timeout", "chunk_bytes"},
               "valkey": {"timeout", "chunk_bytes"}}
    if scheme not in allowed:
        raise ValueError(f"unknown tier {url!r}: use cpu, pinned, disk:///path or redis://host:port/db")
    if unknown := set(options) - allowed[scheme]:
        raise ValueError(f"tier {url!r}: unknown option(s) {sorted(unknown)}; {scheme} takes {sorted(allowed[scheme])}")
    if scheme in ("cpu", "pinned"):
        size = parse_bytes(options["max_bytes"]) if "max_bytes" in options else default_budget_bytes(torch.device("cpu"))
        tier: Tier = MemoryTier(size, pin=scheme == "pinned")
    elif scheme == "disk":
        if not parts.path:
            raise ValueError(f"tier {url!r}: a disk tier needs a path, e.g. disk:///var/cache/spanctx")
        tier = DiskTier(parts.path, max_bytes=parse_bytes(options["max_bytes"]) if "max_bytes" in options else None)
    else:
        server = urlunsplit(("rediss" if scheme == "rediss" else "redis", parts.netloc, parts.path, "", ""))
        tier = RemoteTier(server, timeout=float(options.get("timeout", 2.0)),
                          chunk_bytes=parse_bytes(options.get("chunk_bytes", 4 << 20)))
    tier.url = url  # as the user wrote it: stats and warnings name it so
    return tier


def tier_stack(tiers: TierStack | Sequence[Tier | str]) -> TierStack:
    """A ``TierStack`` of ``tiers`` (URLs opened; a stack is returned as is)."""
    if isinstance(tiers, TierStack):
        return tiers
    if isinstance(tiers, str):
        raise TypeError(f"tiers is a list of URLs or tiers, got the string {tiers!r}: write tiers=[{tiers!r}]")
    return TierStack([open_tier(t) if isinstance(t, str) else t for t in tiers])
