"""Cache policy on plain values: what is keyed, stored, shared, and how an upstream's Retry-After is read."""
from __future__ import annotations

from datetime import datetime, timezone
from email.utils import format_datetime

import pytest

from buddy import policy
from buddy.messages import ProxyRequest, ProxyResult
from buddy.settings import validate_config
from buddy.upstream import forwardable_request_headers

SETTINGS = validate_config({"domain_mappings": {
    "api": {"upstream": "https://api.example.org/v1"},
    "lax": {"upstream": "https://api.example.org/v1", "respect_upstream_cache_control": False},
}})
API = SETTINGS.domains["api"]


def request(
    headers: list[tuple[str, str]], domain: str = "api", method: str = "GET", body: bytes = b""
) -> ProxyRequest:
    mapping = SETTINGS.domains[domain]
    return ProxyRequest(mapping, method, "/v1/items", "q=1", headers, body, forwardable_request_headers(headers))


def answer(*headers: tuple[str, str], status: int = 200) -> ProxyResult:
    return ProxyResult(status, "OK", [("Content-Type", "application/json"), *headers], b"{}")


def test_the_key_is_made_of_what_the_upstream_is_sent() -> None:
    json_client = policy.entry_for(request([("Accept", "application/json")]))
    # Connection: Accept drops Accept on the way upstream: that request is the one without Accept.
    dropped = policy.entry_for(request([("Accept", "application/json"), ("Connection", "Accept")]))
    assert dropped == policy.entry_for(request([])) != json_client
    posted = request([("Content-Type", "application/json"), ("Connection", "content-type")], method="POST", body=b"{}")
    assert policy.entry_for(posted) == policy.entry_for(request([], method="POST", body=b"{}"))
    # Credentials named in Connection are not sent either, so they do not partition the entry.
    assert policy.entry_for(request([("Authorization", "Bearer x"), ("Connection", "authorization")])) == \
        policy.entry_for(request([]))


@pytest.mark.parametrize("moved", ["https://staging.example.org/v1", "https://api.example.org:8443/v1",
                                   "http://api.example.org/v1", "https://api.example.org/v2"])
def test_a_mapping_pointed_elsewhere_starts_from_misses(moved: str) -> None:
    again = validate_config({"domain_mappings": {"api": {"upstream": moved}}}).domains["api"]
    before = request([])
    after = ProxyRequest(again, before.method, before.path, before.query, [], b"", {})
    assert policy.entry_for(after) != policy.entry_for(before)
    same = validate_config({"domain_mappings": {"api": {"upstream": "https://API.example.org:443/v1/"}}})
    assert same.domains["api"].upstream_id == API.upstream_id == "https://api.example.org:443/v1"


def test_repeated_request_headers_are_one_field_as_sent() -> None:
    sent = forwardable_request_headers([("Accept", "a/b"), ("accept", "c/d"), ("Cookie", "x=1"), ("Cookie", "y=2")])
    assert sent == {"Accept": "a/b, c/d", "Cookie": "x=1; y=2"}


@pytest.mark.parametrize("value", ["private", "no-store", "PRIVATE", "public, No-Store", 'private, max-age=60'])
def test_private_and_no_store_answers_are_neither_stored_nor_shared(value: str) -> None:
    decision = policy.storage(API, answer(("Cache-Control", value)))
    assert decision.ttl is None and not decision.shareable


def test_vary_star_is_neither_stored_nor_shared() -> None:
    decision = policy.storage(API, answer(("Vary", "Accept, *")))
    assert decision.ttl is None and not decision.shareable


def test_private_fields_are_dropped_from_the_stored_copy() -> None:
    decision = policy.storage(API, answer(("Cache-Control", 'private="Set-Cookie, X-User"')))
    assert decision.ttl == API.ttl_seconds and decision.shareable
    assert decision.drop == {"set-cookie", "x-user"}


def test_vary_adds_only_headers_not_already_in_the_key() -> None:
    decision = policy.storage(API, answer(("Vary", "Accept, Accept-Encoding"), ("Vary", "X-Tenant, authorization")))
    assert decision.vary == ("x-tenant",) and decision.ttl == API.ttl_seconds


