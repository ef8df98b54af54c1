"""The hit path (buddy.fastpath) beyond what tests/unit/test_hit_path_agrees.py proves (that it answers every request
as the view does, and only fresh hits itself): it refuses quietly and admits by a request's own bytes, shows its own
failures, keeps its memory bounded; and the L1 copies it serves from never outlive a store, a clear or a refresh, in
this worker or another one on the same Redis."""
from __future__ import annotations

import copy
import io
import json
import logging
import sys
import time
from typing import Any, Iterator

import fakeredis
import pytest
from flask import Flask
from flask.testing import FlaskClient

from buddy import create_app
from tests.support.upstream_stub import UpstreamStub


class Counted:
    """The Flask app behind the hit path, counting what reaches it."""

    def __init__(self, app: Flask) -> None:
        self.wrapped = app.wsgi_app.wrapped  # type: ignore[attr-defined]
        self.calls = 0
        app.wsgi_app.wrapped = self  # type: ignore[attr-defined]

    def __call__(self, environ: dict, start_response: Any) -> Any:
        self.calls += 1
        return self.wrapped(environ, start_response)


def n_of(response: Any) -> int:
    return json.loads(response.data)["n"]


@pytest.fixture
def keyed_app(buddy_config: dict[str, Any], fake_redis: fakeredis.FakeRedis) -> Iterator[Flask]:
    config = {**buddy_config, "security": {"require_secure_key": True, "secure_key": "k" * 24}}
    app = create_app(config, redis_client=fake_redis, environ={})
    yield app
    app.extensions["buddy"].shutdown()


