"""The cache policy on plain values, one table per section of RFC 9111 (and of RFC 9110 and 5861 where they apply):
what is keyed, stored, for how long, reused, revalidated and invalidated. Nothing here runs a server."""
from __future__ import annotations

import math
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import Any

import pytest

from buddy import policy
from buddy.forwarding import client_response_headers, forwardable_request_headers
from buddy.messages import ProxyRequest, ProxyResult, StoredRules
from buddy.settings import validate_config

NOW = 1_800_000_000.0
SETTINGS = validate_config({"domain_mappings": {
    "api": {"upstream": "https://api.example.org/v1", "ttl_seconds": 3600},
    "lax": {"upstream": "https://api.example.org/v1", "respect_upstream_cache_control": False},
    "std": {"upstream": "https://api.example.org/v1", "ttl_seconds": 3600, "ttl_from_upstream": True,
            "stale_if_error_seconds": 600, "stale_while_revalidate_seconds": 0},
}})
API, STD = SETTINGS.domains["api"], SETTINGS.domains["std"]


def http_date(at: float) -> str:
    return format_datetime(datetime.fromtimestamp(at, timezone.utc), usegmt=True)


def request(headers: list[tuple[str, str]], domain: str = "api", method: str = "GET",
            body: bytes = b"") -> ProxyRequest:
    mapping = SETTINGS.domains[domain]
    return ProxyRequest(mapping, method, "/v1/items", "q=1", headers, body, forwardable_request_headers(headers))


def answer(*headers: tuple[str, str], status: int = 200, took: float = 0.0) -> ProxyResult:
    """An upstream's answer received at NOW (after `took` seconds), as UpstreamClient reads it."""
    sent = [("Content-Type", "application/json"), *headers]
    return ProxyResult(status, "OK", client_response_headers(sent, False), b"{}", stored_at=NOW,
                       fetch_ms=int(took * 1000), upstream_headers=sent)


def stored(age: float, fresh_for: float | None = 60, headers: list[tuple[str, str]] | None = None,
           rules: StoredRules | None = None) -> ProxyResult:
    """An entry stored `age` seconds before NOW."""
    return ProxyResult(200, "OK", headers or [], b"{}", stored_at=NOW - age, fresh_for=fresh_for, rules=rules)


# -- the key ---------------------------------------------------------------------------------------------------


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


@pytest.mark.parametrize(("method", "header", "kept_upstream", "cacheable"), [
    ("GET", "If-None-Match", False, True),  # the proxy answers it: no part of the key, never upstream
    ("HEAD", "If-Modified-Since", False, True),
    ("POST", "If-None-Match", True, False),  # a precondition on a POST is the upstream's to judge
    ("PUT", "If-None-Match", True, False),
    ("GET", "If-Match", True, False),  # preconditions and ranges ask about the client's own copy: through
    ("GET", "Range", True, False),
    ("GET", "If-Range", True, False),
])
def test_a_clients_conditional_get_is_the_proxys_to_answer(method: str, header: str, kept_upstream: bool,
                                                           cacheable: bool) -> None:
    forwarded, asked = policy.conditions(method, {"Accept": "a/b", header: '"v1"'})
    assert (header in forwarded) is kept_upstream and bool(asked) is not kept_upstream
    mapped = ProxyRequest(API, method, "/v1/items", "", [], b"", forwarded, conditions=asked)
    assert policy.cacheable_request(mapped) is cacheable
    if not kept_upstream:
        assert policy.entry_for(mapped) == policy.entry_for(ProxyRequest(API, method, "/v1/items", "", [], b"",
                                                                         {"Accept": "a/b"}))


def test_followers_take_a_varying_answer_only_with_the_same_values() -> None:
    primary = "p" * 64
    alice = {"X-Tenant": "a", "Accept": "x"}
    kept = answer(("Vary", "X-Tenant"))
    kept.vary, kept.variant = ("x-tenant",), policy.variant_digest(primary, ("x-tenant",), alice)
    assert policy.follower_may_take(kept, primary, {"x-tenant": "a"})
    assert not policy.follower_may_take(kept, primary, {"X-Tenant": "b"})
    assert not policy.follower_may_take(kept, primary, {})
    assert policy.follower_may_take(answer(), primary, {"X-Tenant": "b"})


# -- RFC 9111 3: storing responses -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["private", "no-store", "PRIVATE", "public, No-Store", "private, max-age=60"])
def test_3_private_and_no_store_answers_are_neither_stored_nor_shared(value: str) -> None:
    for mapping in (API, STD):
        decision = policy.storage(mapping, answer(("Cache-Control", value)))
        assert decision.ttl is None and not decision.shareable


