"""A full Redis. Real gunicorn workers fill a 2 MB Redis twice over with 2 KB JSON answers;
old entries must make room for new ones, hits keep hitting, identical misses still make one upstream call, the
counts match what Redis holds, and health says why when Redis refuses writes."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest
import redis
import requests

from buddy.embedded import EmbeddedRedis
from tests.support.processes import Gunicorn, RedisServer
from tests.support.upstream_stub import UpstreamStub, conceptnet_json

HOT = [f"/up/c/en/hot{i}" for i in range(20)]
UNLIMITED = {"default_requests_per_hour": 10_000_000}
COLD_BATCH = 100


class JsonUpstream(UpstreamStub):
    """Answers every path with its 2 KB of JSON; paths under /slow/ take a second."""

    def respond(self, handler, seen, count) -> None:  # type: ignore[override]
        if seen.path.startswith("/slow/"):
            time.sleep(1.0)
        body = conceptnet_json(seen.path, seen.path)
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)


@pytest.fixture
def json_upstream() -> Iterator[JsonUpstream]:
    stub = JsonUpstream()
    yield stub
    stub.stop()


@pytest.fixture
def full_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of our own, so that its memory settings change nothing for the session's shared one."""
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisServer(workdir)
    yield server
    server.stop()


def fill(proxy: Gunicorn, cold: int) -> tuple[list[str], list[str]]:
    """`cold` distinct misses, 8 at a time, and the hot set after every 100 of them -> (hot X-Cache, cold X-Cache)."""
    hot_seen: list[str] = []
    cold_seen: list[str] = []
    local = threading.local()

    def get(path: str) -> str:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        response = local.session.get(proxy.url + path, timeout=30)
        assert response.status_code == 200, response.text
        return response.headers["X-Cache"]

    with ThreadPoolExecutor(8) as pool:
        for start in range(0, cold, COLD_BATCH):
            cold_seen += pool.map(get, [f"/up/c/en/cold{i}" for i in range(start, start + COLD_BATCH)])
            hot_seen += pool.map(get, HOT)
    return hot_seen, cold_seen


def cache_census(client: redis.Redis) -> tuple[int, int]:
    """What Redis really holds for the mapping: (responses, the memory they take). MEMORY USAGE, unlike STRLEN,
    leaves the keys' LRU clocks alone, so counting does not change what gets evicted next."""
    keys = set(client.scan_iter(match="buddy:cache:{up}:*", count=1000))
    sizes = [client.memory_usage(k) or 0 for k in keys]
    return sum(1 for s in sizes if s), sum(sizes)


