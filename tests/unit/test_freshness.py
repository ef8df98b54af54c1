"""Freshness through the app: stale windows and their settings, namespaces in keys, the offline switch, what an
entry keeps of its request, and what a hostile review found (the rules themselves are tests/unit/test_policy.py's)."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fakeredis
import pytest
from flask import Flask

from buddy import codec, create_app, policy
from buddy.errors import ConfigError
from buddy.messages import ProxyRequest, ProxyResult, StoredRequest
from buddy.settings import load_settings, validate_config
from tests.support.upstream_stub import UpstreamStub

NOW = 1_000_000.0


def domain(**spec: Any):  # type: ignore[no-untyped-def]
    return validate_config({"domain_mappings": {"up": {"upstream": "https://example.org", **spec}}}).domains["up"]


def entry(age: float, fresh_for: int | None = 60, headers: list[tuple[str, str]] | None = None) -> ProxyResult:
    return ProxyResult(200, "OK", headers or [], b"{}", stored_at=NOW - age, fresh_for=fresh_for)


def test_stale_settings_are_named_when_wrong() -> None:
    with pytest.raises(ConfigError) as raised:
        validate_config({"domain_mappings": {"up": {"upstream": "https://example.org",
                                                    "stale_if_error_seconds": -1}},
                         "cache": {"stale_while_revalidate_seconds": "1h"}})
    assert raised.value.problems == [
        "cache.stale_while_revalidate_seconds: must be 0 or a positive integer",
        "domain_mappings.up.stale_if_error_seconds: must be 0 or a positive integer",
    ]
    assert load_settings(environ={"BUDDY_OFFLINE": "yes"}).cache.offline is True
    with pytest.raises(ConfigError, match="BUDDY_OFFLINE: must be true or false"):
        load_settings(environ={"BUDDY_OFFLINE": "perhaps"})


def request(namespace: str = "", headers: dict[str, str] | None = None) -> ProxyRequest:
    sent = {"Accept": "application/json", "Authorization": "Bearer upstream-token", **(headers or {})}
    return ProxyRequest(domain(), "GET", "/q", "a=1", list(sent.items()), b"", sent, namespace=namespace)


def test_a_namespace_is_its_own_partition_down_to_the_variants() -> None:
    plain, one, two = policy.entry_for(request()), policy.entry_for(request("one")), policy.entry_for(request("two"))
    assert one.digest == f"ns:one:{plain.digest}" and two.digest == f"ns:two:{plain.digest}"
    variant = policy.variant_digest(one.digest, ["x-tenant"], {"X-Tenant": "a"})
    assert variant.startswith("ns:one:") and variant != policy.variant_digest(plain.digest, ["x-tenant"], {})


def test_an_entry_keeps_its_request_but_never_a_credential() -> None:
    kept = policy.stored_request(request("one", {"X-Tenant": "a"}), "https://example.org/q?a=1", ["x-tenant"])
    assert kept.headers == (("Accept", "application/json"), ("X-Tenant", "a"))
    assert kept.credentials and "upstream-token" not in repr(kept) and kept.namespace == "one"
    stored = ProxyResult(200, "OK", [("Content-Type", "application/json")], b"{}", stored_at=NOW, fresh_for=60,
                         request=kept)
    back = codec.decode_response(codec.encode(stored))
    assert (back.fresh_for, back.request) == (60, kept)
    big = policy.stored_request(ProxyRequest(domain(), "POST", "/q", "", [], b"x" * (2 << 20), {}), "u")
    assert big.body == b"" and big.body_kept is False
    assert codec.decode_response(codec.encode(ProxyResult(200, "OK", [], b"", request=StoredRequest("GET", "u"))))


@pytest.fixture
def offline_app(upstream: UpstreamStub, fake_redis: fakeredis.FakeRedis) -> Flask:
    return create_app({"domain_mappings": {"up": {"upstream": upstream.url}}, "cache": {"offline": True},
                       "logging": {"enable_console": False}}, redis_client=fake_redis)


def test_offline_by_configuration_refuses_every_miss(offline_app: Flask, upstream: UpstreamStub) -> None:
    client = offline_app.test_client()
    for method in ("GET", "POST", "PUT"):
        answer = client.open("/up/anything", method=method)
        assert answer.status_code == 504 and answer.json["error"] == "offline"
        assert answer.headers["X-Cache"] == "OFFLINE"
        # It names the command that works from any folder (a pip-installed user has no wsgi.py for `flask`).
        assert "`api-buddy offline off`" in answer.json["message"] and "flask" not in answer.json["message"]
    assert upstream.count() == 0
    switch = offline_app.extensions["buddy"].service.offline
    switch.set(False)  # the run-time switch wins over the configuration, in every process within a second
    assert client.get("/up/anything").status_code == 200 and upstream.count() == 1
    switch.reset()
    assert switch.state() == (True, "configured")


# -- found by a hostile review, each failed before its fix -----------------------------------------------------


def proxy_app(upstream: UpstreamStub, server: fakeredis.FakeServer | None = None, cache: dict | None = None,
              **spec: Any) -> Flask:
    config = {"domain_mappings": {"up": {"upstream": upstream.url, "read_timeout": 5, **spec}},
              "cache": cache or {}, "logging": {"enable_console": False}}
    return create_app(config, redis_client=fakeredis.FakeRedis(server=server or fakeredis.FakeServer()), environ={})


def test_only_if_cached_never_goes_upstream_not_even_without_redis_or_for_an_uncacheable_request(
    upstream: UpstreamStub
) -> None:
    server = fakeredis.FakeServer()
    client = proxy_app(upstream, server).test_client()
    only = {"Cache-Control": "only-if-cached"}
    assert client.get("/up/x", headers={**only, "Range": "bytes=0-3"}).status_code == 504
    assert client.delete("/up/x", headers=only).status_code == 504
    server.connected = False
    assert client.get("/up/x", headers=only).json["error"] == "not cached"
    assert upstream.count() == 0


def test_max_stale_never_takes_an_expired_must_revalidate_answer(upstream: UpstreamStub) -> None:
    client = proxy_app(upstream, ttl_seconds=1).test_client()
    path = "/up/mr?h=Cache-Control:must-revalidate"
    assert client.get(path).headers["X-Cache"] == "MISS"
    time.sleep(1.1)
    assert client.get(path, headers={"Cache-Control": "max-stale"}).headers["X-Cache"] == "MISS"


def test_concurrent_max_age_0_requests_share_one_fetch(upstream: UpstreamStub) -> None:
    app = proxy_app(upstream)
    app.test_client().get("/up/slow/300")
    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda _: app.test_client().get("/up/slow/300", headers={
            "Cache-Control": "max-age=0"}), range(5)))
    assert sorted(a.headers["X-Cache"] for a in answers).count("MISS") == 1 and upstream.count() == 2


def test_a_request_sleeping_for_its_slot_never_goes_upstream_once_offline(upstream: UpstreamStub) -> None:
    app = proxy_app(upstream, max_requests_per_second=1)
    app.test_client().get("/up/first")
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(lambda: app.test_client().get("/up/second"))
        time.sleep(0.3)  # it sleeps for its slot now
        app.extensions["buddy"].service.offline.set(True)
        assert waiting.result().headers["X-Cache"] == "OFFLINE"
    assert upstream.paths() == ["/first"]


def test_inside_the_revalidate_window_only_if_cached_and_no_store_start_no_refresh(upstream: UpstreamStub) -> None:
    app = proxy_app(upstream, ttl_seconds=1, stale_while_revalidate_seconds=60)
    client = app.test_client()
    client.get("/up/swr")
    time.sleep(1.1)
    for control in ("only-if-cached", "no-store"):
        assert client.get("/up/swr", headers={"Cache-Control": control}).headers["X-Cache"] == "STALE"
    time.sleep(0.3)
    assert upstream.count() == 1


def test_a_refresh_without_a_thread_lets_go_of_the_lock(upstream: UpstreamStub,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    app = proxy_app(upstream, ttl_seconds=1, stale_while_revalidate_seconds=60)
    client, service = app.test_client(), app.extensions["buddy"].service
    client.get("/up/t")
    time.sleep(1.1)

    def no_thread(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    with monkeypatch.context() as patched:
        patched.setattr(threading.Thread, "start", no_thread)
        assert client.get("/up/t").headers["X-Cache"] == "STALE"
    assert service.coalescer.keeper.held() == 0
    assert client.get("/up/t", headers={"Cache-Control": "no-cache"}).headers["X-Cache"] == "MISS"


def test_an_answer_too_big_to_keep_retires_the_expired_entry(upstream: UpstreamStub) -> None:
    app = proxy_app(upstream, cache={"max_cache_response_size": 1024}, ttl_seconds=1,
                    stale_while_revalidate_seconds=60)
    service = app.extensions["buddy"].service
    up = service.settings.domains["up"]
    service.cache.put(policy.entry_for(ProxyRequest(up, "GET", "/big/200000", "", [], b"", {})),
                      ProxyResult(200, "OK", [], b"old", stored_at=time.time() - 5, fresh_for=1), 100)
    client = app.test_client()
    assert client.get("/up/big/200000").data == b"old"  # STALE, and one refresh
    assert eventually(lambda: upstream.count() == 1)
    time.sleep(0.3)
    fresh = client.get("/up/big/200000")
    assert fresh.headers["X-Cache"] == "MISS" and len(fresh.data) == 200000


def eventually(check: Any, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_stale_answer_for_a_failed_call_is_counted_but_saves_nothing(upstream: UpstreamStub) -> None:
    app = proxy_app(upstream, ttl_seconds=1)
    service = app.extensions["buddy"].service
    up = service.settings.domains["up"]
    service.cache.put(policy.entry_for(ProxyRequest(up, "GET", "/status/503", "", [], b"", {})),
                      ProxyResult(200, "OK", [], b"kept", stored_at=time.time() - 5, fresh_for=1), 100)
    answer = app.test_client().get("/up/status/503")
    assert (answer.headers["X-Cache"], answer.data, upstream.count()) == ("STALE", b"kept", 1)
    service.metrics.flush()
    counted = app.extensions["buddy"].monitoring.counters()["up"]
    assert counted["stale"] == counted["stale_if_error"] == 1 and "bytes_saved" not in counted
