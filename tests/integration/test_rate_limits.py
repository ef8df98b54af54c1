"""Rate limits across real gunicorn instances on one Redis, judged by the upstream stub's own start times."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import requests

from buddy.store.rate_limiter import GUARD_MS
from tests.support.upstream_stub import UpstreamStub


def config_for(upstream: UpstreamStub, max_delay: float = 300, **limits) -> dict:
    return {"domain_mappings": {"up": {"upstream": upstream.url, **limits}},
            "throttling": {"progressive_max_delay": max_delay}}


def most_starts_in_any(window: float, starts: list[float]) -> int:
    starts = sorted(starts)
    return max((sum(1 for t in starts[i:] if t - s < window) for i, s in enumerate(starts)), default=0)


def fire(urls: list[str]) -> list[requests.Response]:
    with ThreadPoolExecutor(max_workers=len(urls)) as pool:
        return list(pool.map(lambda url: requests.get(url, timeout=60, headers={"Connection": "close"}), urls))


def settled_throttling(url: str, refused: int, timeout: float = 15.0) -> dict:
    """The mapping's throttling counters once `refused` refusals have landed (workers flush once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = requests.get(f"{url}/admin/metrics", timeout=10).json()["throttling"]["up"]
        if stats["violations"] >= refused or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


def test_four_per_second_holds_across_two_instances(gunicorn, redis_url, upstream) -> None:
    config = config_for(upstream, max_requests_per_second=4)
    first = gunicorn(config, env={"REDIS_URL": redis_url}, workers=4)
    second = gunicorn(config, env={"REDIS_URL": redis_url}, workers=2)
    responses = fire([f"{(first, second)[i % 2].url}/up/item/{i}" for i in range(20)])
    assert [r.status_code for r in responses] == [200] * 20
    # Every verdict from the upstream's own start times and the limiter's own numbers, never the client's clock.
    starts = sorted(seen.started for seen in upstream.log)
    assert len(starts) == 20
    assert most_starts_in_any(1.0, starts) <= 4
    window = 1 + GUARD_MS / 1000
    assert starts[-1] - starts[0] >= 4.0  # paced: 20 at 4 a second take 4 s at least (the line above implies it)
    delayed = [float(r.headers["X-Throttle-Delay"]) for r in responses if "X-Throttle-Delay" in r.headers]
    assert len(delayed) >= 16 and max(delayed) <= 4 * window  # held, and never longer than the windows need
    # Not held past the slots: a time bound, so a generous one (twice the 4.4 s the slots span; a proxy that
    # slept its delay twice, or let each request wait for the one before it, takes 8.8 s or far longer).
    assert starts[-1] - starts[0] < 2 * 4 * window, [round(t - starts[0], 3) for t in starts]


def test_a_slot_further_off_than_the_max_delay_is_refused_at_once(gunicorn, redis_url, upstream) -> None:
    proxy = gunicorn(config_for(upstream, max_delay=2, max_requests_per_minute=3), env={"REDIS_URL": redis_url})
    responses = fire([f"{proxy.url}/up/term/{i}" for i in range(6)])
    refused = [r for r in responses if r.status_code == 429]
    assert sorted(r.status_code for r in responses) == [200, 200, 200, 429, 429, 429]
    assert upstream.count() == 3
    for response in refused:
        assert "X-Throttle-Delay" not in response.headers
        assert 55 <= int(response.headers["Retry-After"]) <= 61
        assert response.headers["X-RateLimit-Limit"] == "3" and response.headers["X-RateLimit-Remaining"] == "0"
        assert response.json()["error"] == "rate limited" and response.json()["domain"] == "up"
    # At once, not after holding them for the 2 s max delay: judged by what the proxy counted (a request it held
    # for a slot counts as delayed), not by how long the answers took on a busy machine.
    stats = settled_throttling(proxy.url, refused=3)
    assert (stats["violations"], stats["delayed_requests"]) == (3, 0), stats


def test_upstream_retry_after_pauses_every_worker_of_every_instance(gunicorn, redis_url, upstream) -> None:
    first = gunicorn(config_for(upstream), env={"REDIS_URL": redis_url})
    second = gunicorn(config_for(upstream), env={"REDIS_URL": redis_url})
    told = requests.get(f"{first.url}/up/status/429?retry_after=3", timeout=10)
    assert told.status_code == 429
    paused_at = upstream.log[0].started
    responses = fire([f"{(first, second)[i % 2].url}/up/after/{i}" for i in range(6)])
    assert [r.status_code for r in responses] == [200] * 6
    later = [seen.started for seen in upstream.log[1:]]
    assert len(later) == 6 and min(later) >= paused_at + 2.9  # the pause began after the 429 left the upstream
    # Each was held, and for no more than the pause: how much less depends on when it reached the proxy.
    assert all(0 < float(r.headers["X-Throttle-Delay"]) <= 3.1 for r in responses)


