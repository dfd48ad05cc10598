"""The store's index: which spans exist, their sizes, locks and eviction order.

No tensors here. The index decides; ``store.KVStore`` holds the tensors and follows its
decisions. Eviction takes unlocked entries in the order of a policy's sort key
(smallest first), so a new policy is one small function.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

import attrs


@attrs.frozen
class EntryInfo:
    """What the index knows of one stored span."""

    key: bytes
    nbytes: int
    num_tokens: int
    locks: int
    last_used: int  # logical clock of the last lookup or insert


EvictionPolicy = Callable[[EntryInfo], object]


def lru(entry: EntryInfo) -> object:
    """Least recently used first."""
    return entry.last_used


@attrs.frozen
class Admission:
    """Result of ``SpanIndex.admit``: whether the entry went in, and what left for it."""

    admitted: bool
    evicted: tuple[bytes, ...] = ()


class SpanIndex:
    """Byte-budgeted set of span keys with lock counts and a pluggable eviction order.

    Contract: ``bytes_used <= budget`` at all times; a locked entry is never evicted;
    ``admit`` either inserts and evicts just enough, or changes nothing.
    """

    def __init__(self, budget: int, policy: EvictionPolicy = lru) -> None:
        if budget < 0:
            raise ValueError(f"budget must be >= 0 bytes, got {budget}")
        self.budget = budget
        self.policy = policy
        self._entries: dict[bytes, EntryInfo] = {}
        self._clock = 0
        self._bytes_used = 0
        self._lock = threading.RLock()

    # -- queries ---------------------------------------------------------------------

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes_used(self) -> int:
        return self._bytes_used

    def info(self, key: bytes) -> EntryInfo | None:
        return self._entries.get(key)

    def entries(self) -> tuple[EntryInfo, ...]:
        with self._lock:
            return tuple(self._entries.values())

    # -- updates ---------------------------------------------------------------------

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def touch(self, key: bytes) -> bool:
        """Mark ``key`` as just used. Returns whether it exists."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return False
            self._entries[key] = attrs.evolve(entry, last_used=self._tick())
            return True

    def lock(self, key: bytes) -> None:
        """Pin ``key`` against eviction; pair every lock with one ``unlock``."""
        with self._lock:
            entry = self._require(key)
            self._entries[key] = attrs.evolve(entry, locks=entry.locks + 1)

    def unlock(self, key: bytes) -> None:
        with self._lock:
            entry = self._require(key)
            if entry.locks == 0:
                raise RuntimeError("unlock without a matching lock")
            self._entries[key] = attrs.evolve(entry, locks=entry.locks - 1)

    def admit(self, key: bytes, nbytes: int, num_tokens: int) -> Admission:
        """Insert ``key``, evicting unlocked entries in policy order to make room.

        Returns ``Admission(False)`` and changes nothing when the entry cannot fit even
        after evicting every unlocked entry. Re-admitting a present key only touches it.
        """
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        with self._lock:
            if key in self._entries:
                self.touch(key)
                return Admission(True)
            need = self._bytes_used + nbytes - self.budget
            victims: list[EntryInfo] = []
            if need > 0:
                for entry in sorted(self.evictable(), key=self.policy):
                    if need <= 0:
                        break
                    victims.append(entry)
                    need -= entry.nbytes
                if need > 0:
                    return Admission(False)
            for victim in victims:
                self._remove(victim.key)
            self._entries[key] = EntryInfo(key, nbytes, num_tokens, 0, self._tick())
            self._bytes_used += nbytes
            return Admission(True, tuple(v.key for v in victims))

    def evictable(self) -> Iterable[EntryInfo]:
        return (e for e in self._entries.values() if e.locks == 0)

    def remove(self, key: bytes) -> None:
        """Drop an unlocked entry."""
        with self._lock:
            if self._require(key).locks:
                raise RuntimeError("cannot remove a locked entry")
            self._remove(key)

    def _remove(self, key: bytes) -> None:
        entry = self._entries.pop(key)
        self._bytes_used -= entry.nbytes

    def _require(self, key: bytes) -> EntryInfo:
        entry = self._entries.get(key)
        if entry is None:
            raise KeyError(f"no entry {key.hex()}")
        return entry
