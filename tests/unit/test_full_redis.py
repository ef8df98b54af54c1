"""A full Redis (issue 10, item 7): nothing but entries grows with the cache, counts come from what Redis holds,
and health and the start-up log say when Redis cannot evict or refuses writes."""
from __future__ import annotations

import logging
import time
from typing import Any, Iterator

import pytest
import redis
from flask import Flask

from buddy import codec, create_app
from buddy.codec import VaryPointer
from buddy.messages import ProxyResult
from buddy.redis_keys import RedisKeys
from buddy.store import response_cache
from buddy.store.guard import StoreGuard
from buddy.store.response_cache import ResponseCache
from tests.support.processes import RedisServer
from tests.support.upstream_stub import UpstreamStub


@pytest.fixture
def buddy_config(upstream: UpstreamStub) -> dict[str, Any]:
    return {
        "domain_mappings": {"up": {"upstream": upstream.url}, "other": {"upstream": upstream.url + "/other"}},
        "logging": {"enable_console": False},
    }


@pytest.fixture
def real_redis(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """The session's redis-server, emptied, with its memory settings put back afterwards (it is shared)."""
    client = redis_server.client()
    client.flushall()
    saved = client.config_get("maxmemory*")
    yield client
    client.config_set("maxmemory", saved["maxmemory"])
    client.config_set("maxmemory-policy", saved["maxmemory-policy"])
    client.flushall()
    client.close()


def cache_keys(client: redis.Redis, domain: str) -> list[bytes]:
    return list(client.scan_iter(match=f"buddy:cache:{{{domain}}}:*", count=1000))


def test_nothing_but_the_entries_grows_with_the_cache(app: Flask, client, fake_redis) -> None:
    """Every key that lives as long as an entry must be evictable with it: after 10 and after 150 stored answers
    (some of them vary, so pointers are stored too) the keys without a TTL are the same few, of the same size."""

    def without_ttl() -> dict[bytes, int]:
        sizes = {}
        for key in fake_redis.scan_iter(count=1000):
            if fake_redis.pttl(key) < 0:
                kind = fake_redis.type(key)
                sizes[key] = {b"hash": fake_redis.hlen, b"zset": fake_redis.zcard}.get(kind, lambda _: 1)(key)
        return sizes

    for i in range(10):
        client.get(f"/up/a{i}")
    client.get("/up/varies?h=Vary:X-Colour", headers={"X-Colour": "red"})
    app.extensions["buddy"].service.metrics.flush()
    few = without_ttl()
    for i in range(140):
        client.get(f"/up/b{i}")
        client.get(f"/up/varies{i}?h=Vary:X-Colour", headers={"X-Colour": "red"})
    app.extensions["buddy"].service.metrics.flush()
    assert len(cache_keys(fake_redis, "up")) == 10 + 2 + 140 * 3  # responses, and a pointer per varying answer
    assert without_ttl() == few
    assert set(few) <= {b"buddy:stats:{up}", b"buddy:workers"}


def test_counts_stay_true_when_redis_drops_entries_on_its_own(app: Flask, client, fake_redis) -> None:
    """Eviction removes entries without telling anyone: the counts must follow what Redis holds, not what was
    stored."""
    for i in range(60):
        client.get(f"/up/item{i}?pad={'x' * i}")  # answers of different sizes
    for i in range(20):
        client.get(f"/other/item{i}")
    gone = cache_keys(fake_redis, "up")[::3]
    fake_redis.delete(*gone)  # as volatile-lru would, under memory pressure
    kept = cache_keys(fake_redis, "up")
    cache = client.get("/admin/metrics").json["cache"]
    assert cache["entries_per_domain"] == {"up": 60 - len(gone), "other": 20} and len(kept) == 60 - len(gone)
    assert cache["cache_size_per_domain"]["up"] == sum(fake_redis.strlen(k) for k in kept)  # no MEMORY USAGE here
    assert cache["total_entries"] == 80 - len(gone) and cache["counted"]["exact"] is True
    assert cache["ttl_distribution"]["1h_to_1d"] == 80 - len(gone)


def test_an_index_left_by_an_older_version_goes_at_the_first_store(app: Flask, client, fake_redis) -> None:
    """0.2 kept `index:{domain}` and `sizes:{domain}` without a TTL; a Redis they filled stays full until they go."""
    fake_redis.zadd("buddy:index:{up}", {f"{i:064x}": 1e13 for i in range(5000)})
    fake_redis.hset("buddy:sizes:{up}", mapping={f"{i:064x}": 900 for i in range(5000)})
    fake_redis.hset("buddy:stats:{up}", mapping={"bytes": 4_500_000, "expired": 3, "hits": 7})
    assert client.get("/up/a").headers["X-Cache"] == "MISS"
    assert not fake_redis.exists("buddy:index:{up}", "buddy:sizes:{up}")
    assert fake_redis.hgetall("buddy:stats:{up}") == {b"hits": b"7", b"sets": b"1"}
    assert client.get("/up/a").headers["X-Cache"] == "HIT"
    fake_redis.zadd("buddy:index:{other}", {"x": 1})
    assert client.delete("/admin/cache/other").json == {"cleared": 0, "by_domain": {"other": 0}}
    assert not fake_redis.exists("buddy:index:{other}")


def test_counts_from_a_sample_stay_within_a_few_percent(real_redis: redis.Redis, monkeypatch) -> None:
    """Past CENSUS_SAMPLE keys the census reads a sample: SCAN's first pages, a uniform draw by key hash."""
    monkeypatch.setattr(response_cache, "CENSUS_SAMPLE", 10_000, raising=False)
    keys = RedisKeys()
    blob = codec.encode(ProxyResult(200, "OK", [("Content-Type", "application/json")], b'{"a": 1}' * 40))
    pipe = real_redis.pipeline(transaction=False)
    for i in range(24_000):
        pipe.set(keys.cache("up", f"{i:064x}"), blob, px=3_600_000 * 30)
    for i in range(12_000):
        pipe.set(keys.cache("other", f"{i:064x}"), blob + b"more", px=3_600_000 * 2)
    for i in range(4_000):
        pipe.set(f"someone-else:{i}", b"v")
    pipe.execute()
    real_redis.delete(*[keys.cache("up", f"{i:064x}") for i in range(0, 24_000, 4)])  # evicted: 18,000 left
    for i in range(0, 1200, 2):  # answers that vary on a header leave a pointer at the request's own key
        real_redis.set(keys.cache("other", f"{i:064x}"), codec.encode_pointer(VaryPointer(("origin",))), ex=60)
    time.sleep(2)  # long enough for Redis's LRU clock (1 s) to tell an untouched key from one just read
    cache = ResponseCache(real_redis, StoreGuard(), keys)
    up, other = cache.describe("up"), cache.describe("other")
    assert up.entries == pytest.approx(18_000, rel=0.05) and other.entries == pytest.approx(11_400, rel=0.05)
    assert up.size_bytes == pytest.approx(18_000 * real_redis.memory_usage(keys.cache("up", f"{1:064x}")), rel=0.05)
    assert other.size_bytes == pytest.approx(
        11_400 * real_redis.memory_usage(keys.cache("other", f"{1:064x}")), rel=0.05)
    assert up.ttl_buckets["1d_to_7d"] == up.entries and other.ttl_buckets["1h_to_1d"] == other.entries
    census = cache.census()
    assert not census.exact and census.keys_read >= 10_000 and census.keys_total == 34_000
    idle = [real_redis.object("idletime", key) for key in real_redis.scan_iter(match="buddy:cache:*", count=1000)]
    assert min(idle) >= 2  # counting touched nothing: LRU still sees what clients used, not what metrics read


def test_health_is_degraded_with_the_reason_while_redis_refuses_writes(buddy_config, real_redis) -> None:
    app = create_app(buddy_config, redis_client=real_redis, environ={})
    client = app.test_client()
    try:
        real_redis.config_set("maxmemory-policy", "volatile-lru")
        real_redis.config_set("maxmemory", 1)  # below what an empty Redis uses: every write is refused
        full = client.get("/admin/health")
        assert full.status_code == 503 and full.json["status"] == "degraded"
        assert full.json["redis"].startswith("refusing writes: OutOfMemoryError")
        assert "Redis is full" in full.json["reason"] and "nothing it may evict is left" in full.json["reason"]
        assert client.get("/up/a").headers["X-Cache"] == "BYPASS"
        real_redis.config_set("maxmemory-policy", "noeviction")
        assert "set maxmemory-policy volatile-lru" in client.get("/admin/health").json["reason"]
        real_redis.config_set("maxmemory", "64mb")
        real_redis.config_set("maxmemory-policy", "volatile-lru")
        assert client.get("/up/a").headers["X-Cache"] == "MISS"
        assert client.get("/up/a").headers["X-Cache"] == "HIT"
        guard = app.extensions["buddy"].service.cache.guard
        for remembered in ("refused_at", "bug_at"):  # a guard that remembers refusals keeps health degraded a while
            if getattr(guard, remembered, None) is not None:
                setattr(guard, remembered, getattr(guard, remembered) - 3600)
        ok = client.get("/admin/health")
        assert ok.status_code == 200 and ok.json["status"] == "ok" and ok.json["warnings"] == []
    finally:
        app.extensions["buddy"].shutdown()


@pytest.mark.parametrize("settings, warning", [
    ({"maxmemory": 0, "maxmemory-policy": "volatile-lru"}, "Redis has no maxmemory"),
    ({"maxmemory": "64mb", "maxmemory-policy": "noeviction"}, "maxmemory-policy noeviction"),
    ({"maxmemory": "64mb", "maxmemory-policy": "allkeys-lru"}, "maxmemory-policy allkeys-lru"),
    ({"maxmemory": "64mb", "maxmemory-policy": "volatile-lru"}, None),
])
def test_start_up_warns_when_redis_cannot_evict(buddy_config, real_redis, caplog, settings, warning) -> None:
    for name, value in settings.items():
        real_redis.config_set(name, value)
    with caplog.at_level(logging.WARNING, logger="buddy"):
        app = create_app(buddy_config, redis_client=real_redis, environ={})
    try:
        logged = [r.getMessage() for r in caplog.records if r.name.startswith("buddy")]
        health = app.test_client().get("/admin/health")
        assert health.status_code == 200  # a risk, not a failure: nothing is refused yet
        if warning is None:
            assert logged == [] and health.json["warnings"] == []
        else:
            assert len(logged) == 1 and warning in logged[0]
            assert len(health.json["warnings"]) == 1 and warning in health.json["warnings"][0]
            database = app.test_client().get("/admin/metrics").json["database"]
            assert warning in database["warnings"][0] and database["maxmemory_policy"] == settings["maxmemory-policy"]
    finally:
        app.extensions["buddy"].shutdown()
