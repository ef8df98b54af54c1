"""The Fetcher on its own (buddy/fetcher.py): one request's upstream call within the mapping's rate limits, what a
refusal, a wait, a failure and the upstream's push-back do, seen from the stub's log, Redis and the counters."""
from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Iterator

import fakeredis
import pytest
from flask import Flask

from buddy import create_app, policy
from buddy.errors import ClientGone
from buddy.fetcher import Fetcher
from buddy.messages import ProxyRequest
from buddy.redis_keys import RedisKeys
from buddy.store.rate_limiter import Decision
from tests.support.ports import free_port
from tests.support.upstream_stub import UpstreamStub

KEYS = RedisKeys("buddy:")


@pytest.fixture
def buddy_config(upstream: UpstreamStub) -> dict[str, Any]:
    mapping = {"upstream": upstream.url, "connect_timeout": 1, "read_timeout": 1}
    return {"domain_mappings": {"up": mapping, "down": {**mapping, "upstream": f"http://127.0.0.1:{free_port()}"}},
            "logging": {"enable_console": False}}


@pytest.fixture
def app(buddy_config: dict[str, Any], fake_redis: fakeredis.FakeRedis) -> Iterator[Flask]:
    app = create_app(buddy_config, redis_client=fake_redis, environ={})
    yield app
    app.extensions["buddy"].shutdown()


@pytest.fixture
def fetcher(app: Flask) -> Fetcher:
    return app.extensions["buddy"].service.fetcher


def request_for(app: Flask, path: str, domain: str = "up", method: str = "GET", **forwarded: str) -> ProxyRequest:
    mapping = app.extensions["buddy"].settings.domains[domain]
    path, _, query = path.partition("?")
    return ProxyRequest(mapping, method, path, query, list(forwarded.items()), b"", dict(forwarded))


def counted(app: Flask, fake_redis: fakeredis.FakeRedis, domain: str = "up") -> dict[str, int]:
    app.extensions["buddy"].service.metrics.flush()
    return {k.decode(): int(v) for k, v in fake_redis.hgetall(KEYS.stats(domain)).items()}


def reserved_starts(fake_redis: fakeredis.FakeRedis) -> int:
    return fake_redis.zcard(KEYS.rate_starts("up"))


def test_a_call_fetches_once_and_counts_the_upstreams_answer(app: Flask, fetcher: Fetcher, upstream: UpstreamStub,
                                                              fake_redis) -> None:
    result = fetcher.call(request_for(app, "/c/en/dog?limit=5"))
    assert result.status == 200 and upstream.paths() == ["/c/en/dog?limit=5"]
    assert "X-Throttle-Delay" not in dict(result.extra)
    seen = counted(app, fake_redis)
    assert (seen["upstream_requests"], seen["status:200"]) == (1, 1)


def test_a_head_miss_fetches_the_get_that_will_serve_both(app: Flask, fetcher: Fetcher, upstream: UpstreamStub) -> None:
    fetcher.call(request_for(app, "/thing", method="HEAD"))
    assert [seen.method for seen in upstream.log] == ["GET"]


def test_validators_are_sent_without_becoming_part_of_the_request(app: Flask, fetcher: Fetcher,
                                                                  upstream: UpstreamStub) -> None:
    request = request_for(app, "/thing", Accept="application/json")
    fetcher.call(request, conditional=(("If-None-Match", '"v1"'),))
    sent = {name.lower(): value for name, value in upstream.log[0].raw_headers}
    assert (sent["if-none-match"], sent["accept"]) == ('"v1"', "application/json")
    assert "If-None-Match" not in request.forwarded


def test_a_refused_slot_is_a_429_without_an_upstream_call(app: Flask, fetcher: Fetcher, upstream: UpstreamStub,
                                                           fake_redis) -> None:
    refused = Decision(accepted=False, delay=42.0, limit=10, window=60.0)
    result = fetcher.call(request_for(app, "/thing"), reserved=refused)
    assert result.status == 429 and result.header("Retry-After") == "42"
    assert upstream.count() == 0 and counted(app, fake_redis)["throttle_refused"] == 1