def test_hits_on_a_saturated_domain_are_not_held(gunicorn, redis_url, upstream) -> None:
    proxy = gunicorn(config_for(upstream, max_requests_per_second=1), env={"REDIS_URL": redis_url}, workers=2)
    assert requests.get(f"{proxy.url}/up/warm", timeout=10).headers["X-Cache"] == "MISS"
    with ThreadPoolExecutor(max_workers=6) as pool:
        misses = [pool.submit(requests.get, f"{proxy.url}/up/cold/{i}", timeout=30) for i in range(5)]
        time.sleep(0.3)  # the misses now hold reservations up to ~5 s out
        hits = [requests.get(f"{proxy.url}/up/warm", timeout=10) for _ in range(5)]
        pending = sum(not m.done() for m in misses)
        assert all(h.headers["X-Cache"] == "HIT" and "X-Throttle-Delay" not in h.headers for h in hits)
        assert pending >= 3  # the hits came back while the throttled misses were still waiting
        assert [m.result().status_code for m in misses] == [200] * 5
    assert upstream.count() == 6


def test_without_redis_each_worker_keeps_its_share_of_the_limit(gunicorn, tmp_path, upstream) -> None:
    from tests.support.processes import RedisServer

    private = RedisServer(tmp_path)
    proxy = gunicorn(config_for(upstream, max_requests_per_second=4), env={"REDIS_URL": private.url}, workers=2)
    private.stop()
    responses = fire([f"{proxy.url}/up/offline/{i}" for i in range(12)])
    assert [r.status_code for r in responses] == [200] * 12
    assert {r.headers["X-Cache"] for r in responses} == {"BYPASS"}
    assert most_starts_in_any(1.0, [seen.started for seen in upstream.log]) <= 4
    assert "Redis unavailable" in proxy.log()


def test_an_upstreams_429_pauses_only_the_credentials_that_got_it(gunicorn, redis_url, upstream) -> None:
    """A search or LLM API limits each key: one tenant's exhausted key must not pause the team. Without
    credentials, a 429 is about the proxy's address: it pauses the whole mapping."""
    proxy = gunicorn({"domain_mappings": {"llm": {"upstream": upstream.url}},
                      "throttling": {"progressive_max_delay": 5}}, env={"REDIS_URL": redis_url}, workers=2)
    tenant_a, tenant_b = {"Authorization": "Bearer key-of-a"}, {"Authorization": "Bearer key-of-b"}
    pushed_back = requests.get(f"{proxy.url}/llm/status/429?retry_after=120", headers=tenant_a, timeout=10)
    assert pushed_back.status_code == 429 and upstream.count("/status/429") == 1
    for i in range(3):  # another key, another URL: straight through to the upstream
        answer = requests.get(f"{proxy.url}/llm/b/{i}", headers=tenant_b, timeout=10)
        assert answer.status_code == 200 and answer.headers["X-Cache"] == "MISS"
    assert upstream.count("/b/") == 3
    paused = requests.get(f"{proxy.url}/llm/a/again", headers=tenant_a, timeout=10)
    assert paused.status_code == 429 and paused.json()["error"] == "rate limited" and upstream.count("/a/") == 0
    anonymous = requests.get(f"{proxy.url}/llm/status/429?retry_after=120&anon=1", timeout=10)
    assert anonymous.status_code == 429  # from the upstream, to a request with no credentials: everyone waits
    assert requests.get(f"{proxy.url}/llm/b/after", headers=tenant_b, timeout=10).status_code == 429
    assert upstream.count("/b/after") == 0


def test_per_credential_limits_give_each_key_its_own_windows(gunicorn, redis_url, upstream) -> None:
    config = {"domain_mappings": {
        "shared": {"upstream": upstream.url, "max_requests_per_second": 1},
        "own": {"upstream": upstream.url, "max_requests_per_second": 1, "rate_limit_per_credential": True}}}
    proxy = gunicorn(config, env={"REDIS_URL": redis_url}, workers=2)
    keys = [{"X-API-Key": "key-of-a"}, {"X-API-Key": "key-of-b"}]
    for mapping, held in (("own", 0), ("shared", 1)):
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda i: requests.get(f"{proxy.url}/{mapping}/x/{i}", headers=keys[i],
                                                           timeout=20), range(2)))
        assert [a.status_code for a in answers] == [200, 200]
        # Two keys at once: each in its own second with per-credential limits; one waits for the other without.
        assert sum("X-Throttle-Delay" in a.headers for a in answers) == held, mapping
