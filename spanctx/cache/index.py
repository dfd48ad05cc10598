"""The store's index: which spans exist, their sizes, locks and eviction order.

No tensors here. The index decides; ``store.KVStore`` holds the tensors and follows its
decisions. Eviction takes unlocked entries in the order of a policy's sort key (smallest
first), so a new policy is one small function.

LRU (the default) costs O(1) amortized per admit: unlocked entries sit in a queue in
recency order, least recent first, and a victim is popped from its head. A locked entry
leaves the queue and rejoins at its tail on its last unlock (an entry a request held until
now is the most recently used), so eviction never walks past locked entries. Any other
policy sorts the unlocked entries on each evicting admit: O(n log n).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator

import attrs

__all__ = ["Admission", "EntryInfo", "EvictionPolicy", "SpanIndex", "lru"]


@attrs.frozen
class EntryInfo:
    """What the index knows of one stored span."""

    key: bytes
    nbytes: int
    num_tokens: int
    locks: int
    last_used: int  # logical clock of the last lookup, insert or final unlock


EvictionPolicy = Callable[[EntryInfo], object]


def lru(entry: EntryInfo) -> object:
    """Least recently used first."""
    return entry.last_used


@attrs.frozen
class Admission:
    """Result of ``SpanIndex.admit``: whether the entry went in, and what left for it."""

    admitted: bool
    evicted: tuple[bytes, ...] = ()


@attrs.define(slots=True)
class _Entry:
    """The index's mutable record of one entry; ``EntryInfo`` is its public snapshot."""

    key: bytes
    nbytes: int
    num_tokens: int
    locks: int
    last_used: int

    def snapshot(self) -> EntryInfo:
        return EntryInfo(self.key, self.nbytes, self.num_tokens, self.locks, self.last_used)


class SpanIndex:
    """Byte-budgeted set of span keys with lock counts and a pluggable eviction order.

    Contract: ``bytes_used <= budget`` at all times; a locked entry is never evicted;
    ``admit`` either inserts and evicts just enough, or changes nothing. Every ``lock``
    is paired with one ``unlock``. ``policy`` may be replaced at any time.
    """

    def __init__(self, budget: int, policy: EvictionPolicy = lru) -> None:
        if budget < 0:
            raise ValueError(f"budget must be >= 0 bytes, got {budget}")
        self.budget = budget
        self.policy = policy
        self._entries: dict[bytes, _Entry] = {}
        # unlocked entries by ascending last_used: the LRU eviction order
        self._unlocked: OrderedDict[bytes, _Entry] = OrderedDict()
        self._clock = 0
        self._bytes_used = 0
        self._unlocked_bytes = 0
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
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry.snapshot()

    def entries(self) -> tuple[EntryInfo, ...]:
        """Every entry, in insertion order."""
        with self._lock:
            return tuple(e.snapshot() for e in self._entries.values())

    def evictable(self) -> Iterator[EntryInfo]:
        """The unlocked entries, least recently used first (a snapshot taken now)."""
        with self._lock:
            return iter([e.snapshot() for e in self._unlocked.values()])

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
            entry.last_used = self._tick()
            if not entry.locks:
                self._unlocked.move_to_end(key)
            return True

    def lock(self, key: bytes) -> None:
        """Pin ``key`` against eviction; pair every lock with one ``unlock``."""
        with self._lock:
            entry = self._require(key)
            if not entry.locks:
                del self._unlocked[key]
                self._unlocked_bytes -= entry.nbytes
            entry.locks += 1

    def unlock(self, key: bytes) -> None:
        """Release one ``lock``; the last one makes ``key`` the most recently used."""
        with self._lock:
            entry = self._require(key)
            if entry.locks == 0:
                raise RuntimeError("unlock without a matching lock")
            entry.locks -= 1
            if not entry.locks:
                entry.last_used = self._tick()
                self._unlocked[key] = entry
                self._unlocked_bytes += entry.nbytes

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
            if need > self._unlocked_bytes:
                return Admission(False)
            victims = self._victims(need) if need > 0 else []
            for victim in victims:
                self._remove(victim)
            entry = _Entry(key, nbytes, num_tokens, 0, self._tick())
            self._entries[key] = self._unlocked[key] = entry
            self._bytes_used += nbytes
            self._unlocked_bytes += nbytes
            return Admission(True, tuple(victims))

    def shrink(self, nbytes: int) -> tuple[bytes, ...]:
        """Lower the budget by ``nbytes``, evicting unlocked entries in policy order until
        the entries fit it. Returns the evicted keys. Raises ValueError, changing nothing,
        when ``nbytes`` exceeds the budget or the locked entries alone would not fit."""
        with self._lock:
            if not 0 <= nbytes <= self.budget:
                raise ValueError(f"cannot take {nbytes} bytes off a {self.budget}-byte budget")
            need = self._bytes_used - (self.budget - nbytes)
            if need > self._unlocked_bytes:
                raise ValueError(f"locked entries hold {self._bytes_used - self._unlocked_bytes} bytes, "
                                 f"more than the {self.budget - nbytes} bytes left of the budget")
            victims = self._victims(need) if need > 0 else []
            for victim in victims:
                self._remove(victim)
            self.budget -= nbytes
            return tuple(victims)

    def _victims(self, need: int) -> list[bytes]:
        """The first unlocked keys in policy order whose bytes add up to ``need`` (> 0);
        the caller has checked that the unlocked entries hold that much."""
        if self.policy is lru:
            order: Iterator[_Entry] = iter(self._unlocked.values())
        else:
            order = iter(sorted(self._unlocked.values(), key=lambda e: self.policy(e.snapshot())))
        victims = []
        while need > 0:
            entry = next(order)
            victims.append(entry.key)
            need -= entry.nbytes
        return victims

    def remove(self, key: bytes) -> None:
        """Drop an unlocked entry."""
        with self._lock:
            if self._require(key).locks:
                raise RuntimeError("cannot remove a locked entry")
            self._remove(key)

    def _remove(self, key: bytes) -> None:
        """Drop the unlocked entry ``key``."""
        entry = self._entries.pop(key)
        del self._unlocked[key]
        self._bytes_used -= entry.nbytes
        self._unlocked_bytes -= entry.nbytes

    def _require(self, key: bytes) -> _Entry:
        entry = self._entries.get(key)
        if entry is None:
            raise KeyError(f"no entry {key.hex()}")
        return entry
