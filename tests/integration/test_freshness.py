"""Issue 12: when the upstream is down, slow, or the user says so. One gunicorn (two workers) on a real
redis-server for the module; every verdict comes from the upstream stub's own log and the bytes the client got.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import pytest
import requests

from tests.support.processes import ROOT, Gunicorn, RedisServer
from tests.support.upstream_stub import Seen, UpstreamStub, _Handler

pytestmark = pytest.mark.xdist_group("freshness")  # one proxy for the module, on one xdist worker


class Flaky(UpstreamStub):
    """The counting stub, which a test can make fail (`failing`: "503" or "drop") or hold its answers until
    `release` is set (`holding`)."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = ""
        self.holding = False
        self.release = threading.Event()

    def respond(self, handler: _Handler, seen: Seen, count: int) -> None:
        if self.holding:
            self.release.wait(30)
        if self.failing:
            time.sleep(0.3)  # long enough for concurrent requests to coalesce on the failing call
        if self.failing == "503":
            handler.send_response(503)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
        elif self.failing == "drop":
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
        else:
            super().respond(handler, seen, count)


@pytest.fixture(scope="module")
def flaky() -> Iterator[Flaky]:
    stub = Flaky()
    yield stub
    stub.stop()


@pytest.fixture(scope="module")
def proxy(flaky: Flaky, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    def up(**extra: Any) -> dict[str, Any]:
        return {"upstream": flaky.url, "connect_timeout": 1, "read_timeout": 2, "ttl_seconds": 1, **extra}

    config = {
        "domain_mappings": {
            "up": up(),  # stale-if-error for the default 7 days
            "swr": up(stale_while_revalidate_seconds=60),
            "strict": up(stale_if_error_seconds=0),
            "metered": up(stale_while_revalidate_seconds=60),  # for the metrics test alone
            "long": up(ttl_seconds=3600),
        },
        "redis": {"prefix": "fresh:"},
    }
    instance = Gunicorn(tmp_path_factory.mktemp("freshness"), config, {"REDIS_URL": redis_server.url})
    instance.wait_until_serving("/admin/health")
    yield instance
    instance.stop()


@pytest.fixture(autouse=True)
def healthy(flaky: Flaky) -> Iterator[None]:
    flaky.failing, flaky.holding = "", False
    flaky.release.clear()
    yield
    flaky.failing, flaky.holding = "", False
    flaky.release.set()


def get(proxy: Gunicorn, path: str, headers: dict[str, str] | None = None) -> requests.Response:
    return requests.get(proxy.url + path, headers={"Connection": "close", **(headers or {})}, timeout=15)


def calls(flaky: Flaky, path: str) -> int:
    return sum(1 for seen in flaky.log if seen.path == path)


def expire() -> None:
    time.sleep(1.1)  # every mapping here keeps entries fresh for 1 s


def eventually(check: Callable[[], Any], seconds: float = 10.0) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


@pytest.mark.parametrize("failure", ["503", "drop"])
def test_an_expired_entry_answers_for_an_upstream_that_fails(proxy: Gunicorn, flaky: Flaky, failure: str) -> None:
    path = f"/sie-{failure}"
    first = get(proxy, "/up" + path)
    assert first.headers["X-Cache"] == "MISS"
    expire()
    flaky.failing = failure
    with ThreadPoolExecutor(5) as pool:  # concurrent requests coalesce on one failing call, and all stand in
        answers = list(pool.map(lambda _: get(proxy, "/up" + path), range(5)))
    assert [(a.status_code, a.headers["X-Cache"]) for a in answers] == [(200, "STALE")] * 5
    assert all(a.content == first.content for a in answers)
    assert all(int(a.headers["Age"]) >= 1 for a in answers)
    # The first fetch, then one failed call for all five. A drop on a kept-alive connection looks like an idle close
    # (closed before any answer), so that GET is sent once more, on a new connection; whether the leader's worker
    # had such a connection depends on which worker made the first fetch.
    failed_calls = calls(flaky, path) - 1
    assert failed_calls in ({1} if failure == "503" else {1, 2})
    flaky.failing = ""
    # A 503 paused the mapping for a second (backoff): meanwhile the expired entry answers at once, with no call.
    again = eventually(lambda: (answer := get(proxy, "/up" + path)).headers["X-Cache"] == "MISS" and answer)
    assert again and again.content != first.content and calls(flaky, path) == 2 + failed_calls
    assert get(proxy, "/up" + path).headers["X-Cache"] == "HIT"


def test_no_stale_answer_past_the_window_or_against_must_revalidate(proxy: Gunicorn, flaky: Flaky) -> None:
    assert get(proxy, "/strict/sie-off").status_code == 200
    assert get(proxy, "/up/sie-must?h=Cache-Control:must-revalidate").status_code == 200
    expire()
    flaky.failing = "503"
    assert get(proxy, "/strict/sie-off").status_code == 503  # stale_if_error_seconds = 0
    assert get(proxy, "/up/sie-must?h=Cache-Control:must-revalidate").status_code == 503


def test_inside_the_revalidate_window_everyone_gets_the_old_entry_at_once_and_one_refresh_runs(
    proxy: Gunicorn, flaky: Flaky
) -> None:
    path = "/swr-hot"
    first = get(proxy, "/swr" + path)
    expire()
    flaky.holding = True  # the refresh cannot finish until the test lets it: every answer below came before it
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: get(proxy, "/swr" + path), range(10)))
    assert [(a.status_code, a.headers["X-Cache"]) for a in answers] == [(200, "STALE")] * 10
    assert all(a.content == first.content for a in answers)
    assert eventually(lambda: calls(flaky, path) == 2)  # the first fetch and exactly one refresh, still held
    flaky.release.set()
    refreshed = eventually(lambda: get(proxy, "/swr" + path).headers["X-Cache"] == "HIT")
    assert refreshed and calls(flaky, path) == 2
    fresh = get(proxy, "/swr" + path)
    assert fresh.headers["X-Cache"] == "HIT" and fresh.content != first.content