@pytest.mark.parametrize("headers", [
    [("Vary", "Accept, *")],
    [("Cache-Control", "private"), ("Connection", "Cache-Control")],  # hop-by-hop for the client, still ours
    [("Cache-Control", "private\x0b")],  # unreadable: dropped for the client, never trusted as 'not private'
    [("Cache-Control", "private;")], [("Cache-Control", 'private=""')], [("Cache-Control", "max-age=60;")],
    [("Vary", "X-Tenant\x0b")],
    [("Vary", "X-Tenant X-Other")],  # not a list of names
])
def test_3_an_answer_whose_privacy_cannot_be_read_is_neither_stored_nor_shared(headers: list) -> None:
    decision = policy.storage(API, answer(*headers))
    assert decision.ttl is None and not decision.shareable


def test_3_private_fields_are_dropped_from_the_stored_copy() -> None:
    decision = policy.storage(API, answer(("Cache-Control", 'private="Set-Cookie, X-User"')))
    assert decision.ttl == API.ttl_seconds and decision.shareable and decision.drop == {"set-cookie", "x-user"}


def test_3_vary_adds_only_headers_not_already_in_the_key() -> None:
    decision = policy.storage(API, answer(("Vary", "Accept, Accept-Encoding"), ("Vary", "X-Tenant, authorization")))
    assert decision.vary == ("x-tenant",) and decision.ttl == API.ttl_seconds


def test_3_a_mapping_may_opt_out_of_upstream_cache_control() -> None:
    lax = SETTINGS.domains["lax"]
    decision = policy.storage(lax, answer(("Cache-Control", "private, no-store"), ("Vary", "X-Tenant, *")))
    assert (decision.ttl, decision.vary, decision.shareable) == (lax.ttl_seconds, (), True)


@pytest.mark.parametrize(("status", "kept"), [(200, "ttl"), (203, "ttl"), (206, None), (404, "neg"), (410, "neg"),
                                              (301, None), (429, None), (500, None), (503, None)])
def test_3_reference_mode_keeps_each_status_for_the_mappings_ttl(status: int, kept: str | None) -> None:
    expected = {"ttl": API.ttl_seconds, "neg": API.negative_ttl_seconds, None: None}[kept]
    decision = policy.storage(API, answer(("Cache-Control", "max-age=5"), status=status))
    assert decision.ttl == expected and decision.shareable  # errors are shared with coalesced requests


def test_3_an_answer_without_a_whole_body_is_never_stored() -> None:
    assert policy.storage(API, ProxyResult(200, "OK", [], stream=iter([b"x"]))).ttl is None


@pytest.mark.parametrize(("status", "headers", "ttl"), [
    (200, [], None),  # neither freshness nor a validator: it could never be used again
    (200, [("ETag", '"a"')], 0.0),  # a validator only: stored stale, to be revalidated before use
    (201, [("Last-Modified", http_date(NOW - 86400)), ("Date", http_date(NOW))], None),  # no heuristic for 201
    (202, [("Last-Modified", http_date(NOW - 86400)), ("Date", http_date(NOW))], None),
    (201, [("Cache-Control", "max-age=60")], 60.0),  # explicit freshness: any stored status
    (200, [("Cache-Control", "max-age=0")], None),
    (200, [("Cache-Control", "max-age=0"), ("ETag", '"a"')], 0.0),
    (200, [("Cache-Control", "max-age=10000, no-cache"), ("ETag", '"a"')], 0.0),  # stored, asked again each time
    (200, [("Cache-Control", "max-age=10000, no-cache")], None),  # ... without a validator, never reusable
])
def test_3_standards_mode_stores_only_what_it_can_reuse(status: int, headers: list, ttl: float | None) -> None:
    assert policy.storage(STD, answer(*headers, status=status)).ttl == ttl


# -- RFC 9111 4.2.1: freshness lifetime --------------------------------------------------------------------------


