"""The request flow through the Flask app (fakeredis, a real upstream stub): what a client sees, what upstream sees."""
from __future__ import annotations

import gzip
import json
import os
import time

import fakeredis
import pytest
from flask import Flask
from flask.testing import FlaskClient

from buddy import codec, create_app, policy
from buddy.messages import ProxyRequest
from tests.support.ports import free_port
from tests.support.upstream_stub import UpstreamStub


def test_miss_then_hit_reaches_upstream_once(client: FlaskClient, upstream: UpstreamStub) -> None:
    first = client.get("/up/c/en/dog?limit=5", headers={"Accept": "application/json"})
    second = client.get("/up/c/en/dog?limit=5", headers={"Accept": "application/json"})
    assert first.status_code == second.status_code == 200
    assert first.headers["X-Cache"] == "MISS" and "Age" not in first.headers
    assert second.headers["X-Cache"] == "HIT" and int(second.headers["Age"]) >= 0
    assert second.data == first.data
    assert upstream.paths() == ["/c/en/dog?limit=5"]


def test_hit_returns_status_headers_and_body_byte_for_byte(client: FlaskClient, upstream: UpstreamStub) -> None:
    first = client.get("/up/status/201")
    second = client.get("/up/status/201")
    strip = {"X-Cache", "Age", "Date", "Server"}
    assert second.status == first.status == "201 Created"
    assert [(k, v) for k, v in second.headers if k not in strip] == [(k, v) for k, v in first.headers if k not in strip]
    assert second.data == first.data
    assert upstream.count() == 1


def test_head_is_answered_from_and_fills_the_get_entry(client: FlaskClient, upstream: UpstreamStub) -> None:
    head = client.head("/up/thing")
    assert head.status_code == 200 and head.data == b"" and head.headers["X-Cache"] == "MISS"
    get = client.get("/up/thing")
    assert get.headers["X-Cache"] == "HIT" and json.loads(get.data)["path"] == "/thing"
    assert int(head.headers["Content-Length"]) == len(get.data)
    assert [seen.method for seen in upstream.log] == ["GET"]


def test_post_bodies_are_separate_entries(client: FlaskClient, upstream: UpstreamStub) -> None:
    for body in ('{"q": "dog"}', '{"q": "cat"}', '{"q": "dog"}', '{"q": "cat"}'):
        response = client.post("/up/sparql", data=body, content_type="application/json")
        assert json.loads(response.data)["body"] == body
    assert [seen.body for seen in upstream.log] == [b'{"q": "dog"}', b'{"q": "cat"}']


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE", "OPTIONS"])
def test_other_methods_always_go_upstream(client: FlaskClient, upstream: UpstreamStub, method: str) -> None:
    for _ in range(2):
        assert client.open("/up/item", method=method, data=b"x").status_code == 200
    assert [seen.method for seen in upstream.log] == [method, method]


def test_server_errors_and_429_are_not_cached(client: FlaskClient, upstream: UpstreamStub) -> None:
    for path in ("/up/status/500", "/up/status/503?retry_after=0", "/up/status/429?retry_after=0"):
        assert [client.get(path).status_code for _ in range(2)] == [int(path[11:14])] * 2
    assert upstream.count() == 6


def test_not_found_is_cached_for_the_negative_ttl(client: FlaskClient, upstream: UpstreamStub,
                                                  fake_redis: fakeredis.FakeRedis) -> None:
    assert [client.get("/up/status/404").status_code for _ in range(2)] == [404, 404]
    assert upstream.count() == 1
    (key,) = fake_redis.keys("buddy:cache:*")
    grace = 7 * 86400  # kept past its TTL for stale-if-error (cache.stale_if_error_seconds)
    assert codec.decode_response(fake_redis.get(key)).fresh_for == 300
    assert 0 < fake_redis.ttl(key) - grace <= 300
    client.get("/up/ok")
    fresh = [k for k in fake_redis.keys("buddy:cache:*") if k != key]
    assert codec.decode_response(fake_redis.get(fresh[0])).fresh_for == 86400
    assert 86000 < fake_redis.ttl(fresh[0]) - grace <= 86400


