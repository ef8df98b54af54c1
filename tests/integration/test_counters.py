"""Every kind of upstream outcome, sent by a real upstream through real gunicorn workers, is read by every operator
surface: /admin/metrics, /metrics, the dashboard (page and panel) and `flask buddy stats`. (Once, a malformed status
line made each of them but /metrics answer 500 for good.)"""
from __future__ import annotations

import subprocess
import sys
import time
from typing import Any, Iterator

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from buddy import counters
from buddy.redis_keys import RedisKeys
from tests.support.processes import ROOT, Gunicorn, RedisServer, SharedProxy
from tests.support.raw_upstream import RESET, RawRequest, RawUpstream, head

# How a raw upstream produces each failure kind that buddy.counters declares (the path under /raw/) ...
FAILURES = {
    "timeout": [head("200 OK", [("Content-Length", "2")]), 60.0, b"ok"],  # the proxy waits 2 s (read_timeout)
    "unreachable": [RESET],  # a reset before any answer
    "malformed": [head("700 Out Of Range", [("Content-Length", "0")])],
}
# ... and HTTP statuses, errors or not. 429 and 503 pause a mapping (progressive throttling): each has its own.
STATUSES = {"200": "/raw/200", "404": "/raw/404", "500": "/raw/500", "429": "/pushed/429", "503": "/paused/503"}


def answer(request: RawRequest, count: int) -> list[Any]:
    name = request.path.rsplit("/", 1)[-1]
    if name in FAILURES:
        return FAILURES[name]
    return [head(f"{name} Whatever", [("Content-Length", "2")]), b"{}"]


@pytest.fixture(scope="module")
def raw() -> Iterator[RawUpstream]:
    upstream = RawUpstream({"/": answer})
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def shared(module_gunicorn, redis_server: RedisServer, raw: RawUpstream) -> Gunicorn:
    mapping = {"upstream": raw.url, "connect_timeout": 2, "read_timeout": 2}
    config = {"domain_mappings": {"raw": mapping, "pushed": mapping, "paused": mapping}}
    return module_gunicorn(config, env={"REDIS_URL": redis_server.url})


@pytest.fixture
def proxy(shared: Gunicorn, redis_url: str, raw: RawUpstream) -> SharedProxy:
    raw.clear()
    return SharedProxy(shared)


def counted(redis_server: RedisServer, expected: dict[str, set[str]], timeout: float = 20.0) -> None:
    """Wait until every process has flushed a count for each outcome expected per mapping."""
    client, deadline = redis_server.client(), time.monotonic() + timeout
    while True:
        found = {name: {f.decode().split(":", 1)[1] for f in client.hkeys(RedisKeys("buddy:").stats(name))
                        if f.startswith(b"status:")} for name in expected}
        if all(found[name] >= outcomes for name, outcomes in expected.items()):
            return
        assert time.monotonic() < deadline, f"counted so far: {found}"
        time.sleep(0.1)


def test_every_upstream_outcome_is_read_by_every_surface(proxy, raw, redis_server) -> None:
    assert set(FAILURES) == set(counters.FAILURES), "a declared failure kind this test does not produce"
    for path in [*(f"/raw/{kind}" for kind in FAILURES), *STATUSES.values()]:
        requests.get(proxy.url + path, timeout=10)
    by_mapping: dict[str, set[str]] = {"raw": set(FAILURES)}
    for status, path in STATUSES.items():
        by_mapping.setdefault(path.split("/")[1], set()).add(status)
    counted(redis_server, by_mapping)

    metrics = requests.get(f"{proxy.url}/admin/metrics", timeout=10)
    assert metrics.status_code == 200, metrics.text
    upstream = metrics.json()["upstream"]
    assert upstream["by_domain"]["raw"]["errors_by_status"] == {"404": 1, "500": 1, **{kind: 1 for kind in FAILURES}}
    assert upstream["overall"]["total_requests"] == len(FAILURES) + len(STATUSES)
    failed = len(FAILURES) + 3  # and 429, 500, 503; not 200 nor 404
    assert upstream["overall"]["error_rate"] == round(failed / (len(FAILURES) + len(STATUSES)), 4)

    prometheus = requests.get(f"{proxy.url}/metrics", timeout=10)
    assert prometheus.status_code == 200, prometheus.text
    samples = {(s.name, s.labels.get("domain"), s.labels.get("status")): s.value
               for family in text_string_to_metric_families(prometheus.text) for s in family.samples}
    for kind in FAILURES:
        assert samples[("buddy_upstream_responses_total", "raw", kind)] == 1, kind
    for status, path in STATUSES.items():
        assert samples[("buddy_upstream_responses_total", path.split("/")[1], status)] == 1, status

    for page in ("/admin/", "/admin/panel"):
        shown = requests.get(proxy.url + page, timeout=10)
        assert shown.status_code == 200, (page, shown.text)
        assert 'data-mapping="raw"' in shown.text
        for kind in FAILURES:  # among the recent upstream errors
            assert f"<td>{kind}</td>" in shown.text, kind

    stats = subprocess.run([sys.executable, "-m", "flask", "buddy", "stats"], cwd=ROOT, env=proxy.env,
                           capture_output=True, text=True, timeout=60)
    assert stats.returncode == 0, stats.stderr
    rows = {line.split()[0]: line.split() for line in stats.stdout.splitlines()[1:4]}
    assert {name: row[5] for name, row in rows.items()} == {"raw": str(len(FAILURES) + 3), "pushed": "1",
                                                           "paused": "1"}  # upstream calls
    assert f"in all: 0 hits · {len(FAILURES) + len(STATUSES)} misses · 0 coalesced" in stats.stdout