def test_a_mapping_may_opt_out_of_upstream_cache_control() -> None:
    lax = SETTINGS.domains["lax"]
    decision = policy.storage(lax, answer(("Cache-Control", "private, no-store"), ("Vary", "X-Tenant, *")))
    assert decision == policy.Storage(lax.ttl_seconds)


@pytest.mark.parametrize(("status", "ttl"), [(200, "ttl"), (203, "ttl"), (206, None), (404, "neg"), (410, "neg"),
                                              (301, None), (429, None), (500, None), (503, None)])
def test_what_each_status_is_kept_for(status: int, ttl: str | None) -> None:
    expected = {"ttl": API.ttl_seconds, "neg": API.negative_ttl_seconds, None: None}[ttl]
    assert policy.storage(API, answer(status=status)).ttl == expected
    assert policy.storage(API, answer(status=status)).shareable  # errors are shared with coalesced requests


def test_an_answer_without_a_whole_body_is_never_stored() -> None:
    streamed = ProxyResult(200, "OK", [], stream=iter([b"x"]))
    assert policy.storage(API, streamed).ttl is None


def test_followers_take_a_varying_answer_only_with_the_same_values() -> None:
    primary = "p" * 64
    alice = {"X-Tenant": "a", "Accept": "x"}
    kept = answer(("Vary", "X-Tenant"))
    kept.vary, kept.variant = ("x-tenant",), policy.variant_digest(primary, ("x-tenant",), alice)
    assert policy.follower_may_take(kept, primary, {"x-tenant": "a"})
    assert not policy.follower_may_take(kept, primary, {"X-Tenant": "b"})
    assert not policy.follower_may_take(kept, primary, {})
    assert policy.follower_may_take(answer(), primary, {"X-Tenant": "b"})


NOW = 1_800_000_000.0


@pytest.mark.parametrize(("value", "seconds"), [
    ("120", 120.0), (" 7 ", 7.0), ("0", 0.0),
    ("²", None), ("١٢", None), ("-5", None), ("1.5", None), ("+5", None), ("soon", None), ("", None),
    ("9" * 400, 1e12),
    (format_datetime(datetime.fromtimestamp(NOW + 90, timezone.utc), usegmt=True), 90.0),
    (format_datetime(datetime.fromtimestamp(NOW - 90, timezone.utc), usegmt=True), 0.0),
])
def test_retry_after_is_ascii_delta_seconds_or_an_http_date(value: str, seconds: float | None) -> None:
    assert policy.retry_after_seconds(value, NOW) == seconds


@pytest.mark.parametrize(("value", "said"), [
    ("private", policy.Privacy(True, False, frozenset())),
    ("NO-STORE", policy.Privacy(False, True, frozenset())),
    ('private="x", private', policy.Privacy(True, False, frozenset({"x"}))),
    ('Private="Set-Cookie, X-User", max-age=60', policy.Privacy(False, False, frozenset({"set-cookie", "x-user"}))),
    ("public, max-age=60", policy.Privacy(False, False, frozenset())),
    ("private;", None), ('private=""', None), ("private=*", None), ("max-age=60;", None), ("private x", None),
])
def test_cache_control_is_read_strictly_for_what_may_not_be_shared(value: str, said: policy.Privacy | None) -> None:
    assert policy.privacy(value) == said


@pytest.mark.parametrize("headers", [
    [("Cache-Control", "private"), ("Connection", "Cache-Control")],  # hop-by-hop for the client, still ours
    [("Cache-Control", "private\x0b")],  # unreadable: dropped for the client, never trusted as 'not private'
    [("Vary", "X-Tenant\x0b")],
    [("Vary", "X-Tenant X-Other")],  # not a list of names
])
def test_privacy_is_judged_on_the_headers_the_upstream_sent(headers: list[tuple[str, str]]) -> None:
    from buddy.upstream import client_response_headers

    fetched = ProxyResult(200, "OK", client_response_headers(headers, False), b"{}", upstream_headers=headers)
    decision = policy.storage(API, fetched)
    assert decision.ttl is None and not decision.shareable


@pytest.mark.parametrize("value", ["9" * 5000, "Mon, 01 Jan 99999999999 00:00:00 GMT"])
def test_an_absurd_retry_after_is_capped_or_ignored_never_an_error(value: str) -> None:
    assert policy.retry_after_seconds(value, NOW) in (1e12, None)