def test_set_cookie_reaches_the_first_client_but_is_never_replayed(client: FlaskClient) -> None:
    first = client.get("/up/cookie")
    second = client.get("/up/cookie")
    assert first.headers.getlist("Set-Cookie") == ["session=secret1; Path=/", "other=1"]
    assert second.headers["X-Cache"] == "HIT" and "Set-Cookie" not in second.headers


def test_gzip_from_upstream_is_decoded_consistently(client: FlaskClient) -> None:
    for response in (client.get("/up/gzip"), client.get("/up/gzip")):
        assert json.loads(response.data) == {"compressed": True, "n": 1}
        assert "Content-Encoding" not in response.headers
        assert int(response.headers["Content-Length"]) == len(response.data)


def test_a_body_that_merely_looks_compressed_is_untouched(client: FlaskClient) -> None:
    expected = gzip.compress(b"this is a file that happens to be gzip")
    for response in (client.get("/up/looks-gzip"), client.get("/up/looks-gzip")):
        assert gzip.decompress(response.data) == b"this is a file that happens to be gzip"
        assert len(response.data) == len(expected)
        assert response.headers["Content-Type"] == "application/gzip"


def test_oversize_bodies_stream_through_and_are_not_cached(client: FlaskClient, upstream: UpstreamStub,
                                                           fake_redis: fakeredis.FakeRedis) -> None:
    size = 200 * 1024  # the test config caps cached bodies at 64 KiB
    for _ in range(2):
        response = client.get("/up/big/%d" % size)
        assert response.status_code == 200 and len(response.data) == size
        assert response.headers["X-Cache"] == "MISS"
    assert upstream.count() == 2
    assert fake_redis.keys("buddy:cache:*") == []


@pytest.mark.parametrize("header,value", [("Range", "bytes=0-3"), ("If-Match", '"v1"'), ("If-Range", '"v1"')])
def test_range_and_precondition_requests_bypass_the_cache(client: FlaskClient, upstream: UpstreamStub,
                                                          header: str, value: str) -> None:
    client.get("/up/file")
    assert client.get("/up/file").headers["X-Cache"] == "HIT"
    own = client.get("/up/file", headers={header: value})
    assert own.headers["X-Cache"] == "MISS"
    assert upstream.log[-1].headers[header.lower()] == value
    client.get("/up/other", headers={header: value})
    assert client.get("/up/other").headers["X-Cache"] == "MISS"  # nothing was stored for it
    assert upstream.count() == 3 + 1


def test_a_clients_conditional_get_is_answered_from_the_cache(client: FlaskClient, upstream: UpstreamStub) -> None:
    path = "/up/file?h=ETag:%22v1%22&h=Last-Modified:Wed,%2021%20Oct%202015%2007:28:00%20GMT"
    first = client.get(path, headers={"If-None-Match": '"v1"'})  # a miss: fetched whole, stored, answered 304
    assert (first.status_code, first.headers["X-Cache"], first.data) == (304, "MISS", b"")
    assert "if-none-match" not in upstream.log[-1].headers  # the client's condition is the proxy's to answer
    weak = client.get(path, headers={"If-None-Match": 'W/"v1"'})
    assert (weak.status_code, weak.headers["X-Cache"], weak.data) == (304, "HIT", b"")
    assert weak.headers["ETag"] == '"v1"' and "Content-Type" not in weak.headers
    other = client.get(path, headers={"If-None-Match": '"v2"'})
    assert (other.status_code, other.headers["X-Cache"]) == (200, "HIT") and other.data
    since = client.get(path, headers={"If-Modified-Since": "Thu, 22 Oct 2015 00:00:00 GMT"})
    assert (since.status_code, since.headers["X-Cache"]) == (304, "HIT")
    assert client.head(path, headers={"If-None-Match": '"v1"'}).status_code == 304
    assert upstream.count() == 1


def test_redirects_are_passed_to_the_client_not_followed(client: FlaskClient, upstream: UpstreamStub) -> None:
    response = client.get("/up/redirect")
    assert response.status_code == 302
    assert response.headers["Location"] == "/up/target"
    assert upstream.paths() == ["/redirect"]


