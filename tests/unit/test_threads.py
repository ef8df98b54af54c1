"""The background threads of the answering process, as /admin/health shows them: every kind, each alive, idle
(not needed yet), dead or stopped, and a dead one degrades health until it is needed again."""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import fakeredis
import pytest
from flask import Flask
from flask.testing import FlaskClient

from buddy import create_app
from tests.support.threads import kill, started_since
from tests.support.upstream_stub import UpstreamStub

KINDS = {"wakeup", "redis_probe", "metrics", "lock_keeper", "upstream_watchdog", "refreshers", "key_failures",
         "malloc_trim"}


def states(client: FlaskClient) -> dict[str, str]:
    return {kind: shown["state"] for kind, shown in client.get("/admin/health").json["threads"].items()}


def eventually(check: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def app(before: set[threading.Thread], upstream: UpstreamStub) -> Iterator[Flask]:
    """An app whose entries answer stale, while one refresh runs, for 60 s past their 1 s TTL."""
    config = {"domain_mappings": {"up": {"upstream": upstream.url, "read_timeout": 5, "ttl_seconds": 1,
                                         "stale_while_revalidate_seconds": 60}},
              "logging": {"enable_console": False}}
    app = create_app(config, redis_client=fakeredis.FakeRedis(server=fakeredis.FakeServer()), environ={})
    yield app
    app.extensions["buddy"].shutdown()


@pytest.fixture
def before() -> set[threading.Thread]:
    """The threads that ran before the test's app was made."""
    return set(threading.enumerate())


def test_health_lists_every_kind_of_thread_alive_only_once_it_is_needed(
    before: set[threading.Thread], app: Flask, upstream: UpstreamStub
) -> None:
    client = app.test_client()
    health = client.get("/admin/health")
    assert health.status_code == 200 and health.json["status"] == "ok"
    assert health.json["pid"] == os.getpid()
    assert set(health.json["threads"]) == KINDS
    # The subscriber and the flusher start with the app; the others when first needed: idle is no failure.
    assert states(client) == {"wakeup": "alive", "metrics": "alive", "redis_probe": "idle", "lock_keeper": "idle",
                              "upstream_watchdog": "idle", "refreshers": "idle", "key_failures": "idle",
                              "malloc_trim": "idle"}  # (that one runs in gunicorn workers only)
    assert client.get("/up/r?sleep=1000").headers["X-Cache"] == "MISS"
    assert states(client)["lock_keeper"] == "alive" and states(client)["upstream_watchdog"] == "alive"
    time.sleep(1.1)
    assert client.get("/up/r?sleep=1000").headers["X-Cache"] == "STALE"  # and a refresh runs, for 1 s
    refreshers = client.get("/admin/health").json["threads"]["refreshers"]
    assert refreshers["state"] == "alive" and refreshers["running"] == 1 and refreshers["limit"] == 8
    assert eventually(lambda: upstream.count("/r") == 2 and states(client)["refreshers"] == "idle")
    # Every background thread the app started is one that health names.
    shown = {shown["name"] for shown in client.get("/admin/health").json["threads"].values()}
    ours = {t.name for t in threading.enumerate() if t.name.startswith("buddy-")}
    assert {name for name in ours if started_since(before, name)} <= shown
    app.extensions["buddy"].shutdown()
    after = client.get("/admin/health").json
    apps = {kind: state for kind, state in states(client).items() if kind != "malloc_trim"}  # that is the process's
    assert after["status"] == "degraded" and set(apps.values()) == {"stopped"}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the SystemExit it died of
def test_a_dead_thread_degrades_health_until_it_is_needed_again(
    before: set[threading.Thread], app: Flask, upstream: UpstreamStub
) -> None:
    client = app.test_client()
    (subscriber,) = started_since(before, "buddy-wakeup")
    kill(subscriber)
    health = client.get("/admin/health")
    assert health.status_code == 503 and health.json["status"] == "degraded"
    assert health.json["threads"]["wakeup"] == {"name": "buddy-wakeup", "state": "dead", "restarts": 0,
                                                "error": "SystemExit"}
    assert f"background threads of process {os.getpid()} not running: wakeup (buddy-wakeup) is dead" in \
        health.json["reason"]
    assert client.get("/up/a").status_code == 200  # requests are still answered
    # A request that waits for another's fetch needs the subscriber: it starts again.
    with ThreadPoolExecutor(2) as pool:
        leader = pool.submit(client.get, "/up/b?sleep=1500")
        assert eventually(lambda: upstream.count("/b") == 1)
        follower = pool.submit(app.test_client().get, "/up/b?sleep=1500")
        assert {leader.result().headers["X-Cache"], follower.result().headers["X-Cache"]} == {"MISS", "COALESCED"}
    health = client.get("/admin/health")
    assert health.status_code == 200
    assert health.json["threads"]["wakeup"] == {"name": "buddy-wakeup", "state": "alive", "restarts": 1}