@pytest.mark.parametrize(("headers", "lifetime"), [
    ([("Cache-Control", "max-age=60")], 60.0),
    ([("Cache-Control", "s-maxage=30, max-age=60")], 30.0),  # a shared cache takes s-maxage first
    ([("Cache-Control", "max-age=60"), ("Expires", http_date(NOW + 600)), ("Date", http_date(NOW))], 60.0),
    ([("Expires", http_date(NOW + 600)), ("Date", http_date(NOW))], 600.0),
    ([("Expires", http_date(NOW - 30 * 86400)), ("Date", http_date(NOW))], 0.0),  # 30 days in the past
    ([("Expires", "0"), ("Date", http_date(NOW))], 0.0),  # invalid: already expired (5.3)
    ([("Expires", "next tuesday"), ("Date", http_date(NOW))], 0.0),
    ([("Cache-Control", "max-age='3600'")], 0.0),  # invalid values are no freshness: fail closed
    ([("Cache-Control", 'max-age="3600"')], 0.0),
    ([("Cache-Control", "max-age=-5")], 0.0),
    ([("Cache-Control", "max-age=later")], 0.0),
    ([("Cache-Control", "max-age=3600, max-age=10")], 0.0),  # which one was meant? neither
    ([("Cache-Control", "max-age=99999999999999999999")], float(2**31)),  # too large: 2^31 (1.2.2)
    ([], None),
])
def test_4_2_1_the_lifetime_comes_from_s_maxage_then_max_age_then_expires(headers: list,
                                                                        lifetime: float | None) -> None:
    result = answer(*headers)
    control = policy.cache_control(policy.field_value(result.upstream_headers or [], "Cache-Control"))
    assert policy.freshness_lifetime(200, result.upstream_headers or [], control) == lifetime


def test_4_2_1_freshness_never_outlasts_the_mappings_ttl() -> None:
    assert policy.storage(STD, answer(("Cache-Control", "max-age=999999"))).ttl == 3600
    assert policy.storage(API, answer(("Cache-Control", "max-age=60"))).ttl == 3600  # reference mode: the TTL


# -- RFC 9111 4.2.2: heuristic freshness ---------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "lifetime"), [(200, 8640.0), (203, 8640.0), (404, 8640.0), (410, 8640.0),
                                                  (201, None), (202, None), (500, None)])
def test_4_2_2_a_tenth_of_the_time_since_last_modified_for_heuristically_cacheable_statuses(
        status: int, lifetime: float | None) -> None:
    headers = [("Last-Modified", http_date(NOW - 86400)), ("Date", http_date(NOW))]
    assert policy.freshness_lifetime(status, headers, policy.cache_control("")) == lifetime


def test_4_2_2_heuristic_freshness_is_capped_by_the_mapping() -> None:
    old = answer(("Last-Modified", http_date(NOW - 10 * 365 * 86400)), ("Date", http_date(NOW)))
    assert policy.storage(STD, old).ttl == 3600


# -- RFC 9111 4.2.3: age -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("headers", "took", "age"), [
    ([], 0.0, 0.0),
    ([("Age", "30")], 0.0, 30.0),
    ([("Age", "30")], 2.0, 32.0),  # corrected by the time the answer took to arrive
    ([("Age", "7200, 0")], 0.0, 7200.0),  # list-valued: the first member
    ([("Age", "soon")], 0.0, 0.0),  # invalid: ignored
    ([("Date", http_date(NOW - 100))], 0.0, 100.0),  # apparent age, from the upstream's Date
    ([("Date", http_date(NOW - 100)), ("Age", "200")], 0.0, 200.0),  # the larger of the two
])
def test_4_2_3_an_answers_initial_age(headers: list, took: float, age: float) -> None:
    decision = policy.storage(STD, answer(("Cache-Control", "max-age=1000"), ("ETag", '"a"'), *headers, took=took))
    assert decision.rules.initial_age == pytest.approx(age, abs=1.0)


def test_4_2_3_age_counts_against_freshness_and_is_reported_whole() -> None:
    assert policy.storage(STD, answer(("Cache-Control", "max-age=3600"), ("Age", "7200, 0"))).ttl is None
    assert policy.storage(STD, answer(("Cache-Control", "max-age=3600"), ("Age", "600"))).ttl == pytest.approx(3000)
    passed = answer(("Expires", http_date(NOW + 100)), ("Date", http_date(NOW)), ("Age", "200"), ("ETag", '"a"'))
    assert policy.storage(STD, passed).ttl == 0  # Expires already passed by Age: stored stale, revalidated
    entry = stored(age=10, rules=StoredRules(initial_age=30))
    assert policy.age(entry, NOW) == pytest.approx(40)  # the Age a hit says: added to, not replaced


# -- RFC 9111 4.2.4 and RFC 5861: serving stale ---------------------------------------------------------------------


PLAIN = policy.RequestControl()


