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
def test_an_upstream_that_trickles_is_cut_at_the_total_timeout_and_nothing_is_stored(gunicorn, redis_url, close) -> None:
    raw = RawUpstream({"/trickle": trickler(close)})
    try:
        mapping: dict[str, Any] = {"upstream": raw.url, "read_timeout": 1, "total_timeout": 1.5}
        proxy = gunicorn({"domain_mappings": {"up": mapping}}, env={"REDIS_URL": redis_url})
        started = time.monotonic()
        first = requests.get(f"{proxy.url}/up/trickle", timeout=15)
        took = time.monotonic() - started
        assert first.status_code == 504 and first.json()["error"] == "upstream timeout"
        assert "total_timeout" in first.json()["message"]
        assert took < 10  # 90 bytes at 5 a second would take 18 s
        second = requests.get(f"{proxy.url}/up/trickle", timeout=15)
        assert second.status_code == 504 and second.headers["X-Cache"] == "MISS"
        assert raw.count("/trickle") == 2  # the first answer was not stored
    finally:
        raw.stop()


def test_throttled_misses_cannot_take_the_threads_hits_need_and_give_up_when_their_client_does(
    gunicorn, redis_url, upstream
) -> None:
    # One worker of 8 threads: at most 8 // 4 = 2 requests may sleep for this mapping's slots.
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
    assert outcomes.count("hung up") <= 2 and outcomes.count(429) >= 18  # two slept; the rest were refused
    time.sleep(1.5)  # past the slots the sleepers had reserved
    assert upstream.count("/miss-") == 0  # they gave up with their clients, before their slots came
    after = requests.get(f"{proxy.url}/up/after", timeout=5)
    assert after.status_code == 200
    # Their slots went back: the next request waits for nobody's abandoned reservation.
    assert float(after.headers.get("X-Throttle-Delay", "0")) < 0.5
