"""The folded miss path: taking the fill lock, looking again and reserving the upstream start in one call (lead.lua),
on fakeredis[lua] and the real bundled Redis; and through the app, one reservation per upstream call."""
from __future__ import annotations

from typing import Iterator

import fakeredis
import pytest
from flask import Flask
from redis.crc import key_slot

from buddy import create_app
from buddy.redis_keys import EntryId, RedisKeys
from buddy.settings import validate_config
from buddy.store.fill_lock import FillLock, LeadPlan
from buddy.store.guard import StoreGuard
from buddy.store.rate_limiter import RateLimiter
from tests.support.upstream_stub import UpstreamStub

KEYS = RedisKeys("t:")
ENTRY = EntryId("up", "d" * 64)


def domain(per_hour: int = 1000):
    config = {"domain_mappings": {"up": {"upstream": "https://up.example"}},
              "throttling": {"domain_limits": {"up": per_hour}}}
    return validate_config(config).domains["up"]


class Parts:
    def __init__(self, client, max_delay: float = 300) -> None:
        self.client = client
        self.lock = FillLock(client, StoreGuard(), KEYS)
        self.limiter = RateLimiter(client, StoreGuard(), KEYS, max_delay=max_delay)

    def plan(self, per_hour: int = 1000) -> tuple[LeadPlan, list]:
        keys, args = self.limiter.plan(domain(per_hour))
        return LeadPlan(KEYS.cache(ENTRY.domain, ENTRY.digest), keys, args), [keys, args]

    def reserved(self) -> int:
        return self.client.zcard(KEYS.rate_starts("up"))


@pytest.fixture
def parts(any_redis) -> Parts:
    return Parts(any_redis)


def test_a_new_leader_of_a_missing_entry_reserves_exactly_one_start(parts: Parts) -> None:
    plan, args = parts.plan()
    won, holder, ahead = parts.lock.lead(ENTRY, "leader", 10_000, plan)
    assert (won, holder) == (True, "leader")
    assert ahead is not None and ahead.blob is None and ahead.verdict is not None
    decision = parts.limiter.decision(ahead.verdict, *args)
    assert decision.accepted and decision.delay == 0
    assert parts.reserved() == 1
    assert parts.client.zscore(KEYS.rate_starts("up"), decision.slot) is not None  # release() can give it back
    assert parts.client.get(KEYS.lock(ENTRY)) == b"leader"


def test_a_follower_reserves_nothing_and_learns_whom_to_follow(parts: Parts) -> None:
    assert parts.lock.lead(ENTRY, "leader", 10_000, parts.plan()[0])[0]
    for token in ("second", "third"):
        assert parts.lock.lead(ENTRY, token, 10_000, parts.plan()[0]) == (False, "leader", None)
    assert parts.reserved() == 1


def test_an_entry_stored_meanwhile_is_returned_and_nothing_is_reserved(parts: Parts) -> None:
    parts.client.set(KEYS.cache(ENTRY.domain, ENTRY.digest), b"stored by the previous leader")
    won, _, ahead = parts.lock.lead(ENTRY, "leader", 10_000, parts.plan()[0])
    assert won and ahead is not None
    assert ahead.blob == b"stored by the previous leader" and ahead.verdict is None
    assert parts.reserved() == 0  # the caller throttles itself only if it may not serve what it found


def test_a_refusal_takes_the_lock_but_consumes_no_slot(any_redis) -> None:
    parts = Parts(any_redis, max_delay=2)
    plan, args = parts.plan(per_hour=1)
    won, _, ahead = parts.lock.lead(ENTRY, "first", 10_000, plan)
    assert won and ahead is not None and parts.limiter.decision(ahead.verdict, *args).accepted
    parts.lock.release(ENTRY, "first")
    plan, args = parts.plan(per_hour=1)
    won, _, ahead = parts.lock.lead(ENTRY, "second", 10_000, plan)
    assert won and ahead is not None
    refused = parts.limiter.decision(ahead.verdict, *args)
    assert not refused.accepted and refused.delay > 2
    assert parts.reserved() == 1  # the first start only
    assert any_redis.hget(KEYS.rate_penalty("up"), "level") == b"1"  # a refusal raises the penalty, as before
    assert any_redis.get(KEYS.lock(ENTRY)) == b"second"  # held: its followers share the 429