def test_upstream_sees_its_own_host_the_credentials_and_no_hop_by_hop_headers(
    client: FlaskClient, upstream: UpstreamStub
) -> None:
    client.get("/up/h", headers={"Authorization": "Bearer up-token", "X-API-Key": "k1", "Connection": "X-Hop",
                                 "X-Hop": "secret", "Keep-Alive": "timeout=5", "Accept-Language": "de"})
    (seen,) = upstream.log
    assert seen.headers["host"] == f"127.0.0.1:{upstream.port}"
    assert seen.headers["authorization"] == "Bearer up-token" and seen.headers["x-api-key"] == "k1"
    assert seen.headers["accept-language"] == "de"
    assert "x-hop" not in seen.headers and "keep-alive" not in seen.headers


def test_a_remapped_mapping_starts_from_misses_on_the_same_redis(redis_server_fake: fakeredis.FakeServer) -> None:
    """A proxy started again on the same Redis with its mapping pointed at another upstream, or at another base
    path on the same one, never serves what the old upstream answered."""
    a, b = UpstreamStub(name="A"), UpstreamStub(name="B")
    apps: list[Flask] = []

    def proxy(upstream_url: str) -> FlaskClient:
        config = {"domain_mappings": {"api": {"upstream": upstream_url}}, "logging": {"enable_console": False}}
        apps.append(create_app(config, redis_client=fakeredis.FakeRedis(server=redis_server_fake), environ={}))
        return apps[-1].test_client()

    try:
        first = proxy(a.url + "/v1")
        assert [first.get("/api/x").headers["X-Cache"] for _ in range(2)] == ["MISS", "HIT"]
        moved_path = proxy(a.url + "/v2").get("/api/x")
        assert moved_path.headers["X-Cache"] == "MISS" and moved_path.json["path"] == "/v2/x"
        moved_host = proxy(b.url + "/v1").get("/api/x")
        assert moved_host.headers["X-Cache"] == "MISS", "the old upstream's answer was served after the remap"
        assert moved_host.json["upstream"] == "B" and moved_host.json["path"] == "/v1/x"
        assert a.paths() == ["/v1/x", "/v2/x"] and b.paths() == ["/v1/x"]
    finally:
        for app in apps:
            app.extensions["buddy"].shutdown()
        a.stop()
        b.stop()


def test_vary_headers_separate_entries(client: FlaskClient, upstream: UpstreamStub) -> None:
    for language in ("de", "en", "de"):
        client.get("/up/label", headers={"Accept-Language": language})
    assert upstream.count() == 2


def test_unknown_domain_is_a_json_404_listing_the_configured_ones(client: FlaskClient, upstream: UpstreamStub) -> None:
    response = client.get("/nowhere/x")
    assert response.status_code == 404
    assert response.json["configured"] == ["up"] and response.json["domain"] == "nowhere"
    assert client.get("/").status_code == 302  # `/` alone leads to the dashboard (issue 16)
    assert upstream.count() == 0


def test_traversal_gets_a_json_400_and_never_reaches_upstream(client: FlaskClient, upstream: UpstreamStub) -> None:
    for path in ("/up/../x", "/up/%2e%2e/x", "/up/a/..%2f..%2fx", "/up/%zz", "/up/a%00b"):
        response = client.get(path)
        assert response.status_code == 400, path
        assert response.is_json and response.json["error"] == "bad request"
    assert upstream.count() == 0


def test_body_over_the_limit_is_413_json(upstream: UpstreamStub, buddy_config: dict) -> None:
    app = create_app({**buddy_config, "server": {"max_request_body": 100}}, redis_client=fakeredis.FakeRedis(),
                     environ={})
    response = app.test_client().post("/up/x", data=b"x" * 101)
    assert response.status_code == 413 and response.is_json
    assert upstream.count() == 0


def test_connection_refused_is_502_naming_the_domain(fake_redis: fakeredis.FakeRedis) -> None:
    port = free_port()
    app = create_app({"domain_mappings": {"gone": {"upstream": f"http://127.0.0.1:{port}"}}},
                     redis_client=fake_redis, environ={})
    response = app.test_client().get("/gone/x?api_key=secret")
    assert response.status_code == 502
    assert response.json == {"error": "upstream unavailable", "domain": "gone",
                             "message": f"could not reach upstream 'gone' (127.0.0.1:{port}): connection refused"}