@pytest.mark.parametrize(("age", "control", "use"), [
    (10, PLAIN, policy.Use.FRESH),
    (61, PLAIN, policy.Use.ASK),
    (10, policy.RequestControl(no_cache=True), policy.Use.ASK),
    (10, policy.RequestControl(max_age=5), policy.Use.ASK),
    (10, policy.RequestControl(max_age=20), policy.Use.FRESH),
    (50, policy.RequestControl(min_fresh=20), policy.Use.ASK),
    (70, policy.RequestControl(max_stale=30), policy.Use.STALE),
    (100, policy.RequestControl(max_stale=30), policy.Use.ASK),
    (70, policy.RequestControl(max_stale=math.inf, max_age=65), policy.Use.ASK),
])
def test_5_2_1_what_the_clients_directives_let_an_entry_answer(age: float, control: policy.RequestControl,
                                                               use: policy.Use) -> None:
    assert policy.reuse(API, stored(age), control, NOW).use is use


def test_4_2_4_the_mappings_stale_windows_in_reference_mode() -> None:
    up = validate_config({"domain_mappings": {"up": {"upstream": "https://example.org", "stale_if_error_seconds": 100,
                                                     "stale_while_revalidate_seconds": 10}}}).domains["up"]
    picky = policy.RequestControl(max_age=3600)
    assert policy.reuse(up, stored(65), PLAIN, NOW) == policy.Reuse(policy.Use.STALE, refresh=True)
    assert policy.reuse(up, stored(75), PLAIN, NOW) == policy.Reuse(policy.Use.ASK, stand_in=True)
    assert policy.reuse(up, stored(170), PLAIN, NOW) == policy.Reuse(policy.Use.ASK, stand_in=False)
    assert policy.reuse(up, stored(65), picky, NOW) == policy.Reuse(policy.Use.ASK)  # never stale unasked
    assert policy.reuse(up, stored(10**6), PLAIN, NOW, offline=True).use is policy.Use.STALE  # whatever is kept
    assert policy.reuse(up, stored(10**6, fresh_for=None), PLAIN, NOW).use is policy.Use.FRESH  # an older entry
    assert up.grace == 100 and policy.kept_for(up, 60) == 160


@pytest.mark.parametrize("control", ["max-age=1, must-revalidate", "max-age=1, proxy-revalidate",
                                     "max-age=1, s-maxage=1", "max-age=1, no-cache"])
def test_4_2_4_what_the_upstream_forbids_is_never_served_stale(control: str) -> None:
    decision = policy.storage(STD, answer(("Cache-Control", control), ("ETag", '"a"')))
    entry = stored(age=5, fresh_for=decision.ttl, rules=decision.rules, headers=[("ETag", '"a"')])
    for client in (PLAIN, policy.RequestControl(max_stale=math.inf)):
        assert policy.reuse(STD, entry, client, NOW) == policy.Reuse(policy.Use.ASK, validators=(("If-None-Match",
                                                                                                 '"a"'),))
    assert policy.reuse(STD, entry, PLAIN, NOW, offline=True).use is policy.Use.ASK  # offline: a 504, not stale


def test_4_2_4_reference_mode_reads_must_revalidate_as_the_upstream_sent_it() -> None:
    hidden = policy.storage(API, answer(("Cache-Control", "must-revalidate"), ("Connection", "Cache-Control")))
    entry = stored(age=3700, fresh_for=hidden.ttl, rules=hidden.rules)
    assert policy.reuse(API, entry, PLAIN, NOW).stand_in is False
    legacy = stored(age=3700, fresh_for=3600, headers=[("Cache-Control", "max-age=60, Must-Revalidate")])
    assert policy.reuse(API, legacy, PLAIN, NOW).stand_in is False  # stored by an older version: its headers say
    ignoring = SETTINGS.domains["lax"]
    assert policy.reuse(ignoring, legacy, PLAIN, NOW).stand_in is True


