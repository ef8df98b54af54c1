"""Issue 12's rules, one by one: the client's Cache-Control, when an expired entry may answer, upstream TTLs,
namespaces in keys, the offline switch and what an entry keeps of its request."""
from __future__ import annotations

import math
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


@pytest.mark.parametrize("cache_control, pragma, expected", [
    ("no-cache", "", policy.RequestControl(no_cache=True)),
    ("No-Cache, No-Store", "", policy.RequestControl(no_cache=True, no_store=True)),
    ("", "no-cache", policy.RequestControl(no_cache=True)),
    ("max-age=0", "no-cache", policy.RequestControl(max_age=0)),  # Pragma only counts without Cache-Control
    ("max-stale", "", policy.RequestControl(max_stale=math.inf)),
    ("max-stale=30, min-fresh=5", "", policy.RequestControl(max_stale=30, min_fresh=5)),
    ("max-age=-3", "", policy.RequestControl(max_age=0)),
    ("max-age=soon", "", policy.RequestControl()),
    ("only-if-cached", "", policy.RequestControl(only_if_cached=True)),
])
def test_request_directives_are_read_case_insensitively(cache_control: str, pragma: str,
                                                         expected: policy.RequestControl) -> None:
    assert policy.request_control(cache_control, pragma) == expected


@pytest.mark.parametrize("age, control, verdict", [
    (10, policy.RequestControl(), "HIT"),
    (61, policy.RequestControl(), None),
    (10, policy.RequestControl(no_cache=True), None),
    (10, policy.RequestControl(max_age=5), None),
    (10, policy.RequestControl(max_age=20), "HIT"),
    (50, policy.RequestControl(min_fresh=20), None),
    (70, policy.RequestControl(max_stale=30), "STALE"),
    (100, policy.RequestControl(max_stale=30), None),
    (70, policy.RequestControl(max_stale=math.inf, max_age=65), None),
])
def test_what_an_entry_may_answer_without_the_upstream(age: float, control: policy.RequestControl,
                                                       verdict: str | None) -> None:
    assert policy.satisfies(entry(age), control, NOW) == verdict


def test_an_entry_stored_before_lifetimes_were_kept_is_fresh_while_redis_keeps_it() -> None:
    assert policy.satisfies(entry(10**6, fresh_for=None), policy.RequestControl(), NOW) == "HIT"


def test_stale_windows() -> None:
    up = domain(stale_if_error_seconds=100, stale_while_revalidate_seconds=10)
    plain, picky = policy.RequestControl(), policy.RequestControl(max_age=3600)
    assert policy.may_revalidate_later(up, entry(65), plain, NOW)
    assert not policy.may_revalidate_later(up, entry(75), plain, NOW)  # past the revalidate window
    assert not policy.may_revalidate_later(up, entry(65), picky, NOW)
    assert policy.may_stand_in(up, entry(150), plain, NOW) and not policy.may_stand_in(up, entry(170), plain, NOW)
    assert not policy.may_stand_in(up, entry(65), picky, NOW)
    assert policy.may_stand_in(up, entry(10**6), plain, NOW, offline=True)  # offline: whatever is still kept
    revalidate = entry(65, headers=[("Cache-Control", "max-age=60, Must-Revalidate")])
    assert not policy.may_stand_in(up, revalidate, plain, NOW) and not policy.may_revalidate_later(
        up, revalidate, plain, NOW)
    ignoring = domain(respect_upstream_cache_control=False)
    assert policy.may_stand_in(ignoring, revalidate, plain, NOW)
    assert up.grace == 100 and policy.kept_for(up, 60) == 160


@pytest.mark.parametrize("headers, ttl", [
    ([("Cache-Control", "max-age=60")], 60),
    ([("Cache-Control", "s-maxage=30, max-age=60"), ("Age", "10")], 20),
    ([("Cache-Control", "max-age=999999")], 3600),  # never beyond the mapping's own TTL
    ([("Cache-Control", "max-age=0")], None),
    ([("Cache-Control", "max-age=later")], 3600),
    ([], 3600),
])
def test_ttl_from_upstream_is_bounded_by_the_mapping(headers: list[tuple[str, str]], ttl: int | None) -> None:
    result = ProxyResult(200, "OK", headers, b"{}", upstream_headers=headers)
    assert policy.storage(domain(ttl_seconds=3600, ttl_from_upstream=True), result).ttl == ttl
    assert policy.storage(domain(ttl_seconds=3600), result).ttl == 3600  # the mapping's TTL unless it opts in


def test_stale_settings_are_named_when_wrong() -> None:
    with pytest.raises(ConfigError) as raised:
        validate_config({"domain_mappings": {"up": {"upstream": "https://example.org",
                                                    "stale_if_error_seconds": -1}},
                         "cache": {"stale_while_revalidate_seconds": "1h"}})
    assert raised.value.problems == [
        "cache.stale_while_revalidate_seconds: must be 0 or a positive integer",
        "domain_mappings.up.stale_if_error_seconds: must be 0 or a positive integer",
    ]
    assert load_settings(environ={"BUDDY_OFFLINE": "yes"}).cache["offline"] is True
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
    assert upstream.count() == 0
    switch = offline_app.extensions["buddy"].service.offline
    switch.set(False)  # the run-time switch wins over the configuration, in every process within a second
    assert client.get("/up/anything").status_code == 200 and upstream.count() == 1
    switch.reset()
    assert switch.state() == (True, "configured")
