"""The tier protocol on each real tier: host memory, safetensors files, a real
redis-server. Values that are corrupt, truncated, foreign or evicted in part are misses
and are dropped; full tiers refuse or evict, never answer wrong KV."""

from __future__ import annotations

import json
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from redis_helpers import redis_server
from strategies import TIER_KEYS, tier_ops

from spanctx.cache.tiers import DiskTier, MemoryTier, TierStack, open_tier, tier_stack
from spanctx.cache.tiers.codec import FORMAT
from spanctx.cache.store import SpanKV


def make_kv(layers: int = 2, tokens: int = 3, seed: int = 0, dtype=torch.float32) -> SpanKV:
    g = torch.Generator().manual_seed(seed)
    shape = (1, 2, tokens, 4)  # [1, H_kv, S, D]
    return SpanKV(tuple(torch.randn(shape, generator=g).to(dtype) for _ in range(layers)),
                  tuple(torch.randn(shape, generator=g).to(dtype) for _ in range(layers)))


def same(a: SpanKV, b: SpanKV) -> bool:
    return len(a.keys) == len(b.keys) and all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        for x, y in zip((*a.keys, *a.values), (*b.keys, *b.values)))


@pytest.fixture(scope="module")
def server():
    with redis_server() as srv:
        yield srv


@pytest.fixture(params=["memory", "disk", "redis"])
def make_tier(request, tmp_path_factory):
    """A factory of fresh, empty tiers of one kind."""
    if request.param == "memory":
        return lambda: MemoryTier(1 << 30)
    if request.param == "disk":
        return lambda: DiskTier(tmp_path_factory.mktemp("tier"))
    srv = request.getfixturevalue("server")
    return lambda: _flushed(open_tier(f"{srv.url[:-2]}/1"))  # database 1, emptied


def _flushed(tier):
    tier._client.flushdb()
    return tier


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=tier_ops())
def test_tier_matches_a_dict(make_tier, ops):
    tier, model = make_tier(), {}
    for op, k, (layers, tokens, seed) in ops:
        key = TIER_KEYS[k]
        if op == "put":
            kv = make_kv(layers, tokens, seed, torch.bfloat16 if seed % 2 else torch.float32)
            assert tier.put(key, kv)
            model.setdefault(key, kv)  # a key names one KV: a second put keeps either
            if not same(model[key], kv):
                model[key] = tier.get(key)  # the tier kept one of them: which is its choice
        elif op == "get":
            got = tier.get(key)
            assert (got is None) == (key not in model)
            assert got is None or same(got, model[key])
        elif op == "contains":
            assert tier.contains(key) == (key in model)
        else:
            tier.drop(key)
            model.pop(key, None)


def test_disk_values_that_fail_their_checks_are_dropped(tmp_path):
    tier, key, other = DiskTier(tmp_path), TIER_KEYS[0], TIER_KEYS[1]
    path = tmp_path / f"spanctx-v{FORMAT}" / f"{key.hex()}.safetensors"
    for damage in ("truncate", "flip", "foreign", "garbage"):
        assert tier.put(key, make_kv()) and tier.put(other, make_kv(seed=1))
        data = path.read_bytes()
        if damage == "truncate":
            path.write_bytes(data[: len(data) - 7])
        elif damage == "flip":  # one bit of the last value element
            path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        elif damage == "foreign":  # another key's value under this key's name
            path.write_bytes((tmp_path / f"spanctx-v{FORMAT}" / f"{other.hex()}.safetensors").read_bytes())
        else:
            path.write_bytes(b"not a safetensors file")
        assert tier.get(key) is None, damage
        assert not path.exists(), damage
        assert same(tier.get(other), make_kv(seed=1))


