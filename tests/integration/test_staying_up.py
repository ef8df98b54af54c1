"""Issue 10: a shared proxy that stays up. Real gunicorn workers on a real redis-server; verdicts from the
upstream's own log, the bytes and timings the clients saw, and what Redis holds afterwards."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from tests.support.raw_upstream import RawRequest, RawUpstream, head


def trickler(close: bool):
    def trickle(request: RawRequest, count: int):
        """90 bytes, one every 0.2 s: each read well inside the read timeout, the whole far past a total one."""
        yield head(headers=[("Content-Type", "text/plain"), ("Content-Length", "90")], close=close)
        for _ in range(90):
            yield b"x"
            yield 0.2

    return trickle


@pytest.mark.parametrize("close", [True, False], ids=["connection-close", "keep-alive"])
def test_an_upstream_that_trickles_is_cut_at_the_total_timeout_and_nothing_is_stored(
    gunicorn, redis_url, close
) -> None:
    raw = RawUpstream({"/trickle": trickler(close)})
    try:
        mapping: dict[str, Any] = {"upstream": raw.url, "read_timeout": 1, "total_timeout": 1.5}
        proxy = gunicorn({"domain_mappings": {"up": mapping}}, env={"REDIS_URL": redis_url})
        started = time.monotonic()
        first = requests.get(f"{proxy.url}/up/trickle", timeout=15)
        took = time.monotonic() - started
        assert first.status_code == 504 and first.json()["error"] == "upstream timeout"
        assert "total_timeout" in first.json()["message"]
        # Time is the feature: a deadline on the whole call. It cannot fire before total_timeout (the call began after
        # `started`); the upper bound is generous, over 6 times the 1.5 s expected (90 bytes at 5 a second take 18 s).
        assert 1.5 <= took < 10, took
        second = requests.get(f"{proxy.url}/up/trickle", timeout=15)
        assert second.status_code == 504 and second.headers["X-Cache"] == "MISS"
        assert raw.count("/trickle") == 2  # the first answer was not stored
    finally:
        raw.stop()


def test_throttled_misses_cannot_take_the_threads_hits_need_and_give_up_when_their_client_does(
    gunicorn, redis_url, upstream
) -> None:
    # One worker of 8 threads: at most 8 // 2 = 4 requests may wait for this mapping's slots.
    config = {"domain_mappings": {"up": {"upstream": upstream.url, "max_requests_per_second": 1}},
              "throttling": {"progressive_max_delay": 60}}
    proxy = gunicorn(config, env={"REDIS_URL": redis_url}, workers=1, extra_args=("--threads", "8"))
    assert requests.get(f"{proxy.url}/up/hit", timeout=5).status_code == 200  # stored; takes this second's slot

    def impatient(i: int) -> int | str:
        try:
            return requests.get(f"{proxy.url}/up/miss-{i}", timeout=0.4).status_code
        except requests.exceptions.ReadTimeout:
            return "hung up"

    with ThreadPoolExecutor(max_workers=30) as pool:
        misses = [pool.submit(impatient, i) for i in range(20)]
        time.sleep(0.1)
        hits = [pool.submit(requests.get, f"{proxy.url}/up/hit", timeout=1) for _ in range(10)]
        outcomes = [m.result() for m in misses]
        assert [h.result().headers["X-Cache"] for h in hits] == ["HIT"] * 10
    assert outcomes.count("hung up") <= 4 and outcomes.count(429) >= 16  # four slept; the rest were refused
    time.sleep(1.5)  # past the slots the sleepers had reserved
    assert upstream.count("/miss-") == 0  # they gave up with their clients, before their slots came
    after = requests.get(f"{proxy.url}/up/after", timeout=5)
    assert after.status_code == 200
    # Their slots went back: the next request waits for nobody's abandoned reservation.
    assert float(after.headers.get("X-Throttle-Delay", "0")) < 0.5


def test_after_a_mixed_workload_every_key_is_declared_and_none_lives_forever_unless_bounded(
    gunicorn, redis_server, redis_url, upstream
) -> None:
    import os
    import signal

    import psutil

    from buddy.counters import declared
    from buddy.redis_keys import KEY_KINDS, RedisKeys

    config = {"domain_mappings": {"up": {"upstream": upstream.url, "read_timeout": 5},
                                  "slow": {"upstream": upstream.url, "max_requests_per_second": 1}},
              "cache": {"max_cache_response_size": 65536}, "throttling": {"progressive_max_delay": 1}}
    proxy = gunicorn(config, env={"REDIS_URL": redis_url}, workers=2)
    base = f"{proxy.url}/up"
    with ThreadPoolExecutor(max_workers=16) as pool:
        for _ in range(2):  # misses, then hits
            list(pool.map(lambda i: requests.get(f"{base}/item/{i}", timeout=10), range(5)))
        list(pool.map(lambda _: requests.get(f"{base}/together?sleep=300", timeout=10), range(6)))  # coalesced
        list(pool.map(lambda _: requests.get(f"{base}/big/300000?sleep=300", timeout=10), range(4)))  # relayed
        list(pool.map(lambda _: requests.get(f"{base}/status/503?sleep=200", timeout=10), range(4)))  # shared error
        list(pool.map(lambda i: requests.get(f"{base}/tenant?h=Vary:X-Tenant", headers={"X-Tenant": str(i % 2)},
                                             timeout=10), range(4)))  # vary pointer and variants
        list(pool.map(lambda i: requests.get(f"{proxy.url}/slow/t/{i}", timeout=10), range(6)))  # throttled
        # A leader killed mid-fetch: its waiters take over.
        doomed = pool.submit(requests.get, f"{base}/doomed?sleep=1500", timeout=10)
        while upstream.count("/doomed") == 0:
            time.sleep(0.02)
        waiters = [pool.submit(requests.get, f"{base}/doomed?sleep=1500", timeout=20) for _ in range(3)]
        time.sleep(0.2)
        for worker in psutil.Process(proxy.process.pid).children():
            os.kill(worker.pid, signal.SIGKILL)
        for future in [doomed, *waiters]:
            future.exception()
    time.sleep(1.5)  # let every worker flush its counters
    client, keys = redis_server.client(), RedisKeys("buddy:")
    kinds = {kind.name: kind for kind in KEY_KINDS}
    seen = set()
    for key in client.scan_iter(count=1000):
        name = key.decode()
        kind = keys.kind(name)
        assert kind in kinds, f"undeclared key {name}"
        seen.add(kind)
        ttl = client.pttl(key)
        if kinds[kind].expires:
            assert ttl > 0, f"{name} should expire but has no TTL"
        if kind == "stats":
            fields = [f.decode() for f in client.hkeys(key)]
            assert all(declared(f) for f in fields), fields
    assert {"cache", "stats", "rate", "workers"} <= seen


def test_identical_misses_waiting_on_a_throttled_leader_all_wait_without_taking_the_threads_hits_need(
    gunicorn, redis_url, upstream
) -> None:
    # One worker of 8 threads. The followers are parked (a socket each, no thread): none is refused (issue 22.15).
    config = {"domain_mappings": {"up": {"upstream": upstream.url},
                                  "slow": {"upstream": upstream.url, "max_requests_per_minute": 1}},
              "throttling": {"progressive_max_delay": 120}}
    proxy = gunicorn(config, env={"REDIS_URL": redis_url}, workers=1, extra_args=("--threads", "8"))
    assert requests.get(f"{proxy.url}/up/hit", timeout=5).status_code == 200
    assert requests.get(f"{proxy.url}/slow/first", timeout=5).status_code == 200  # this minute's one slot
    # The next identical miss leads and sleeps a minute for its slot; the others wait on it.

    def identical() -> int | str:
        try:
            return requests.get(f"{proxy.url}/slow/same", timeout=3).status_code
        except requests.exceptions.ReadTimeout:
            return "waited"

    with ThreadPoolExecutor(max_workers=30) as pool:
        waiting = [pool.submit(identical) for _ in range(20)]
        time.sleep(0.5)
        hits = [pool.submit(requests.get, f"{proxy.url}/up/hit", timeout=1) for _ in range(10)]
        assert [h.result().headers["X-Cache"] for h in hits] == ["HIT"] * 10
        outcomes = [w.result() for w in waiting]
    assert outcomes == ["waited"] * 20  # still waiting on the leader when their clients gave up, none refused
    assert upstream.count("/same") == 0
