"""The cache across real gunicorn workers and instances, measured from the upstream stub's own log.

Tests on a real redis-server that need no settings of their own share one proxy of three workers (`proxy`):
`/up/` with the default TTL and `/short/` with a 1 s one, on an emptied Redis with an emptied upstream log."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from buddy.embedded import EmbeddedRedis
from tests.support.processes import ROOT, Gunicorn, RedisServer
from tests.support.upstream_stub import UpstreamStub


def config_for(upstream: UpstreamStub, **domain: object) -> dict:
    return {"domain_mappings": {"up": {"upstream": upstream.url, **domain}}}


# Under pytest-xdist the module runs on one worker, so that its shared proxy starts once.
pytestmark = pytest.mark.xdist_group("gunicorn-cache-proxy")


@pytest.fixture(scope="module")
def shared(module_gunicorn, redis_server: RedisServer, stub: UpstreamStub) -> Gunicorn:
    config = {"domain_mappings": {"up": {"upstream": stub.url}, "short": {"upstream": stub.url, "ttl_seconds": 1}}}
    return module_gunicorn(config, env={"REDIS_URL": redis_server.url}, workers=3)


@pytest.fixture
def upstream(stub: UpstreamStub) -> UpstreamStub:
    """This module's stub, shared by its tests (and the upstream of the shared proxy), log emptied."""
    stub.clear()
    return stub


def get(url: str, **kwargs) -> requests.Response:
    # A new connection per call, so that calls spread over the workers.
    return requests.get(url, timeout=10, headers={"Connection": "close", **kwargs.pop("headers", {})}, **kwargs)


def test_miss_then_hits_across_workers_reach_upstream_once(proxy, upstream) -> None:
    responses = [get(f"{proxy.url}/up/c/en/dog?limit=2") for _ in range(12)]
    assert [r.headers["X-Cache"] for r in responses] == ["MISS"] + ["HIT"] * 11
    assert len({r.content for r in responses}) == 1
    assert upstream.paths() == ["/c/en/dog?limit=2"]


def test_two_instances_on_one_redis_are_one_cache(proxy, gunicorn, redis_url, upstream) -> None:
    first = proxy
    second = gunicorn(config_for(upstream), env={"REDIS_URL": redis_url})
    assert get(f"{first.url}/up/shared").headers["X-Cache"] == "MISS"
    assert get(f"{second.url}/up/shared").headers["X-Cache"] == "HIT"
    assert upstream.count() == 1


def test_an_entry_past_its_ttl_is_fetched_again(proxy, upstream) -> None:
    # POST bodies, uncached errors and cookies are tested once, on the Flask app (tests/unit/test_proxy_flow.py).
    # Redis keeps an expired entry for the stale grace (tests/integration/test_freshness.py); a request after the
    # TTL goes upstream again.
    get(f"{proxy.url}/short/expiring")
    assert get(f"{proxy.url}/short/expiring").headers["X-Cache"] == "HIT"
    time.sleep(1.3)
    assert get(f"{proxy.url}/short/expiring").headers["X-Cache"] == "MISS"
    assert upstream.count() == 2


def test_embedded_redis_keeps_the_cache_across_restarts(gunicorn, tmp_path: Path, upstream) -> None:
    data_dir = tmp_path / "data"
    env = {"BUDDY_DATA_DIR": str(data_dir)}
    proxy = gunicorn(config_for(upstream), env=env)
    assert get(f"{proxy.url}/up/persisted").headers["X-Cache"] == "MISS"
    assert get(f"{proxy.url}/up/persisted").headers["X-Cache"] == "HIT"
    proxy.stop()
    embedded = EmbeddedRedis(data_dir)
    assert not embedded.alive(), "gunicorn left its embedded redis-server running"
    assert (data_dir / "appendonlydir").exists() or (data_dir / "appendonly.aof").exists()

    again = gunicorn(config_for(upstream), env=env)
    response = get(f"{again.url}/up/persisted")
    assert response.headers["X-Cache"] == "HIT"
    assert upstream.count() == 1


def test_instances_sharing_a_data_folder_keep_redis_until_the_last_one_leaves(gunicorn, tmp_path, upstream) -> None:
    env = {"BUDDY_DATA_DIR": str(tmp_path / "shared")}
    first, second = gunicorn(config_for(upstream), env=env), gunicorn(config_for(upstream), env=env)
    assert get(f"{first.url}/up/shared").headers["X-Cache"] == "MISS"
    first.stop()
    assert get(f"{second.url}/up/shared").headers["X-Cache"] == "HIT"
    second.stop()
    assert not EmbeddedRedis(tmp_path / "shared").alive()