def test_slow_upstream_is_504_naming_the_domain(client: FlaskClient, upstream: UpstreamStub) -> None:
    response = client.get("/up/slow/1500")  # the test config's read timeout is 1 s
    assert response.status_code == 504
    assert response.json["domain"] == "up" and response.json["error"] == "upstream timeout"


def test_redis_down_serves_through_with_bypass(app: Flask, client: FlaskClient, upstream: UpstreamStub,
                                               redis_server_fake: fakeredis.FakeServer, caplog) -> None:
    redis_server_fake.connected = False
    responses = [client.get("/up/x") for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert {r.headers["X-Cache"] for r in responses} == {"BYPASS"}
    assert upstream.count() == 3
    assert sum("Redis unavailable" in record.message for record in caplog.records) == 1
    redis_server_fake.connected = True
    guard = app.extensions["buddy"].service.cache.guard
    deadline = time.monotonic() + 3
    while guard.open and time.monotonic() < deadline:  # the background probe finds it back within a second
        time.sleep(0.05)
    assert client.get("/up/x").headers["X-Cache"] == "MISS"
    assert client.get("/up/x").headers["X-Cache"] == "HIT"


def test_upstream_cookies_never_ride_along_with_another_clients_request(app: Flask, upstream: UpstreamStub) -> None:
    alice, bob = app.test_client(use_cookies=False), app.test_client(use_cookies=False)
    assert "Set-Cookie" in alice.get("/up/cookie", headers={"Authorization": "Bearer alice"}).headers
    bob.get("/up/bobs-request")
    assert "cookie" not in upstream.log[-1].headers


def test_credential_headers_are_configurable_per_domain(upstream: UpstreamStub, fake_redis) -> None:
    config = {"domain_mappings": {"up": {"upstream": upstream.url, "credential_headers": ["Cookie", "X-Team-Token"]}},
              "logging": {"enable_console": False}}
    client = create_app(config, redis_client=fake_redis, environ={}).test_client(use_cookies=False)
    for headers in ({"Cookie": "s=alice"}, {"Cookie": "s=bob"}, {"X-Team-Token": "t1"}, {"Authorization": "Bearer x"},
                    {"Cookie": "s=alice"}, {}):
        client.get("/up/account", headers=headers)
    # alice, bob, t1, and one shared entry for the last three: Authorization is not a credential here
    assert upstream.count() == 4


def test_a_request_past_its_leaders_budget_gets_a_504_labelled_coalesce_timeout(upstream: UpstreamStub) -> None:
    # Within its budget a leader always answers (rate-limit wait, then one call cut at total_timeout), so
    # the leader here is one that only exists in Redis: a lock nobody will ever release or extend.
    config = {"domain_mappings": {"up": {"upstream": upstream.url, "total_timeout": 0.3}},
              "throttling": {"progressive_max_delay": 0.1}, "logging": {"enable_console": False}}
    app = create_app(config, redis_client=fakeredis.FakeRedis(server=fakeredis.FakeServer()), environ={})
    try:
        service = app.extensions["buddy"].service
        domain = service.settings.domains["up"]
        entry = policy.entry_for(ProxyRequest(domain, "GET", "/stuck", "", [], b"", {}))
        assert service.coalescer.lock.acquire(entry, "a-leader-that-hangs", 60_000) == (True, "a-leader-that-hangs")
        response = app.test_client().get("/up/stuck")
        assert response.status_code == 504 and response.headers["X-Cache"] == "COALESCE-TIMEOUT"
        assert response.json["error"] == "coalesce timeout" and response.json["domain"] == "up"
        assert upstream.count() == 0
        service.metrics.flush()
        assert app.extensions["buddy"].monitoring.counters()["up"]["coalesce_timeouts"] == 1
    finally:
        app.extensions["buddy"].shutdown()


def test_a_client_on_a_high_descriptor_is_not_taken_for_gone() -> None:
    import resource
    import socket

    from buddy.views import hung_up

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(2048, hard), hard))
    ours, theirs = socket.socketpair()
    high = socket.socket(fileno=os.dup2(ours.fileno(), 1500))  # a busy worker's 1500th connection
    try:
        gone = hung_up(high)
        assert not gone()  # select.select() would have refused fd 1500 and called the client gone
        theirs.close()
        assert gone()
    finally:
        high.close()
        ours.close()
