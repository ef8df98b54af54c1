"""Issue 10: a shared proxy that stays up. Real gunicorn workers on a real redis-server; verdicts from the
upstream's own log, the bytes and timings the clients saw, and what Redis holds afterwards."""
from __future__ import annotations

import time
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