@pytest.mark.parametrize(("directive", "age", "reuse"), [
    ("stale-while-revalidate=30", 20, policy.Reuse(policy.Use.STALE, refresh=True)),
    ("stale-while-revalidate=30", 40, policy.Reuse(policy.Use.ASK, stand_in=True)),  # the mapping's 600 s
    ("stale-if-error=5", 20, policy.Reuse(policy.Use.ASK, stand_in=False)),  # the upstream's own, shorter
    ("stale-if-error=5", 3, policy.Reuse(policy.Use.ASK, stand_in=True)),
    ("stale-if-error=99999999", 500, policy.Reuse(policy.Use.ASK, stand_in=True)),
    ("stale-if-error=99999999", 650, policy.Reuse(policy.Use.ASK, stand_in=False)),  # kept 600 s, no longer
])
def test_rfc5861_an_upstreams_stale_directives_in_standards_mode(directive: str, age: float,
                                                                 reuse: policy.Reuse) -> None:
    decision = policy.storage(STD, answer(("Cache-Control", f"max-age=0, {directive}"), ("Last-Modified",
                                                                                       http_date(NOW - 10))))
    entry = stored(age=age, fresh_for=decision.ttl, rules=decision.rules)
    found = policy.reuse(STD, entry, PLAIN, NOW)
    assert (found.use, found.refresh, found.stand_in) == (reuse.use, reuse.refresh, reuse.stand_in)


# -- RFC 9111 4.3: validation ----------------------------------------------------------------------------------------


def test_4_3_1_an_expired_entry_is_asked_about_by_its_validators() -> None:
    entry = stored(age=100, headers=[("ETag", 'W/"v1"'), ("Last-Modified", http_date(NOW - 1000))])
    assert policy.reuse(API, entry, PLAIN, NOW).validators == (
        ("If-None-Match", 'W/"v1"'), ("If-Modified-Since", http_date(NOW - 1000)))
    assert policy.reuse(API, stored(age=100, headers=[("Last-Modified", "yesterday")]), PLAIN, NOW).validators == ()


def test_4_3_4_a_304_replaces_the_stored_fields_but_not_the_body_or_its_framing() -> None:
    entry = stored(age=100, headers=[("ETag", '"v1"'), ("Content-Length", "2"), ("Cache-Control", "max-age=60"),
                                     ("X-Kept", "old")])
    not_modified = answer(("ETag", '"v1"'), ("Cache-Control", "max-age=600"), ("Content-Length", "0"), status=304)
    merged = policy.freshened(entry, not_modified, not_modified.headers)
    assert merged is not None and merged.body == b"{}" and merged.stored_at == NOW
    assert merged.header("Cache-Control") == "max-age=600" and merged.header("X-Kept") == "old"
    assert merged.header("Content-Length") == "2"


@pytest.mark.parametrize(("stored_tag", "new_tag", "applies"), [
    ('"v1"', '"v1"', True), ('"v1"', '"v2"', False), ('W/"v1"', '"v1"', False), ('W/"v1"', 'W/"v1"', True),
    ('"v1"', "", True),
])
def test_4_3_4_a_304_about_another_representation_freshens_nothing(stored_tag: str, new_tag: str,
                                                                   applies: bool) -> None:
    entry = stored(age=100, headers=[("ETag", stored_tag)])
    not_modified = answer(*([("ETag", new_tag)] if new_tag else []), status=304)
    assert (policy.freshened(entry, not_modified, not_modified.headers) is not None) is applies


# -- RFC 9111 4.4: invalidation ----------------------------------------------------------------------------------------

URL = "https://api.example.org/v1/items/7"


@pytest.mark.parametrize(("method", "status", "headers", "urls"), [
    ("POST", 200, [], (URL,)),
    ("PUT", 204, [], (URL,)),
    ("DELETE", 200, [("Location", "/v1/items")], (URL, "https://api.example.org/v1/items")),
    ("PATCH", 303, [("Content-Location", "https://api.example.org/v1/items/7?v=2")],
     (URL, "https://api.example.org/v1/items/7?v=2")),
    ("POST", 201, [("Location", "https://elsewhere.example/x")], (URL,)),  # another upstream: not ours
    ("POST", 201, [("Location", "https://api.example.org/v2/x")], (URL,)),  # outside the mapping
    ("PURGE", 200, [], (URL,)),  # a method whose safety is unknown counts as unsafe
    ("POST", 404, [], ()), ("DELETE", 500, [], ()),  # an error changed nothing
    ("GET", 200, [], ()), ("HEAD", 200, [], ()), ("OPTIONS", 200, [], ()),
])
def test_4_4_a_non_error_answer_to_an_unsafe_request_invalidates_its_target(method: str, status: int, headers: list,
                                                                            urls: tuple) -> None:
    assert policy.invalidated_urls(API, method, URL, answer(*headers, status=status)) == urls


# -- RFC 9110 13: a client's conditional request -----------------------------------------------------------------------