def test_a_client_that_leaves_while_waiting_for_its_slot_gives_the_slot_back(
    app: Flask, fetcher: Fetcher, upstream: UpstreamStub, fake_redis
) -> None:
    request = request_for(app, "/thing")
    decision = fetcher.limiter.acquire(request.domain)  # a real reservation in Redis, as lead.lua makes one
    assert decision.accepted and reserved_starts(fake_redis) == 1
    gone = replace(request, client_gone=lambda: True)
    with pytest.raises(ClientGone):
        fetcher.call(gone, reserved=decision._replace(delay=30.0))
    assert upstream.count() == 0 and reserved_starts(fake_redis) == 0
    assert counted(app, fake_redis)["client_gone"] == 1
    assert fetcher.waiting.waiting("up") == 0  # it no longer holds a place among the requests that wait


def test_a_full_waiting_room_refuses_at_once_and_gives_the_slot_back(app: Flask, fetcher: Fetcher,
                                                                      upstream: UpstreamStub, fake_redis) -> None:
    request = request_for(app, "/thing")
    while fetcher.waiting.enter("up"):  # every place to wait in this process is taken
        pass
    decision = fetcher.limiter.acquire(request.domain)
    result = fetcher.call(request, reserved=decision._replace(delay=30.0))
    assert result.status == 429 and upstream.count() == 0 and reserved_starts(fake_redis) == 0


def test_an_upstream_that_cannot_be_reached_is_a_502_naming_the_mapping(app: Flask, fetcher: Fetcher,
                                                                         fake_redis) -> None:
    result = fetcher.call(request_for(app, "/thing?api_key=secret", domain="down"))
    assert result.status == 502 and json.loads(result.body or b"")["domain"] == "down"
    assert b"secret" not in (result.body or b"")
    seen = counted(app, fake_redis, "down")
    assert seen["upstream_requests"] == 1 and sum(v for k, v in seen.items() if k.startswith("status:")) == 1


def test_an_upstreams_429_pauses_the_credentials_that_got_it_and_success_resets(app: Flask, fetcher: Fetcher,
                                                                                 upstream: UpstreamStub) -> None:
    alice = request_for(app, "/status/429?retry_after=30", Authorization="Bearer alice")
    bob = request_for(app, "/thing", Authorization="Bearer bob")
    anonymous = request_for(app, "/thing")
    assert fetcher.call(alice).status == 429
    assert fetcher.paused(alice) and not fetcher.paused(bob) and not fetcher.paused(anonymous)
    assert 25 < fetcher.limiter.paused(alice.domain, policy.partition(alice)) <= 30
    # Without credentials, the upstream's push-back is the whole mapping's.
    assert fetcher.call(request_for(app, "/status/503?retry_after=20")).status == 503
    assert fetcher.paused(bob) and fetcher.paused(anonymous)


def test_a_pause_longer_than_the_max_delay_is_refused_without_a_call(app: Flask, fetcher: Fetcher,
                                                                      upstream: UpstreamStub) -> None:
    fetcher.call(request_for(app, "/status/503?retry_after=3600"))
    upstream.clear()
    result = fetcher.call(request_for(app, "/thing"))
    assert result.status == 429 and int(result.header("Retry-After")) > 60 and upstream.count() == 0


def test_switched_offline_while_waiting_for_a_slot_answers_offline_and_gives_the_slot_back(
    app: Flask, fetcher: Fetcher, upstream: UpstreamStub, fake_redis
) -> None:
    def operator_switches_offline() -> bool:  # asked while the request sleeps for its slot
        fetcher.offline.set(True)
        return False

    request = replace(request_for(app, "/thing"), client_gone=operator_switches_offline)
    decision = fetcher.limiter.acquire(request.domain)
    result = fetcher.call(request, reserved=decision._replace(delay=0.01))
    assert result.status == 504 and upstream.count() == 0 and reserved_starts(fake_redis) == 0
