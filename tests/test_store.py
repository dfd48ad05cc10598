"""The index and the store under random put / lock / unlock / evict sequences."""

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from spanctx import KVStore
from spanctx.cache.index import SpanIndex
from spanctx.cache.span_kv import SpanKV


def span_kv(num_tokens: int, layers: int = 2) -> SpanKV:
    # k, v: [1, H=2, S, D=4] float32 -> 32 bytes per token per tensor
    make = lambda: tuple(torch.randn(1, 2, num_tokens, 4) for _ in range(layers))
    return SpanKV(make(), make())


BYTES_PER_TOKEN = 2 * 2 * 2 * 4 * 4  # layers * (k, v) * heads * dim * float32


class StoreMachine(RuleBasedStateMachine):
    """Random store traffic; a model of what must hold is checked after every step."""

    keys = Bundle("keys")

    def __init__(self):
        super().__init__()
        self.budget = 40 * BYTES_PER_TOKEN
        self.store = KVStore(self.budget)
        self.locks: dict[bytes, int] = {}
        self.stored_ever: dict[bytes, int] = {}
        self.puts = 0
        self.rejected = 0
        self.evictions = 0

    @rule(target=keys, key=st.binary(min_size=16, max_size=16), tokens=st.integers(1, 24))
    def put(self, key, tokens):
        if key in self.stored_ever and self.stored_ever[key] != tokens:
            return key  # keys name content: one key, one size
        before = set(self.store._payloads)
        last_used = {e.key: e.last_used for e in self.store.index.entries()}
        ok = self.store.put(key, span_kv(tokens))
        self.stored_ever[key] = tokens
        if ok:
            assert key in self.store
        else:
            self.rejected += 1
            # a rejected put changes nothing, and only happens when the locked entries leave no room
            assert set(self.store._payloads) == before
            locked_bytes = sum(self.store.index.info(k).nbytes for k in self.locks if self.locks[k])
            assert locked_bytes + tokens * BYTES_PER_TOKEN > self.budget
        evicted = self.account_evictions(before)
        kept_unlocked = [k for k in before - evicted if not self.locks.get(k, 0)]
        if evicted and kept_unlocked:  # LRU: every victim was used before every unlocked survivor
            assert max(last_used[k] for k in evicted) < min(last_used[k] for k in kept_unlocked)
        return key

    def account_evictions(self, before: set[bytes]) -> set[bytes]:
        """The keys of ``before`` gone from the store: none locked; counted."""
        evicted = before - set(self.store._payloads)
        assert not any(self.locks.get(k, 0) for k in evicted), "evicted a locked entry"
        for k in evicted:
            self.locks.pop(k, None)
        self.evictions += len(evicted)
        return evicted

    @rule(key=keys)
    def lock(self, key):
        if key in self.store:
            self.store.index.lock(key)
            self.locks[key] = self.locks.get(key, 0) + 1

    @precondition(lambda self: any(self.locks.values()))
    @rule(data=st.data())
    def unlock(self, data):
        key = data.draw(st.sampled_from(sorted(k for k, n in self.locks.items() if n)))
        self.store.index.unlock(key)
        self.locks[key] -= 1

    @rule(key=keys)
    def lookup(self, key):
        kv = self.store.lookup(key)
        assert (kv is not None) == (key in self.store)
        if kv is not None:
            assert kv.num_tokens == self.stored_ever[key]

    @rule(nbytes=st.integers(0, 4 * BYTES_PER_TOKEN))
    def reserve(self, nbytes):
        before = set(self.store._payloads)
        locked_bytes = sum(self.store.index.info(k).nbytes for k in self.locks if self.locks[k])
        try:
            self.store.reserve(nbytes)
        except ValueError:
            # refused only when the locked entries leave no room, and then nothing changed
            assert locked_bytes > self.budget - nbytes
            assert set(self.store._payloads) == before
            return
        self.budget -= nbytes
        self.account_evictions(before)

    @rule()
    def clear(self):
        self.store.clear()
        assert all(self.locks.get(k, 0) for k in self.store._payloads)

    @invariant()
    def within_budget_and_consistent(self):
        stats = self.store.stats
        assert stats.bytes_used <= self.budget
        assert stats.bytes_used == sum(kv.nbytes for kv in self.store._payloads.values())
        assert stats.entries == len(self.store._payloads) == len(self.store.index)
        assert stats.rejected == self.rejected
        assert stats.evictions == self.evictions
        assert stats.bytes_budget == self.budget
        for key, n in self.locks.items():
            if n:
                assert key in self.store, "a locked entry disappeared"
                assert self.store.index.info(key).locks == n


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_lru_evicts_the_least_recently_used_unlocked_entry():
    index = SpanIndex(budget=30)
    for key in (b"a", b"b", b"c"):
        assert index.admit(key, 10, 1).admitted
    index.touch(b"a")
    index.lock(b"b")
    admission = index.admit(b"d", 10, 1)
    assert admission.evicted == (b"c",)
    assert not index.admit(b"e", 25, 1).admitted  # only 20 bytes are unlocked
    assert index.admit(b"e", 20, 1).evicted == (b"a", b"d")
    assert {e.key for e in index.entries()} == {b"b", b"e"} and index.bytes_used == 30


def test_admit_changes_nothing_when_locked_entries_leave_no_room():
    index = SpanIndex(budget=20)
    index.admit(b"a", 15, 1)
    index.lock(b"a")
    assert index.admit(b"b", 10, 1) == index.admit(b"b", 10, 1)
    assert not index.admit(b"b", 10, 1).admitted
    assert b"a" in index and b"b" not in index and index.bytes_used == 15


def test_policy_is_a_sort_key():
    index = SpanIndex(budget=30)
    index.admit(b"small", 5, 1)
    index.admit(b"large", 20, 1)
    index.policy = lambda entry: -entry.nbytes  # largest first, whatever its age
    assert index.admit(b"new", 10, 1).evicted == (b"large",)


def test_unbalanced_unlock_raises():
    index = SpanIndex(budget=10)
    index.admit(b"a", 1, 1)
    with pytest.raises(RuntimeError):
        index.unlock(b"a")
    with pytest.raises(KeyError):
        index.lock(b"missing")


def test_span_kv_validates_layers():
    with pytest.raises(ValueError):
        SpanKV((torch.zeros(1, 1, 2, 4),), (torch.zeros(1, 1, 3, 4),))
    with pytest.raises(ValueError):
        SpanKV((), ())
