"""A worker gives back the memory of large answers: after 10 MB bodies its RSS comes back near where it started.

One real gunicorn worker answers 20 requests for 10 MB bodies, four at a time: 8 misses (stored in Redis), the same
8 again (hits, read back from Redis) and 4 over-size ones (streamed through, not stored). Each body must arrive
whole; then the worker's RSS must come back within MARGIN_MB of what it was before, within SETTLE_SECONDS. Under
glibc's own allocator settings the worker kept 80 MB or more for good (`python bench/memory.py` measures both in
full); the margin is wide enough for what a worker legitimately keeps (its threads, connections, caches), and the
wait is one for memory to be given back, never a measure of speed.
"""
from __future__ import annotations

import hashlib
import random
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import requests

from tests.support.processes import RedisServer
from tests.support.upstream_stub import UpstreamStub

MB = 1_000_000
SIZE = 10 * MB  # under cache.max_cache_response_size (10 MiB): stored
OVER = 12 * MB  # over it: streamed, never stored
MARGIN_MB = 40
SETTLE_SECONDS = 15.0


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def digest_of_noise(size: int) -> str:
    """What the stub's /noise/<size> sends, hashed."""
    return hashlib.sha256(random.Random(size).randbytes(size)).hexdigest()


def fetch(url: str) -> tuple[str, int, str]:
    """(X-Cache, length, sha256) of a body read in pieces, as a client that does not hold it whole would."""
    digest, length = hashlib.sha256(), 0
    with requests.get(url, stream=True, timeout=120) as response:
        assert response.status_code == 200
        for chunk in response.iter_content(256 * 1024):
            digest.update(chunk)
            length += len(chunk)
        return response.headers["X-Cache"], length, digest.hexdigest()


def test_a_worker_gives_back_the_memory_of_ten_megabyte_answers(gunicorn, redis_server: RedisServer,
                                                                upstream: UpstreamStub) -> None:
    proxy = gunicorn({"domain_mappings": {"up": {"upstream": upstream.url}},
                      "throttling": {"default_requests_per_hour": 100_000}}, env={"REDIS_URL": redis_server.url},
                     workers=1)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: requests.get(f"{proxy.url}/up/warm/{i}", timeout=30), range(20)))  # threads up
        (worker,) = [child for child in psutil.Process(proxy.process.pid).children() if "gunicorn" in child.cmdline()]
        before = rss_mb(worker.pid)
        stored = [f"{proxy.url}/up/noise/{SIZE}/{i}" for i in range(8)]
        misses = list(pool.map(fetch, stored))
        hits = list(pool.map(fetch, stored))
        over = list(pool.map(fetch, [f"{proxy.url}/up/noise/{OVER}/{i}" for i in range(4)]))
    whole, whole_over = (SIZE, digest_of_noise(SIZE)), (OVER, digest_of_noise(OVER))
    assert [(cache, (n, h)) for cache, n, h in misses] == [("MISS", whole)] * 8
    assert [(cache, (n, h)) for cache, n, h in hits] == [("HIT", whole)] * 8
    assert [(cache, (n, h)) for cache, n, h in over] == [("MISS", whole_over)] * 4
    deadline = time.monotonic() + SETTLE_SECONDS
    while (after := rss_mb(worker.pid)) > before + MARGIN_MB and time.monotonic() < deadline:
        time.sleep(0.5)
    assert after <= before + MARGIN_MB, (
        f"after 20 answers of 10-12 MB the worker holds {after:.0f} MB, {after - before:.0f} MB more than its "
        f"{before:.0f} MB before them"
    )
