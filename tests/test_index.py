"""SpanIndex against a reference model: the contract written the slow, obvious way.

The index keeps its LRU order incrementally (a recency queue of unlocked entries, locked
ones out of it); the model re-sorts everything on every step. Any bookkeeping slip (an
entry left in the queue when locked, not put back on unlock, moved on a locked touch, a
byte counter off by one entry) shows up as a different victim, order or counter.
"""

import attrs
import pytest
from hypothesis import given, settings
from strategies import IndexProgram, index_programs

from spanctx import EntryInfo, SpanIndex, lru
from spanctx.cache.index import Admission


def largest_first(entry: EntryInfo) -> object:
    return -entry.nbytes


POLICIES = {"lru": lru, "largest-first": largest_first}


class ReferenceIndex:
    """The index's contract: entries in a dict; eviction sorts the unlocked ones by
    (policy key, last use); the last unlock of an entry counts as a use."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.policy = lru
        self.entries: dict[bytes, EntryInfo] = {}
        self.clock = 0

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def evictable(self) -> list[EntryInfo]:
        return sorted((e for e in self.entries.values() if not e.locks), key=lambda e: e.last_used)

    def touch(self, key: bytes) -> bool:
        if key not in self.entries:
            return False
        self.entries[key] = attrs.evolve(self.entries[key], last_used=self.tick())
        return True

    def lock(self, key: bytes) -> None:
        self.entries[key] = attrs.evolve(self.entries[key], locks=self.entries[key].locks + 1)

    def unlock(self, key: bytes) -> None:
        entry = self.entries[key]
        if not entry.locks:
            raise RuntimeError("unlock without lock")
        entry = attrs.evolve(entry, locks=entry.locks - 1)
        self.entries[key] = attrs.evolve(entry, last_used=self.tick()) if not entry.locks else entry

    def remove(self, key: bytes) -> None:
        if self.entries[key].locks:
            raise RuntimeError("locked")
        del self.entries[key]

    def victims(self, budget: int) -> list[bytes] | None:
        """The keys to evict, in policy order, for the entries to fit ``budget``; None if
        evicting every unlocked entry is not enough."""
        need = sum(e.nbytes for e in self.entries.values()) - budget
        victims = []
        for entry in sorted(self.evictable(), key=lambda e: (self.policy(e), e.last_used)):
            if need <= 0:
                break
            victims.append(entry.key)
            need -= entry.nbytes
        return None if need > 0 else victims

    def admit(self, key: bytes, nbytes: int, num_tokens: int) -> Admission:
        if key in self.entries:
            self.touch(key)
            return Admission(True)
        victims = self.victims(self.budget - nbytes)
        if victims is None:
            return Admission(False)
        for victim in victims:
            del self.entries[victim]
        self.entries[key] = EntryInfo(key, nbytes, num_tokens, 0, self.tick())
        return Admission(True, tuple(victims))

    def shrink(self, nbytes: int) -> tuple[bytes, ...]:
        victims = self.victims(self.budget - nbytes) if nbytes <= self.budget else None
        if victims is None:
            raise ValueError("no room")
        for victim in victims:
            del self.entries[victim]
        self.budget -= nbytes
        return tuple(victims)


def outcome(method, *args) -> tuple:
    try:
        return ("returned", method(*args))
    except (KeyError, RuntimeError, ValueError) as error:
        return ("raised", type(error))


@settings(max_examples=400, deadline=None)
@given(index_programs())
def test_index_matches_its_reference_model(program: IndexProgram):
    index, model = SpanIndex(program.budget), ReferenceIndex(program.budget)
    for op in program.ops:
        kind, *args = op
        if kind == "policy":
            index.policy = model.policy = POLICIES[args[0]]
            continue
        if kind == "admit":
            args.append(1)  # num_tokens
        assert outcome(getattr(index, kind), *args) == outcome(getattr(model, kind), *args), op
        assert {e.key: e for e in index.entries()} == model.entries, op
        assert list(index.evictable()) == model.evictable(), op  # the LRU order, snapshots equal
        assert index.budget == model.budget
        assert index.bytes_used == sum(e.nbytes for e in model.entries.values()) <= model.budget
        assert len(index) == len(model.entries)


def test_a_locked_entry_rejoins_the_lru_order_as_the_most_recent_on_its_last_unlock():
    index = SpanIndex(budget=30)
    for key in (b"a", b"b", b"c"):
        index.admit(key, 10, 1)
    index.lock(b"a")
    index.lock(b"a")
    assert [e.key for e in index.evictable()] == [b"b", b"c"]
    index.touch(b"a")  # a hit while locked: still out of the order
    index.unlock(b"a")
    assert [e.key for e in index.evictable()] == [b"b", b"c"]
    index.unlock(b"a")
    assert [e.key for e in index.evictable()] == [b"b", b"c", b"a"]
    assert index.admit(b"d", 20, 1).evicted == (b"b", b"c")


def test_a_rejected_admit_neither_evicts_nor_ticks():
    index = SpanIndex(budget=20)
    index.admit(b"a", 10, 1)
    index.admit(b"b", 10, 1)
    index.lock(b"b")
    before = index.entries()
    assert index.admit(b"c", 11, 1) == Admission(False)
    assert index.entries() == before and index.bytes_used == 20
    assert index.admit(b"c", 10, 1).evicted == (b"a",)


def test_policy_ties_go_least_recently_used_first():
    index = SpanIndex(budget=30, policy=largest_first)
    for key in (b"a", b"b", b"c"):
        index.admit(key, 10, 1)
    index.touch(b"a")
    assert index.admit(b"d", 10, 1).evicted == (b"b",)


def test_negative_sizes_are_refused():
    with pytest.raises(ValueError):
        SpanIndex(budget=-1)
    with pytest.raises(ValueError):
        SpanIndex(budget=1).admit(b"a", -1, 1)
