"""Each worker's in-memory L1, across real gunicorn workers on a real Redis: whatever worker answers, a refresh,
a `clear-cache` run from another process, or Redis going away is seen by all of them."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.support.processes import ROOT, RedisServer
from tests.support.upstream_stub import UpstreamStub

WORKERS = 4
SPREAD = 24  # requests on new connections: each goes to whichever worker accepts it first


def spread(url: str, headers: dict[str, str] | None = None) -> list[requests.Response]:
    """SPREAD requests at once, each on its own connection, so that every worker answers some."""
    def one(_: int) -> requests.Response:
        return requests.get(url, timeout=10, headers={"Connection": "close", **(headers or {})})

    with ThreadPoolExecutor(SPREAD) as pool:
        return list(pool.map(one, range(SPREAD)))


def counts(responses: list[requests.Response]) -> set[int]:
    return {json.loads(r.content)["n"] for r in responses}


def warm(url: str) -> None:
    """Read the entry often enough that every worker keeps a copy (a copy is kept on its second read)."""
    for _ in range(4):
        assert {r.headers["X-Cache"] for r in spread(url)} == {"HIT"}


def test_a_refresh_and_a_clear_from_another_process_reach_every_worker_s_copy(gunicorn, redis_url,
                                                                             upstream: UpstreamStub) -> None:
    proxy = gunicorn({"domain_mappings": {"up": {"upstream": upstream.url}}}, env={"REDIS_URL": redis_url},
                     workers=WORKERS)
    url = f"{proxy.url}/up/hot"
    assert requests.get(url, timeout=10).headers["X-Cache"] == "MISS"
    warm(url)
    assert counts(spread(url)) == {1}

    refreshed = requests.get(url, timeout=10, headers={"Cache-Control": "no-cache"})
    assert json.loads(refreshed.content)["n"] == 2
    time.sleep(0.5)  # the bound is 100 ms (bench/hits.py measures it); this is correctness, not speed
    assert counts(spread(url)) == {2}, "a worker kept serving its copy of the entry the refresh replaced"

    warm(url)
    cleared = subprocess.run([sys.executable, "-m", "flask", "buddy", "clear-cache", "up"], cwd=ROOT, env=proxy.env,
                             capture_output=True, text=True, timeout=60)
    assert cleared.returncode == 0, cleared.stderr
    time.sleep(0.5)
    assert counts(spread(url)) == {3} and upstream.count("/hot") == 3  # one fetch after the clear, no old copy


def test_with_redis_gone_no_worker_answers_from_its_memory(gunicorn, upstream: UpstreamStub,
                                                          tmp_path) -> None:
    own = RedisServer(tmp_path)  # this test kills it
    try:
        proxy = gunicorn({"domain_mappings": {"up": {"upstream": upstream.url}}}, env={"REDIS_URL": own.url},
                         workers=WORKERS)
        url = f"{proxy.url}/up/hot"
        requests.get(url, timeout=10)
        warm(url)
        own.stop()  # a store or clear could now go unheard: the copies must not be trusted
        time.sleep(0.5)
        assert {r.headers["X-Cache"] for r in spread(url)} == {"BYPASS"}
    finally:
        own.stop()


def test_with_redis_hung_no_worker_answers_from_its_memory_for_long(gunicorn, upstream: UpstreamStub,
                                                                    tmp_path) -> None:
    own = RedisServer(tmp_path)  # SIGSTOPped: no connection ends, nothing is answered, not even the subscription
    try:
        proxy = gunicorn({"domain_mappings": {"up": {"upstream": upstream.url}}, "redis": {"socket_timeout": 0.5}},
                         env={"REDIS_URL": own.url}, workers=WORKERS)
        url = f"{proxy.url}/up/hot"
        requests.get(url, timeout=10)
        warm(url)
        os.kill(own.process.pid, signal.SIGSTOP)
        try:
            time.sleep(2.0)  # wakeup.TRUSTED_SECONDS: a subscription silent for longer is not relied on
            seen = {r.headers["X-Cache"] for r in spread(url)}
        finally:
            os.kill(own.process.pid, signal.SIGCONT)
        assert seen == {"BYPASS"}
        deadline = time.monotonic() + 15  # each worker finds Redis back by itself (its guard's next probe)
        while (seen := {r.headers["X-Cache"] for r in spread(url)}) != {"HIT"} and time.monotonic() < deadline:
            time.sleep(0.2)
        assert seen == {"HIT"}
    finally:
        own.stop()