def test_a_failed_refresh_leaves_the_old_entry(proxy: Gunicorn, flaky: Flaky) -> None:
    first = get(proxy, "/swr/swr-failing")
    expire()
    flaky.failing = "503"
    assert get(proxy, "/swr/swr-failing").headers["X-Cache"] == "STALE"
    assert eventually(lambda: calls(flaky, "/swr-failing") == 2)
    time.sleep(0.5)  # the refresh's 503 has come back by now
    again = get(proxy, "/swr/swr-failing")
    assert again.headers["X-Cache"] == "STALE" and again.content == first.content


def test_only_if_cached_never_goes_upstream(proxy: Gunicorn, flaky: Flaky) -> None:
    miss = get(proxy, "/up/oic", {"Cache-Control": "only-if-cached"})
    assert miss.status_code == 504 and miss.json()["error"] == "not cached" and calls(flaky, "/oic") == 0
    stored = get(proxy, "/up/oic")
    hit = get(proxy, "/up/oic", {"Cache-Control": "only-if-cached"})
    assert hit.headers["X-Cache"] == "HIT" and hit.content == stored.content and calls(flaky, "/oic") == 1


@pytest.mark.parametrize("header", [{"Cache-Control": "no-cache"}, {"Pragma": "no-cache"},
                                    {"Cache-Control": "max-age=0"}])
def test_no_cache_fetches_now_and_stores_the_new_answer(proxy: Gunicorn, flaky: Flaky, header: dict[str, str]) -> None:
    path = "/nc-" + "-".join(header).lower() + "-" + "-".join(header.values()).replace("=", "")
    old = get(proxy, "/up" + path)
    time.sleep(0.01)
    refetched = get(proxy, "/up" + path, header)
    assert refetched.headers["X-Cache"] == "MISS" and refetched.content != old.content
    hit = get(proxy, "/up" + path)
    assert hit.headers["X-Cache"] == "HIT" and hit.content == refetched.content and calls(flaky, path) == 2


def test_no_store_answers_without_storing(proxy: Gunicorn, flaky: Flaky) -> None:
    assert get(proxy, "/up/ns-store", {"Cache-Control": "no-store"}).headers["X-Cache"] == "MISS"
    assert get(proxy, "/up/ns-store").headers["X-Cache"] == "MISS"
    assert get(proxy, "/up/ns-store").headers["X-Cache"] == "HIT" and calls(flaky, "/ns-store") == 2


def test_max_stale_takes_an_expired_entry_and_min_fresh_refuses_an_old_one(proxy: Gunicorn, flaky: Flaky) -> None:
    first = get(proxy, "/up/max-stale")
    assert get(proxy, "/up/max-stale", {"Cache-Control": "min-fresh=5"}).headers["X-Cache"] == "MISS"
    expire()
    stale = get(proxy, "/up/max-stale", {"Cache-Control": "max-stale=3600"})
    assert stale.headers["X-Cache"] == "STALE" and calls(flaky, "/max-stale") == 2
    assert stale.content != first.content  # the min-fresh request stored a newer answer


