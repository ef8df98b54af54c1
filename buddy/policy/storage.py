"""What to do with an answer the upstream gave: store it (how long, keyed on what, with which rules), share it.

Two modes, one set of HTTP rules:
- reference mode (the default): an answer is fresh for the mapping's `ttl_seconds` (2xx) or
  `negative_ttl_seconds` (404, 410), whatever the upstream says about freshness; 5xx, 429 and 206 never;
- standards mode (`ttl_from_upstream`): RFC 9111. Freshness comes from s-maxage, else max-age, else Expires less
  Date (4.2.1), else, for a heuristically cacheable status with a Last-Modified, a tenth of its age (4.2.2), less the
  answer's corrected initial age (4.2.3); never longer than the mapping's TTL. `no-cache` stores it stale (asked
  again before every use); an answer with neither freshness nor a validator is not stored, since it could never
  be reused; one with a validator but no freshness is stored stale, to be revalidated.
In both, unless the mapping sets `respect_upstream_cache_control = false`: `private`, `no-store`, `Vary: *` or a
Cache-Control or Vary that cannot be read means neither stored nor shared; `private="Field"` keeps the answer
without those fields; `must-revalidate` and `proxy-revalidate` (and in standards mode `s-maxage` and `no-cache`)
forbid answering with it once stale. Everything is read from the headers as the upstream sent them, before any
was dropped for the client (a `Connection: Cache-Control` must not hide `private`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable

from werkzeug.http import parse_etags, unquote_etag

from buddy.messages import ProxyResult, StoredRules
from buddy.policy.directives import INVALID, CacheControl, age_value, cache_control, field_value, http_time
from buddy.policy.keys import response_vary
from buddy.settings import DomainSettings

# RFC 9110 15.1: the statuses a cache may give heuristic freshness (of those this proxy stores at all).
HEURISTIC_STATUSES = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})
HEURISTIC_FRACTION = 0.1  # of the time since Last-Modified (RFC 9111 4.2.2's example, and what caches use)
# RFC 9111 3.2: what a 304 must not replace in the stored answer (its body's framing is the stored body's).
NOT_FRESHENED = frozenset({"content-length", "content-encoding", "transfer-encoding", "content-range"})


@dataclass(frozen=True)
class Storage:
    """The decision for an upstream answer: store it fresh for `ttl` seconds from now (0: stored stale, to be
    revalidated before use; None: not stored), keyed also on `vary`, shared with waiting requests or not, without
    the `drop` fields, with these `rules` for when it is stale."""

    ttl: float | None
    vary: tuple[str, ...] = ()
    shareable: bool = True
    drop: frozenset[str] = frozenset()
    rules: StoredRules = StoredRules()


NOT_SHARED = Storage(None, shareable=False)


def upstream_fields(result: ProxyResult) -> list[tuple[str, str]]:
    """An answer's headers as the upstream sent them (a stored entry's: as stored)."""
    return result.upstream_headers if result.upstream_headers is not None else result.headers


def ttl_for(domain: DomainSettings, status: int) -> int | None:
    """2xx for the domain's TTL, 404/410 for the negative TTL, nothing else (never 5xx, 429 or 206)."""
    if 200 <= status < 300 and status != 206:
        return domain.ttl_seconds
    if status in (404, 410):
        return domain.negative_ttl_seconds
    return None


def initial_age(fields: list[tuple[str, str]], received: float, took: float) -> float:
    """RFC 9111 4.2.3: how old an answer was when it arrived, from its Age, its Date and how long the fetch took
    (`received`: when it arrived; `took`: seconds since the request was sent)."""
    date = http_time(field_value(fields, "Date") or "")
    apparent = max(0.0, received - date) if date is not None else 0.0
    corrected = age_value(fields) + max(0.0, took)
    return max(apparent, corrected)


def storage(domain: DomainSettings, result: ProxyResult, took: float | None = None) -> Storage:
    """Whether (and how) an upstream answer with a whole body may be stored and shared. `took`: seconds from
    sending the request to the answer, when not the answer's own fetch_ms (a 304 that freshened a stored one)."""
    ceiling = ttl_for(domain, result.status) if result.body is not None else None
    fields = upstream_fields(result)
    age = initial_age(fields, result.stored_at, result.fetch_ms / 1000 if took is None else took)
    vary: tuple[str, ...] = ()
    drop: frozenset[str] = frozenset()
    if not domain.respect_upstream_cache_control:
        if not domain.ttl_from_upstream:
            return Storage(ceiling, rules=StoredRules(age))
        control = cache_control(field_value(fields, "Cache-Control"))
    else:
        vary_value, control = field_value(fields, "Vary"), cache_control(field_value(fields, "Cache-Control"))
        found = None if vary_value is None else response_vary(domain, vary_value)
        if found is None or not control.readable or control.has("private") or control.has("no-store"):
            return NOT_SHARED
        vary, drop = found, control.fields.get("private", frozenset())
    if ceiling is None:
        return Storage(None, vary, drop=drop)
    if not domain.ttl_from_upstream:
        no_stale = domain.respect_upstream_cache_control and (
            control.has("must-revalidate") or control.has("proxy-revalidate"))
        return Storage(ceiling, vary, drop=drop, rules=StoredRules(age, no_stale))
    return _standards(domain, result, fields, control, ceiling, age, vary, drop)