@pytest.mark.parametrize(("asked", "headers", "status", "modified"), [
    ([("If-None-Match", '"v1"')], [("ETag", '"v1"')], 200, False),
    ([("If-None-Match", 'W/"v1"')], [("ETag", '"v1"')], 200, False),  # weak comparison (13.1.2)
    ([("If-None-Match", '"v0", "v1"')], [("ETag", 'W/"v1"')], 200, False),
    ([("If-None-Match", '"v2"')], [("ETag", '"v1"')], 200, True),
    ([("If-None-Match", "*")], [("ETag", '"v1"')], 200, False),
    ([("If-None-Match", '"v1"')], [], 200, True),
    ([("If-Modified-Since", http_date(NOW))], [("Last-Modified", http_date(NOW - 60))], 200, False),
    ([("If-Modified-Since", http_date(NOW - 120))], [("Last-Modified", http_date(NOW - 60))], 200, True),
    ([("If-Modified-Since", "yesterday")], [("Last-Modified", http_date(NOW - 60))], 200, True),
    # If-None-Match first: with it, If-Modified-Since is not looked at (13.2.2)
    ([("If-None-Match", '"v2"'), ("If-Modified-Since", http_date(NOW))],
     [("ETag", '"v1"'), ("Last-Modified", http_date(NOW - 60))], 200, True),
    ([("If-None-Match", '"v1"')], [("ETag", '"v1"')], 404, True),  # only a 200 becomes a 304
])
def test_13_a_conditional_get_is_answered_304_when_the_answer_matches(asked: list, headers: list, status: int,
                                                                      modified: bool) -> None:
    result = ProxyResult(status, "OK", headers, b"{}")
    assert policy.not_modified(tuple(asked), result) is not modified


def test_15_4_5_a_304_carries_what_a_cache_needs_and_no_content() -> None:
    full = ProxyResult(200, "OK", [("Content-Type", "application/json"), ("ETag", '"v1"'),
                                   ("Cache-Control", "max-age=9"), ("Vary", "Accept"), ("Date", http_date(NOW)),
                                   ("X-Other", "x")], b"{}", cache="HIT")
    answered = policy.as_not_modified(full)
    assert (answered.status, answered.body, answered.cache) == (304, b"", "HIT")
    assert [name for name, _ in answered.headers] == ["ETag", "Cache-Control", "Vary", "Date"]


# -- RFC 9111 5.2: reading Cache-Control -------------------------------------------------------------------------------


@pytest.mark.parametrize("cache_control, pragma, expected", [
    ("no-cache", "", policy.RequestControl(no_cache=True)),
    ("No-Cache, No-Store", "", policy.RequestControl(no_cache=True, no_store=True)),
    ("", "no-cache", policy.RequestControl(no_cache=True)),
    ("max-age=0", "no-cache", policy.RequestControl(max_age=0)),  # Pragma only counts without Cache-Control
    ("max-stale", "", policy.RequestControl(max_stale=math.inf)),
    ("max-stale=30, min-fresh=5", "", policy.RequestControl(max_stale=30, min_fresh=5)),
    ("max-age=-3", "", policy.RequestControl()),  # not delta-seconds: ignored
    ("max-age=soon", "", policy.RequestControl()),
    ("only-if-cached", "", policy.RequestControl(only_if_cached=True)),
])
def test_5_2_1_request_directives_are_read_case_insensitively(cache_control: str, pragma: str,
                                                              expected: policy.RequestControl) -> None:
    assert policy.request_control(cache_control, pragma) == expected


@pytest.mark.parametrize(("value", "readable", "seconds"), [
    ("max-age=60, public", True, 60.0),
    ('private="x", private', True, None),
    ("private x", False, None),
    ("max-age=60;", False, None),
    ('max-age="60"', True, -1),  # readable, but not delta-seconds: no freshness
])
def test_5_2_cache_control_is_read_strictly(value: str, readable: bool, seconds: Any) -> None:
    said = policy.cache_control(value)
    assert said.readable is readable and said.seconds("max-age") == seconds


NOW_PLUS = http_date(NOW + 90)


@pytest.mark.parametrize(("value", "seconds"), [
    ("120", 120.0), (" 7 ", 7.0), ("0", 0.0),
    ("²", None), ("١٢", None), ("-5", None), ("1.5", None), ("+5", None), ("soon", None), ("", None),
    ("9" * 400, 1e12), (NOW_PLUS, 90.0), (http_date(NOW - 90), 0.0),
    ("Mon, 01 Jan 99999999999 00:00:00 GMT", None),
])
def test_retry_after_is_ascii_delta_seconds_or_an_http_date(value: str, seconds: float | None) -> None:
    assert policy.retry_after_seconds(value, NOW) == seconds