def test_with_a_key_required_a_hit_needs_it_and_a_refusal_is_logged_once(
    keyed_app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    client, counted = keyed_app.test_client(), Counted(keyed_app)
    key = "k" * 24
    assert client.get(f"/{key}/up/item").headers["X-Cache"] == "MISS"
    calls = counted.calls
    assert client.get(f"/{key}/up/item").headers["X-Cache"] == "HIT"
    assert client.get("/up/item", headers={"Authorization": f"Bearer {key}"}).headers["X-Cache"] == "HIT"
    assert client.get(f"/up/item?key={key}").headers["X-Cache"] == "HIT"
    assert counted.calls == calls  # all three from the hit path
    with caplog.at_level(logging.WARNING, logger="buddy.security"):
        refused = client.get("/up/item", headers={"X-API-Buddy-Key": "wrong" * 5})
    assert refused.status_code == 401 and refused.is_json
    assert len([r for r in caplog.records if "refused 1 request" in r.getMessage()]) == 1


def test_namespaces_stay_apart_on_the_hit_path(client: FlaskClient, upstream: UpstreamStub) -> None:
    for _ in range(3):
        client.get("/up/a", headers={"X-Buddy-Namespace": "run-1"})
    other = client.get("/up/a", headers={"X-Buddy-Namespace": "run-2"})
    assert other.headers["X-Cache"] == "MISS" and upstream.count("/a") == 2
    assert client.get("/up/a", headers={"X-Buddy-Namespace": "bad name!"}).status_code == 400


def test_a_failure_of_its_own_is_answered_by_the_view_counted_and_logged_once_per_kind(
    app: Flask, client: FlaskClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import buddy.fastpath

    def bug(*args: Any) -> Any:
        raise ValueError("a bug in the hit path")

    client.get("/up/item")
    monkeypatch.setattr(buddy.fastpath, "response_headers", bug)  # reached by fresh hits only, after their look-up
    with caplog.at_level(logging.INFO, logger="buddy.fastpath"):
        for _ in range(3):
            answer = client.get("/up/item")
            assert answer.status_code == 200 and answer.headers["X-Cache"] == "HIT"  # from the view, in full
        assert client.get("/up/../x").status_code == 400  # a refusal is the view's to make: no failure
        monkeypatch.setattr(buddy.fastpath, "mapped_request", lambda *args: {}["another bug"])  # before any look-up
        for i in range(2):
            assert client.get(f"/up/other?i={i}").headers["X-Cache"] == "MISS"
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.exc_info[0] for r in loud if r.exc_info] == [ValueError, KeyError]  # the first of each kind
    assert len(loud) == 2 and "hit_path_failures" in loud[0].getMessage()
    app.extensions["buddy"].service.metrics.flush()
    counted = client.get("/admin/metrics").get_json()["cache"]
    assert counted["by_domain"]["up"]["hit_path_failures"] == counted["hit_path_failures"] == 5
    assert 'buddy_hit_path_failures_total{domain="up"} 5.0' in client.get("/metrics").get_data(as_text=True)


def test_a_hot_entry_is_served_from_memory_until_the_proxy_itself_changes_it(
    app: Flask, client: FlaskClient, fake_redis: fakeredis.FakeRedis
) -> None:
    for _ in range(3):
        first = client.get("/up/a")
    assert first.headers["X-Cache"] == "HIT"
    for key in fake_redis.scan_iter(match="buddy:cache:*"):
        fake_redis.delete(key)  # behind the proxy's back: nobody tells the workers
    remembered = client.get("/up/a")
    assert remembered.headers["X-Cache"] == "HIT" and remembered.data == first.data  # from this worker's L1
    app.extensions["buddy"].service.cache.clear("up")  # the proxy's own clear drops every worker's copies
    assert client.get("/up/a").headers["X-Cache"] == "MISS"


def wait_for(check: Any, timeout: float = 3.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return result


def test_a_store_or_clear_in_one_worker_drops_the_copies_of_another(buddy_config: dict[str, Any],
                                                                     upstream: UpstreamStub) -> None:
    server = fakeredis.FakeServer()
    one = create_app(buddy_config, redis_client=fakeredis.FakeRedis(server=server), environ={})
    two = create_app(buddy_config, redis_client=fakeredis.FakeRedis(server=server), environ={})
    try:
        a, b = one.test_client(), two.test_client()
        for hub in (one, two):
            assert hub.extensions["buddy"].service.coalescer.hub.start(wait=3)
        assert n_of(a.get("/up/item")) == 1
        for _ in range(3):
            assert n_of(b.get("/up/item")) == 1  # now in two's memory
        assert n_of(a.get("/up/item", headers={"Cache-Control": "no-cache"})) == 2  # a refresh, in worker one
        assert wait_for(lambda: n_of(b.get("/up/item")) == 2), "worker two kept serving its old copy"
        for _ in range(3):
            b.get("/up/item")
        assert a.delete("/admin/cache/up").status_code == 200
        assert wait_for(lambda: b.get("/up/item").headers["X-Cache"] == "MISS")
        assert upstream.count("/item") == 3
    finally:
        one.extensions["buddy"].shutdown()
        two.extensions["buddy"].shutdown()


def test_what_a_worker_stores_or_clears_its_own_next_request_sees_whatever_pub_sub_is_doing(
    app: Flask, client: FlaskClient
) -> None:
    """Read-your-writes in one worker: its own store or clear drops its own copy at once. Another worker hears of it
    on pub/sub, a moment later; here that moment never ends (the subscription stays confirmed, its messages are held
    back), so that nothing but the worker's own drop can make the next answer right."""
    service = app.extensions["buddy"].service
    hub = service.coalescer.hub
    assert hub.start(wait=3)
    held_back, hub.listeners = hub.listeners, []
    try:
        for _ in range(4):  # a miss, then read often enough to be kept in this worker's memory
            assert n_of(client.get("/up/item")) == 1
        assert n_of(client.get("/up/item", headers={"Cache-Control": "no-cache"})) == 2  # a refresh, stored here
        assert n_of(client.get("/up/item")) == 2, "this worker answered with its copy of the entry it replaced"
        for _ in range(3):
            client.get("/up/item")
        service.cache.clear("up")
        assert client.get("/up/item").headers["X-Cache"] == "MISS", "this worker answered a cleared entry"
    finally:
        hub.listeners = held_back


def test_an_entry_past_its_ttl_is_no_hit_from_memory(upstream: UpstreamStub, fake_redis: fakeredis.FakeRedis,
                                                     buddy_config: dict[str, Any]) -> None:
    config = json.loads(json.dumps(buddy_config))
    config["domain_mappings"]["up"]["ttl_seconds"] = 1
    app = create_app(config, redis_client=fake_redis, environ={})
    try:
        client = app.test_client()
        for _ in range(3):
            assert client.get("/up/short").status_code == 200
        time.sleep(1.1)
        assert client.get("/up/short").headers["X-Cache"] == "MISS"
        assert upstream.count("/short") == 2
    finally:
        app.extensions["buddy"].shutdown()


def test_memory_counts_what_an_entry_keeps_of_its_request_too(buddy_config: dict[str, Any],
                                                              fake_redis: fakeredis.FakeRedis) -> None:
    config = json.loads(json.dumps(buddy_config))
    config["cache"]["l1_max_bytes"] = 1024 * 1024
    config["server"] = {"max_request_body": 2 * 1024 * 1024}
    app = create_app(config, redis_client=fake_redis, environ={})
    try:
        client, memory = app.test_client(), app.extensions["buddy"].service.cache.memory
        for i in range(40):  # 256 KiB prompts with tiny answers, each asked three times
            prompt = (b"%04d" % i) * (256 * 1024 // 4)
            for _ in range(3):
                assert client.post("/up/status/200", data=prompt, headers={"Content-Type": "text/plain"}).status_code \
                    == 200
        held = sum(len(copy.value.request.body) for copy in list(memory._copies.values())
                   if getattr(copy.value, "request", None) is not None)
        assert memory.stats()["bytes"] <= memory.max_bytes and held <= memory.max_bytes
    finally:
        app.extensions["buddy"].shutdown()


def test_an_entry_of_0_3_without_a_lifetime_is_never_kept_in_memory(app: Flask, client: FlaskClient,
                                                                     fake_redis: fakeredis.FakeRedis) -> None:
    from buddy import codec

    assert client.get("/up/legacy").headers["X-Cache"] == "MISS"
    [key] = list(fake_redis.scan_iter(match="buddy:cache:*"))
    entry = codec.decode(fake_redis.get(key))
    entry.fresh_for = None  # fresh while Redis keeps it, as 0.3 stored it; here 1 s more
    fake_redis.set(key, codec.encode(entry), px=1000)
    for _ in range(3):
        assert client.get("/up/legacy").headers["X-Cache"] == "HIT"
    time.sleep(1.3)
    assert client.get("/up/legacy").headers["X-Cache"] == "MISS"


def test_a_request_is_admitted_by_its_own_bytes_not_by_a_remembered_one(keyed_app: Flask,
                                                                        upstream: UpstreamStub) -> None:
    client, key = keyed_app.test_client(), "k" * 24
    for _ in range(3):  # now remembered by this worker, and a hit
        assert client.get("/up/item", headers={"X-API-Buddy-Key": key}).headers["X-Cache"] in ("MISS", "HIT")
    assert client.get("/up/item", headers={"X-API-Buddy-Key": key + "x"}).status_code == 401
    assert client.get("/up/item", headers={"X-API-Buddy-Key": key, "X-Api-Buddy-Key-2": "x"}).headers["X-Cache"] \
        == "HIT"
    assert client.get("/up/item").status_code == 401
    assert client.get("/up/item", headers={"X-API-Buddy-Key": key, "Authorization": "Bearer theirs"}).headers[
        "X-Cache"] == "MISS"  # another credential: another entry
    assert upstream.count("/item") == 2


def deep_size(value: Any, seen: set[int]) -> int:
    if id(value) in seen:
        return 0
    seen.add(id(value))
    size = sys.getsizeof(value)
    if isinstance(value, dict):
        size += sum(deep_size(k, seen) + deep_size(v, seen) for k, v in value.items())
    elif isinstance(value, (list, tuple, set, frozenset)):
        size += sum(deep_size(item, seen) for item in value)
    elif hasattr(value, "__dict__"):
        size += deep_size(vars(value), seen)
    return size


def test_remembered_requests_stay_within_their_byte_budget_under_a_flood(app: Flask, client: FlaskClient,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import buddy.fastpath

    monkeypatch.setattr(buddy.fastpath, "MAPPED_BUDGET", 200_000)
    hit_path = app.wsgi_app
    client.get("/up/item")
    for i in range(30):  # 50 header names of 8 KB each (gunicorn allows 100 of 8190 bytes), empty values
        assert client.get("/up/item", headers={f"X-{i}-{j}-" + "a" * 8000: "" for j in range(50)}).status_code == 200
    assert len(hit_path._mapped) <= 1  # type: ignore[attr-defined]  # too big to remember
    largest = 0
    for i in range(60):  # targets of about 4 KB: remembered until the budget is spent, then all forgotten
        client.get(f"/up/item?i={i}&" + "&".join(f"p{j}=" + "v" * 30 for j in range(110)))
        shared = set()
        deep_size(app.extensions["buddy"].settings, shared)  # the mapping's settings are not the memo's
        largest = max(largest, deep_size(hit_path._mapped, shared))  # type: ignore[attr-defined]
    assert largest <= 1.2 * 200_000, f"{largest} bytes remembered"


def test_answers_from_a_worker_s_memory_are_counted_for_the_whole_proxy(app: Flask, client: FlaskClient,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    cache = app.extensions["buddy"].service.cache
    assert cache.memory is not None and app.extensions["buddy"].service.coalescer.hub.start(wait=3)
    answered: list[str] = []  # what the worker's memory answered (on a loaded machine, a silent subscription
    read = cache.memory.get  # makes it answer fewer: each one that it did answer must be counted)
    monkeypatch.setattr(cache.memory, "get", lambda key: (found := read(key)) and answered.append(key) or found)
    for _ in range(10):  # a miss; then hits: read from Redis twice (kept on its second read), then from memory
        client.get("/up/a")
    app.extensions["buddy"].service.metrics.flush()
    counted = client.get("/admin/metrics").get_json()["cache"]
    assert 1 <= len(answered) <= 7 and counted["by_domain"]["up"]["hits"] == 9
    assert counted["by_domain"]["up"]["memory_hits"] == counted["memory_hits"] == len(answered)
    exposed = client.get("/metrics").get_data(as_text=True)
    assert f"buddy_memory_hits_total{{domain=\"up\"}} {len(answered)}.0" in exposed


@pytest.mark.parametrize("framing", [
    {"data": b"hello"},
    {"input_stream": io.BytesIO(b"hello"), "headers": {"Transfer-Encoding": "chunked"},
     "environ_overrides": {"wsgi.input_terminated": True}},  # as gunicorn and werkzeug's server frame it
    {"data": b"hello", "headers": {"Content-Length": "05"}},
])
def test_a_request_with_a_body_is_the_view_s_to_answer(app: Flask, client: FlaskClient, upstream: UpstreamStub,
                                                       framing: dict[str, Any]) -> None:
    """The hit path and the view take one decision about a body (views.has_body): with one, the view reads it and
    keys on it, never the body-less entry."""
    client.get("/up/a")
    assert client.get("/up/a").headers["X-Cache"] == "HIT"
    counted = Counted(app)
    for method in ("GET", "HEAD"):
        answer = client.open("/up/a", method=method, **copy.deepcopy(framing))
        assert counted.calls == 1 and answer.headers["X-Upstream-Count"] != "1", method  # not the body-less one
        counted.calls = 0
    assert [s.body for s in upstream.log] == [b"", b"hello"]