def _standards(domain: DomainSettings, result: ProxyResult, fields: list[tuple[str, str]], control: CacheControl,
               ceiling: int, age: float, vary: tuple[str, ...], drop: frozenset[str]) -> Storage:
    if not control.readable or control.has("no-store"):
        return Storage(None, vary, drop=drop)
    lifetime = freshness_lifetime(result.status, fields, control)
    validated = has_validator(fields)
    if lifetime is None and (not validated or result.status not in HEURISTIC_STATUSES):
        # No freshness and no validator: it could never be used again. And without explicit freshness, only a
        # status cacheable by default may be stored at all (RFC 9111 3): not a 201 or a 202.
        return Storage(None, vary, drop=drop)
    no_cache = control.has("no-cache") or "no-cache" in control.fields
    fresh = 0.0 if no_cache or lifetime is None else min(float(ceiling), max(0.0, lifetime - age))
    if fresh <= 0 and not validated:
        return Storage(None, vary, drop=drop)
    rules = StoredRules(
        initial_age=age,
        no_stale=no_cache or any(control.has(n) for n in ("must-revalidate", "proxy-revalidate", "s-maxage")),
        while_revalidate=_window(control, "stale-while-revalidate", domain),
        if_error=_window(control, "stale-if-error", domain),
    )
    return Storage(fresh, vary, drop=drop, rules=rules)


def freshness_lifetime(status: int, fields: list[tuple[str, str]], control: CacheControl) -> float | None:
    """RFC 9111 4.2.1-4.2.2 for a shared cache: s-maxage, else max-age, else Expires less Date, else a heuristic for
    the statuses that allow one; None when there is no freshness to be had (then only a validator makes it
    reusable). An invalid value is no freshness: 0 (4.2.1: consider it stale); an invalid Expires is in the past."""
    for name in ("s-maxage", "max-age"):
        seconds = control.seconds(name)
        if seconds is not None:
            return 0.0 if seconds == INVALID else float(seconds)
    expires_value = field_value(fields, "Expires")
    if expires_value:
        expires = http_time(expires_value)
        date = http_time(field_value(fields, "Date") or "")
        if expires is None or date is None:
            return 0.0  # an invalid Expires (`0`, a bad date) means already expired (5.3)
        return max(0.0, expires - date)
    if status in HEURISTIC_STATUSES:
        modified = http_time(field_value(fields, "Last-Modified") or "")
        date = http_time(field_value(fields, "Date") or "")
        if modified is not None and date is not None and modified < date:
            return HEURISTIC_FRACTION * (date - modified)
    return None


def has_validator(fields: Iterable[tuple[str, str]]) -> bool:
    """An ETag or Last-Modified the upstream can be asked about (RFC 9110 8.8)."""
    listed = list(fields)
    return bool((field_value(listed, "ETag") or "").strip()) or http_time(
        field_value(listed, "Last-Modified") or "") is not None


def _window(control: CacheControl, name: str, domain: DomainSettings) -> float | None:
    """An upstream's stale-while-revalidate or stale-if-error (RFC 5861), within how long the mapping keeps an
    expired entry at all; None when it names none (or an unreadable one)."""
    seconds = control.seconds(name)
    if seconds is None or seconds == INVALID:
        return None
    return min(float(seconds), float(domain.grace))


def validators(entry: ProxyResult) -> tuple[tuple[str, str], ...]:
    """What makes a request for this entry conditional (RFC 9110 13.1): If-None-Match with its ETag, and
    If-Modified-Since with its Last-Modified; () when it has neither."""
    asked = []
    etag = entry.header("ETag").strip()
    if etag:
        asked.append(("If-None-Match", etag))
    modified = entry.header("Last-Modified").strip()
    if modified and http_time(modified) is not None:
        asked.append(("If-Modified-Since", modified))
    return tuple(asked)


def freshened(stored: ProxyResult, answer: ProxyResult, client_headers: list[tuple[str, str]]) -> ProxyResult | None:
    """RFC 9111 4.3.4: the stored answer updated by a 304 (`answer`), its header fields replacing the stored ones of
    the same name (but the body's framing, 3.2), received now; None when the 304 is about another representation
    (a strong ETag that is not the stored one), and the answer must be fetched whole. `client_headers`: the 304's
    fields as a client may get them (hop-by-hop ones gone)."""
    etag = answer.header("ETag").strip()
    ours = stored.header("ETag").strip()
    if etag and ours:
        theirs, weak = unquote_etag(etag)
        known = parse_etags(ours)
        if theirs is None or not (known.contains_weak(theirs) if weak else known.contains(theirs)):
            return None
    names = {name.lower() for name, _ in client_headers} - NOT_FRESHENED
    headers = [(n, v) for n, v in stored.headers if n.lower() not in names]
    headers += [(n, v) for n, v in client_headers if n.lower() in names]
    # Received now; what a hit on it saves is still what fetching it whole took.
    return replace(stored, headers=headers, upstream_headers=headers, stored_at=answer.stored_at, extra=[],
                   cache="MISS", rules=None)