def check_full_but_working(proxy: Gunicorn, client: redis.Redis, upstream: JsonUpstream) -> None:
    """Fill 2 MB several times over; then every promise of a cache that is full but working."""
    hot, cold = fill(proxy, 2000)
    info = client.info()
    assert info["evicted_keys"] > 600  # the fill went well past maxmemory, about twice over
    assert set(cold) == {"MISS"}  # every miss took the lock and was stored, none bypassed the cache
    late = hot[len(hot) // 2:]
    assert late.count("HIT") / len(late) >= 0.9, late  # old entries made room; the hot ones stayed
    entries, _ = cache_census(client)
    # Full of entries, not of bookkeeping: of the ~1.1 MB an empty 2 MB Redis has room for, the workers'
    # connections take ~0.2 MB and the hour's rate-limit window ~0.2 MB; each response takes ~0.9 KB. About 500
    # fit; on a loaded machine the connections' buffers take more (seen: 246). Crowded out, there would be none.
    assert entries >= 150
    assert info["used_memory"] < 1.2 * info["maxmemory"]

    fresh = "/up/c/en/fresh"
    assert [requests.get(proxy.url + fresh, timeout=30).headers["X-Cache"] for _ in range(2)] == ["MISS", "HIT"]
    with ThreadPoolExecutor(8) as pool:
        shared = list(pool.map(lambda _: requests.get(proxy.url + "/up/slow/one", timeout=30), range(8)))
    assert upstream.count("/slow/one") == 1, [(r.headers["X-Cache"], r.status_code) for r in shared]
    assert sorted(r.headers["X-Cache"] for r in shared) == ["COALESCED"] * 7 + ["MISS"]

    report = requests.get(proxy.url + "/admin/metrics", timeout=30).json()["cache"]
    entries, size = cache_census(client)
    assert report["entries_per_domain"]["up"] == pytest.approx(entries, rel=0.03)
    assert report["cache_size_per_domain"]["up"] == pytest.approx(size, rel=0.03)
    health = requests.get(proxy.url + "/admin/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["warnings"] == []


def test_the_embedded_default_is_capped_and_evicts_least_recently_used_entries(gunicorn, tmp_path: Path,
                                                                              json_upstream) -> None:
    """The embedded redis-server gets the configured cap and the policy under which a full Redis stays a cache
    (volatile-lru); how the proxy behaves on such a Redis once full is the next test's, on a server of its own."""
    config = {"domain_mappings": {"up": {"upstream": json_upstream.url}}, "redis": {"maxmemory": "2mb"}}
    data = tmp_path / "data"
    proxy = gunicorn(config, env={"BUDDY_DATA_DIR": str(data)}, workers=1)
    client = redis.Redis(unix_socket_path=str(EmbeddedRedis(data).socket_path))
    assert client.config_get("maxmemory") == {"maxmemory": str(2 * 1024 * 1024)}
    assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "volatile-lru"
    health = requests.get(proxy.url + "/admin/health", timeout=10).json()
    assert health["status"] == "ok" and health["warnings"] == []  # nothing to warn an operator about
    client.close()


def test_an_external_redis_when_full_and_when_it_refuses_writes(gunicorn, full_redis, json_upstream) -> None:
    client = full_redis.client()
    client.config_set("maxmemory", "2mb")
    client.config_set("maxmemory-policy", "volatile-lru")
    config = {"domain_mappings": {"up": {"upstream": json_upstream.url}}, "throttling": UNLIMITED}
    proxy = gunicorn(config, env={"REDIS_URL": full_redis.url})
    check_full_but_working(proxy, client, json_upstream)

    client.config_set("maxmemory-policy", "noeviction")  # an operator's mistake: full, and nothing may go
    with requests.Session() as session:
        for i in range(1500):  # until memory (client buffers come and go) is past maxmemory for good
            if session.get(f"{proxy.url}/up/c/en/late{i}", timeout=30).headers["X-Cache"] == "BYPASS":
                break  # Redis refused the lock or the entry: served, but uncached and uncoalesced
        else:
            pytest.fail("a noeviction Redis at maxmemory took 1,500 more entries")
    health = requests.get(proxy.url + "/admin/health", timeout=10)
    assert health.status_code == 503 and health.json()["status"] == "degraded"
    assert "Redis is full" in health.json()["reason"] and "noeviction" in health.json()["reason"]
    assert "noeviction" in health.json()["warnings"][0]

    client.config_set("maxmemory-policy", "volatile-lru")  # fixed: room is made again, at once
    assert [requests.get(f"{proxy.url}/up/c/en/later", timeout=30).headers["X-Cache"] for _ in range(2)] == [
        "MISS", "HIT"]
    deadline = time.monotonic() + 20  # a worker that met a refusal lately says so for a while
    while (health := requests.get(proxy.url + "/admin/health", timeout=10)).status_code != 200:
        assert time.monotonic() < deadline, health.json()
        time.sleep(0.2)
    assert health.json()["status"] == "ok"
    left = cache_census(client)[0]
    evicted = client.info("stats")["evicted_keys"]
    cleared = requests.delete(proxy.url + "/admin/cache/up", timeout=30).json()["cleared"]
    # The clear's own SCAN replies take memory in a full Redis, which evicts a few entries as it goes.
    assert cleared + client.info("stats")["evicted_keys"] - evicted >= 0.95 * left
    assert cache_census(client)[0] == 0  # every entry, with no index to go by


def test_start_up_warns_about_a_redis_without_maxmemory(gunicorn, redis_url, json_upstream) -> None:
    """The session's redis-server has no maxmemory, like a stock Redis: the log and health say what to set."""
    proxy = gunicorn({"domain_mappings": {"up": {"upstream": json_upstream.url}}}, env={"REDIS_URL": redis_url})
    health = requests.get(proxy.url + "/admin/health", timeout=10).json()
    assert health["status"] == "ok" and "Redis has no maxmemory" in health["warnings"][0]
    deadline = time.monotonic() + 10
    while "Redis has no maxmemory" not in proxy.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    line = next(line for line in proxy.log().splitlines() if "Redis has no maxmemory" in line)
    assert "WARNING" in line and "maxmemory-policy volatile-lru" in line and redis_url.split("/")[2] in line