def test_namespaces_partition_the_cache_and_never_reach_the_upstream(proxy: Gunicorn, flaky: Flaky) -> None:
    bodies = {}
    for namespace in ("exp-a", "exp-b", ""):
        headers = {"X-Buddy-Namespace": namespace} if namespace else {}
        bodies[namespace] = get(proxy, "/up/shared-question", headers).content
        assert get(proxy, "/up/shared-question", headers).content == bodies[namespace]
    assert len(set(bodies.values())) == 3 and calls(flaky, "/shared-question") == 3
    assert all("x-buddy-namespace" not in seen.headers for seen in flaky.log)
    cleared = requests.delete(proxy.url + "/admin/cache/up?namespace=exp-a", timeout=10).json()
    assert cleared["cleared"] == 1
    assert get(proxy, "/up/shared-question", {"X-Buddy-Namespace": "exp-a"}).headers["X-Cache"] == "MISS"
    assert get(proxy, "/up/shared-question", {"X-Buddy-Namespace": "exp-b"}).headers["X-Cache"] == "HIT"
    assert get(proxy, "/up/shared-question").headers["X-Cache"] == "HIT"
    bad = get(proxy, "/up/shared-question", {"X-Buddy-Namespace": "../etc"})
    assert bad.status_code == 400 and "X-Buddy-Namespace" in bad.json()["message"]


def flask_buddy(proxy: Gunicorn, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flask", "buddy", *args], cwd=ROOT, env=proxy.env,
                          capture_output=True, text=True, timeout=60)


def test_offline_mode_sends_nothing_upstream_on_every_worker(proxy: Gunicorn, flaky: Flaky) -> None:
    get(proxy, "/long/off-cached")
    get(proxy, "/up/off-expired")
    expire()
    before = len(flaky.log)
    switched = flask_buddy(proxy, "offline", "on")
    assert switched.returncode == 0 and "offline mode is on" in switched.stdout
    try:
        time.sleep(1.1)  # every worker reads the switch at least once a second
        answers = [get(proxy, path) for path in ["/long/off-cached", "/up/off-expired", "/up/off-new"] * 4]
        assert [a.headers["X-Cache"] for a in answers[:3]] == ["HIT", "STALE", "OFFLINE"]
        assert answers[2].json()["error"] == "offline" and answers[2].status_code == 504
        assert [a.status_code for a in answers] == [200, 200, 504] * 4  # whichever worker answered
        assert len(flaky.log) == before  # not one request reached the upstream
        assert requests.get(proxy.url + "/admin/health", timeout=10).json()["offline"] is True
    finally:
        assert flask_buddy(proxy, "offline", "reset").returncode == 0
    time.sleep(1.1)
    assert get(proxy, "/up/off-new").status_code == 200 and calls(flaky, "/off-new") == 1


def test_metrics_count_stale_answers_refreshes_and_refusals(proxy: Gunicorn, flaky: Flaky) -> None:
    get(proxy, "/metered/m")
    assert get(proxy, "/metered/m-miss", {"Cache-Control": "only-if-cached"}).status_code == 504
    expire()
    assert get(proxy, "/metered/m").headers["X-Cache"] == "STALE"  # and one background refresh
    assert eventually(lambda: calls(flaky, "/m") == 2)
    expire()
    flaky.failing = "503"
    assert get(proxy, "/metered/m", {"Cache-Control": "max-age=0"}).status_code == 503  # picky: no stand-in
    assert get(proxy, "/metered/m").headers["X-Cache"] == "STALE"  # a refresh that fails

    def counted() -> dict[str, Any]:
        return requests.get(proxy.url + "/admin/metrics", timeout=10).json()["cache"]["by_domain"]["metered"]

    metered = eventually(lambda: (c := counted())["background_refresh_failures"] == 1 and c)
    assert metered["stale_answers"] == 2 and metered["background_refreshes"] == 2
    assert metered["only_if_cached_misses"] == 1 and metered["stale_if_error"] == 0
    text = requests.get(proxy.url + "/metrics", timeout=10).text
    assert 'buddy_stale_answers_total{domain="metered"} 2.0' in text
    assert 'buddy_background_refreshes_total{domain="metered"} 2.0' in text
    assert 'buddy_only_if_cached_misses_total{domain="metered"} 1.0' in text