def test_a_vanished_leader_gets_one_successor(parts: Parts) -> None:
    assert parts.lock.lead(ENTRY, "dead", 10_000, parts.plan()[0])[0]
    parts.client.delete(KEYS.lock(ENTRY))  # its lock expired
    won, holder, ahead = parts.lock.lead(ENTRY, "w1", 10_000, parts.plan()[0], vanished="dead")
    assert (won, holder) == (True, "w1") and ahead is not None and ahead.verdict is not None
    parts.lock.release(ENTRY, "w1")  # finished already: the other waiters still follow it
    assert parts.lock.lead(ENTRY, "w2", 10_000, parts.plan()[0], vanished="dead") == (False, "w1", None)
    assert parts.reserved() == 2


def test_every_key_of_the_folded_call_is_in_one_cluster_slot() -> None:
    keys, _ = RateLimiter(fakeredis.FakeRedis(), StoreGuard(), KEYS, 300).plan(domain())
    touched = [KEYS.lock(ENTRY), KEYS.successor(ENTRY, "t"), KEYS.cache(ENTRY.domain, ENTRY.digest), *keys]
    assert len({key_slot(key.encode()) for key in touched}) == 1


@pytest.fixture
def limited_app(upstream: UpstreamStub) -> Iterator[tuple[Flask, fakeredis.FakeRedis]]:
    redis_client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    config = {"domain_mappings": {"up": {"upstream": upstream.url}}, "logging": {"enable_console": False},
              "throttling": {"domain_limits": {"up": 3}, "progressive_max_delay": 1}}
    app = create_app(config, redis_client=redis_client, environ={})
    yield app, redis_client
    app.extensions["buddy"].shutdown()


def test_each_miss_reserves_one_start_a_hit_none_and_a_refusal_none(limited_app, upstream: UpstreamStub) -> None:
    app, redis_client = limited_app
    client = app.test_client()
    for n in range(3):
        assert client.get(f"/up/item/{n}").headers["X-Cache"] == "MISS"
    assert client.get("/up/item/0").headers["X-Cache"] == "HIT"
    assert redis_client.zcard(RedisKeys().rate_starts("up")) == 3
    refused = client.get("/up/item/new")
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert refused.get_json()["error"] == "rate limited"
    assert redis_client.zcard(RedisKeys().rate_starts("up")) == 3  # the refusal consumed no slot
    assert upstream.count("/item/") == 3
    assert not redis_client.keys("buddy:lock:*")  # the refused leader let its lock go


def test_a_leader_that_finds_the_entry_stored_serves_it_without_a_reservation(limited_app,
                                                                               upstream: UpstreamStub) -> None:
    """The race the fold must keep: a miss that takes the lock just after the previous leader stored the entry."""
    app, redis_client = limited_app
    client = app.test_client()
    assert client.get("/up/raced").headers["X-Cache"] == "MISS"
    service = app.extensions["buddy"].service
    looked_up = service.lookup
    missed = []

    def stale_first_look(request, primary):  # the first look misses, as if the entry were stored just after it
        if not missed:
            missed.append(primary)
            return type(looked_up(request, primary))(primary, primary, None)
        return looked_up(request, primary)

    service.lookup = stale_first_look
    try:
        again = client.get("/up/raced")
    finally:
        service.lookup = looked_up
    assert missed and again.status_code == 200 and again.headers["X-Cache"] == "HIT"
    assert upstream.count("/raced") == 1
    assert redis_client.zcard(RedisKeys().rate_starts("up")) == 1


def test_the_store_lets_go_of_the_leader_s_lock_in_the_same_call_and_never_of_a_successor_s(any_redis) -> None:
    from buddy.messages import ProxyResult
    from buddy.store.response_cache import ResponseCache

    cache = ResponseCache(any_redis, StoreGuard(), KEYS)
    lock = FillLock(any_redis, StoreGuard(), KEYS)
    pubsub = any_redis.pubsub()
    pubsub.subscribe(KEYS.fill_channel)
    entry = ProxyResult(200, "OK", [("Content-Type", "application/json")], b"{}", stored_at=1.0)
    assert lock.acquire(ENTRY, "leader", 10_000) == (True, "leader")
    assert cache.put(ENTRY, entry, 60, release=(KEYS.lock(ENTRY), "leader")) is True
    assert any_redis.get(KEYS.lock(ENTRY)) is None and any_redis.get(KEYS.cache(ENTRY.domain, ENTRY.digest))
    heard = [m for m in iter(lambda: pubsub.get_message(timeout=0.5), None) if m["type"] == "message"]
    assert [m["data"] for m in heard] == [f"{ENTRY.domain}\n{ENTRY.digest}".encode()]  # one wake-up, not two

    assert lock.acquire(ENTRY, "successor", 10_000) == (True, "successor")  # the first leader's lock expired
    assert cache.put(ENTRY, entry, 60, release=(KEYS.lock(ENTRY), "leader")) is False
    assert any_redis.get(KEYS.lock(ENTRY)) == b"successor"
    pubsub.close()