def test_crafted_targets_never_reach_another_local_server(proxy, upstream) -> None:
    bystander = UpstreamStub()
    try:
        host = f"127.0.0.1:{bystander.port}"
        targets = [
            f"/up//{host}/x", f"/up/@{host}/x", f"/up/%2f%2f{host}/x", f"/up/..%2f..%2f{host}",
            f"/up/%5c%5c{host}/x", f"/up/x/../../{host}", f"http://{host}/up/x", f"//{host}/x",
            f"/up/x?url=http://{host}/", f"/up/%40{host}",
        ]
        statuses = [raw_request(proxy.port, target) for target in targets]
        assert bystander.count() == 0
        assert all(status in (200, 400, 404) for status in statuses), statuses
        assert all(seen.headers["host"] == f"127.0.0.1:{upstream.port}" for seen in upstream.log)
    finally:
        bystander.stop()


def raw_request(port: int, target: str) -> int:
    """Send a request line exactly as written (no client-side normalisation) and return the status code."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        head = sock.recv(65536).split(b"\r\n", 1)[0]
    return int(head.split()[1])


def test_invalid_config_refuses_to_start_naming_every_field(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[domain_mappings.wikidata]\nupstream = "https://www.wikidata.org"\nttl_seconds = -1\n'
                      '[domain_mappings.admin]\nupstream = "https://a.example"\n[cache]\ndefault_ttl = 5\n')
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0", "wsgi:app"],
        cwd=ROOT, env={"PATH": "/usr/bin:/bin", "BUDDY_CONFIG": str(config), "HOME": str(tmp_path)},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "domain_mappings.wikidata.ttl_seconds: must be a positive integer" in result.stderr
    assert "domain_mappings.admin: 'admin' is reserved for the proxy's own routes" in result.stderr
    assert "cache.default_ttl: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


def test_redis_going_away_degrades_to_bypass_and_recovers(gunicorn, tmp_path: Path, upstream) -> None:
    private = RedisServer(tmp_path)
    proxy = gunicorn(config_for(upstream), env={"REDIS_URL": private.url})
    try:
        assert get(f"{proxy.url}/up/a").headers["X-Cache"] == "MISS"
        private.stop()
        degraded = [get(f"{proxy.url}/up/a") for _ in range(4)]
        assert [r.status_code for r in degraded] == [200] * 4
        assert {r.headers["X-Cache"] for r in degraded} == {"BYPASS"}
        private = RedisServer(tmp_path, port=private.port)  # empty: the old one saved nothing
        time.sleep(1.2)  # the pause before a failed Redis is tried again
        states = [get(f"{proxy.url}/up/a").headers["X-Cache"] for _ in range(6)]
        assert states[-2:] == ["HIT", "HIT"] and "MISS" in states
    finally:
        private.stop()
    assert "Traceback" not in proxy.log()
    assert proxy.process.poll() is None


def test_a_hung_redis_is_given_up_on_after_the_short_command_timeout_not_socket_timeout(gunicorn, tmp_path: Path,
                                                                                        upstream) -> None:
    """redis.socket_timeout (10 s here) is for blocking reads; a GET to a Redis that hangs (SIGSTOP: it accepts
    connections and never answers) gives up after the command timeout, so even the first requests after the hang, in
    every worker at once, are answered (without the cache) well before a client's 5 s timeout."""
    private = RedisServer(tmp_path)
    proxy = gunicorn({**config_for(upstream), "redis": {"socket_timeout": 10}}, env={"REDIS_URL": private.url},
                     workers=2)
    try:
        assert get(f"{proxy.url}/up/before").headers["X-Cache"] == "MISS"
        os.kill(private.process.pid, signal.SIGSTOP)
        try:
            with ThreadPoolExecutor(8) as pool:  # misses on new connections: every worker's first look is at Redis
                answers = list(pool.map(lambda i: requests.get(f"{proxy.url}/up/hung/{i}", timeout=5,
                                                               headers={"Connection": "close"}), range(8)))
        finally:
            os.kill(private.process.pid, signal.SIGCONT)
        assert [(a.status_code, a.headers["X-Cache"]) for a in answers] == [(200, "BYPASS")] * 8
    finally:
        private.stop()