def test_redis_values_that_fail_their_checks_are_dropped(server):
    tier = _flushed(open_tier(server.url))
    client, key, other = tier._client, TIER_KEYS[0], TIER_KEYS[1]
    name = f"spanctx:v{FORMAT}:{key.hex()}"
    for damage in ("flip", "short", "missing chunk", "foreign", "not json"):
        assert tier.put(key, make_kv(layers=2, tokens=300)) and tier.put(other, make_kv(seed=1))
        if damage == "flip":
            chunk = client.get(f"{name}:0")
            client.set(f"{name}:0", bytes([chunk[0] ^ 1]) + chunk[1:])
        elif damage == "short":
            client.set(f"{name}:0", client.get(f"{name}:0")[:-1])
        elif damage == "missing chunk":
            client.delete(f"{name}:0")
        elif damage == "foreign":
            client.set(name, client.get(f"spanctx:v{FORMAT}:{other.hex()}"))
        else:
            client.set(name, b"{")
        assert tier.get(key) is None, damage
        assert not client.exists(name) and not client.exists(f"{name}:1"), damage
        assert same(tier.get(other), make_kv(seed=1))


def test_redis_values_are_chunked(server):
    tier = open_tier(f"{server.url}?chunk_bytes=1000")
    kv = make_kv(layers=2, tokens=100)  # 12800 bytes: 13 chunks
    assert tier.put(TIER_KEYS[2], kv)
    head = json.loads(tier._client.get(f"spanctx:v{FORMAT}:{TIER_KEYS[2].hex()}"))
    assert head["chunks"] == 13 and head["nbytes"] == kv.nbytes
    assert same(tier.get(TIER_KEYS[2]), kv)


def test_full_tiers_evict_or_refuse(tmp_path):
    kv = make_kv(tokens=8)  # 512 bytes
    memory, disk = MemoryTier(2 * kv.nbytes), DiskTier(tmp_path, max_bytes=3 * kv.nbytes)
    assert not memory.put(TIER_KEYS[0], make_kv(tokens=100))  # larger than the tier
    for tier in (memory, disk):
        for i, key in enumerate(TIER_KEYS):
            assert tier.put(key, make_kv(tokens=8, seed=i))
        assert tier.contains(TIER_KEYS[-1]) and not tier.contains(TIER_KEYS[0])  # least recent left
        for i, key in enumerate(TIER_KEYS):
            got = tier.get(key)
            assert got is None or same(got, make_kv(tokens=8, seed=i))


def test_a_full_redis_evicts_and_never_answers_wrong_kv():
    with redis_server(maxmemory=4 << 20) as srv:
        tier = open_tier(f"{srv.url}?chunk_bytes=65536")
        values = {key: make_kv(layers=4, tokens=2048, seed=i) for i, key in enumerate(TIER_KEYS)}  # 512 KiB each
        for key, kv in values.items():
            tier.put(key, kv)
        for i in range(12):  # far more than fits: the server evicts by LRU
            tier.put(bytes([100 + i]) * 16, make_kv(layers=4, tokens=2048, seed=100 + i))
        got = {key: tier.get(key) for key in values}
        assert any(v is None for v in got.values())  # 8 MiB written into 4 MiB: some left
        assert all(v is None or same(v, values[key]) for key, v in got.items())


def test_urls():
    assert isinstance(open_tier("cpu?max_bytes=1M"), MemoryTier) and open_tier("cpu?max_bytes=1M").max_bytes == 1 << 20
    assert open_tier("pinned").url == "pinned"
    with pytest.raises(ValueError, match="unknown tier"):
        open_tier("s3://bucket")
    with pytest.raises(ValueError, match="unknown option"):
        open_tier("cpu?timeout=3")
    with pytest.raises(TypeError, match="list of URLs"):
        tier_stack("cpu")


def test_writes_beyond_the_pending_bound_are_skipped_and_counted():
    class Stalled(MemoryTier):
        """A tier whose writes wait until released."""

        def __init__(self):
            super().__init__(1 << 30)
            import threading

            self.release = threading.Event()

        def put(self, key, kv):
            self.release.wait(timeout=60)
            return super().put(key, kv)

    tier = Stalled()
    stack = TierStack([tier], max_pending_bytes=2 * make_kv().nbytes)
    for i, key in enumerate(TIER_KEYS):  # one is taken by the writer, two wait, one is skipped
        stack.stored(key, make_kv(seed=i))
        while i == 0 and stack._queue:  # wait until the writer holds the first one
            time.sleep(0.001)
    tier.release.set()
    assert stack.flush(timeout=60)
    assert stack.totals.write_skipped == 1 and stack.totals.written == 3
    assert [tier.contains(k) for k in TIER_KEYS] == [True, True, True, False]
