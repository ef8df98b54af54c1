"""What to do with a request given what is stored: answer with the entry, answer with it stale, or ask the upstream
(conditionally, when the entry has a validator); and how a client's own conditional is answered.

One decision per request (`reuse`), made from the entry, the rules it was stored with (buddy.policy.storage), the
client's Cache-Control (RFC 9111 5.2.1) and whether the proxy is offline; the service acts on it.
- Fresh, and as fresh as the client asks (max-age, min-fresh, no-cache): FRESH.
- Stale, and the entry may be used stale (no must-revalidate, proxy-revalidate, s-maxage or no-cache on it):
  STALE within the client's max-stale, or within stale-while-revalidate (then `refresh`: one refresh runs in the
  background), or offline. Otherwise ASK, and `stand_in` says whether the entry may answer if the upstream fails or
  the mapping is paused (stale-if-error). A client that bounds what it accepts (no-cache, max-age, min-fresh) never
  gets a stale answer it did not ask for.
- The stale windows are the mapping's (`stale_while_revalidate_seconds`, `stale_if_error_seconds`); in standards
  mode, an upstream's own stale-while-revalidate or stale-if-error (RFC 5861) replaces them, within how long the
  mapping keeps expired entries.
"""
from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass
from typing import NamedTuple

from werkzeug.http import parse_etags, unquote_etag

from buddy.messages import ProxyResult, StoredRules
from buddy.policy.directives import INVALID, cache_control, field_value, http_time
from buddy.policy.storage import validators
from buddy.settings import DomainSettings

# RFC 9110 15.4.5: what a 304 carries of the answer it stands for.
NOT_MODIFIED_FIELDS = frozenset({"cache-control", "content-location", "date", "etag", "expires", "vary"})


class RequestControl(NamedTuple):
    """The client's request Cache-Control (RFC 9111 5.2.1), or `Pragma: no-cache` when it sends none."""

    no_cache: bool = False  # fetch now (coalesced with others fetching now), store the result
    no_store: bool = False  # do not store this answer
    max_age: float | None = None  # only an entry at most this old
    max_stale: float | None = None  # accept an entry expired at most this long (math.inf: any)
    min_fresh: float | None = None  # only an entry fresh for at least this much longer
    only_if_cached: bool = False  # never upstream: 504 when the cache cannot answer

    @property
    def picky(self) -> bool:
        """Does the client bound what it accepts? Then the proxy never hands it a stale entry of its own accord."""
        return self.no_cache or self.max_age is not None or self.min_fresh is not None


def request_control(value: str, pragma: str = "") -> RequestControl:
    """Read the request's directives, case-insensitively; an unreadable number is ignored."""
    if not value.strip():
        return RequestControl(no_cache="no-cache" in pragma.lower())
    said = cache_control(value)

    def seconds(name: str) -> float | None:
        found = said.seconds(name)
        return None if found is None or found == INVALID else found

    return RequestControl(
        no_cache=said.has("no-cache"), no_store=said.has("no-store"), max_age=seconds("max-age"),
        max_stale=seconds("max-stale"), min_fresh=seconds("min-fresh"), only_if_cached=said.has("only-if-cached"),
    )


class Use(enum.Enum):
    FRESH = "HIT"  # answer with the entry
    STALE = "STALE"  # answer with the expired entry
    ASK = "ASK"  # ask the upstream


@dataclass(frozen=True)
class Reuse:
    """The decision for a request and what is stored for it (see the module's docstring)."""

    use: Use
    refresh: bool = False  # STALE within stale-while-revalidate: refresh it in the background
    stand_in: bool = False  # ASK: the expired entry may answer for a failed upstream or a paused mapping
    validators: tuple[tuple[str, str], ...] = ()  # ASK, and a refresh: what makes the upstream request conditional


ASK = Reuse(Use.ASK)
FRESH = Reuse(Use.FRESH)


def rules_of(entry: ProxyResult, domain: DomainSettings) -> StoredRules:
    """The entry's rules; for one stored by an older version, what its stored headers say."""
    if entry.rules is not None:
        return entry.rules
    control = cache_control(field_value(entry.headers, "Cache-Control"))
    no_stale = domain.respect_upstream_cache_control and (
        control.has("must-revalidate") or control.has("proxy-revalidate"))
    return StoredRules(no_stale=no_stale)


def age(entry: ProxyResult, now: float) -> float:
    """How old the answer is (RFC 9111 4.2.3's current age): its age when received plus the time since."""
    initial = entry.rules.initial_age if entry.rules is not None else 0.0
    return initial + max(0.0, now - entry.stored_at)


def staleness(entry: ProxyResult, now: float) -> float:
    """How long past its freshness an entry is (negative while fresh; an entry stored without a lifetime is fresh
    for as long as Redis keeps it)."""
    return -math.inf if entry.fresh_for is None else max(0.0, now - entry.stored_at) - entry.fresh_for


def reuse(domain: DomainSettings, entry: ProxyResult | None, control: RequestControl, now: float,
          offline: bool = False, later: bool = True) -> Reuse:
    """What to do for a request whose entry is `entry` (None: nothing stored). `later`: False where revalidating
    later is no option (the one refreshing it)."""
    if entry is None:
        return ASK
    late = staleness(entry, now)
    if not control.picky and late <= 0:
        return FRESH  # the common case, decided without reading a header
    if control.no_cache or (control.max_age is not None and age(entry, now) > control.max_age) or (
            control.min_fresh is not None and late + control.min_fresh > 0):
        return Reuse(Use.ASK, validators=validators(entry))
    if late <= 0:
        return FRESH
    rules = rules_of(entry, domain)
    if rules.no_stale:
        return Reuse(Use.ASK, validators=validators(entry))
    if control.max_stale is not None and late <= control.max_stale:
        return Reuse(Use.STALE)
    if offline:
        return Reuse(Use.STALE)  # whatever is still kept: nothing may go upstream
    while_revalidate = rules.while_revalidate if rules.while_revalidate is not None else domain.stale_while_revalidate
    if later and late <= while_revalidate and not control.picky:
        return Reuse(Use.STALE, refresh=not (control.only_if_cached or control.no_store), validators=validators(entry))
    if_error = rules.if_error if rules.if_error is not None else domain.stale_if_error
    return Reuse(Use.ASK, stand_in=not control.picky and late <= if_error, validators=validators(entry))


def usable(domain: DomainSettings, entry: ProxyResult, control: RequestControl, asked: float) -> bool:
    """May a request that missed take this entry once it is in the cache? If it was fetched after the request was
    made (whatever the request asked: `no-cache`, `max-age=0`, a `min-fresh` beyond the TTL), or if it serves it
    as it stands."""
    return entry.stored_at >= asked or reuse(domain, entry, control, time.time(), later=False).use is not Use.ASK


def failed(result: ProxyResult) -> bool:
    """An answer a stale entry may replace: the upstream (or the way to it) failed, or it is throttled."""
    return result.status >= 500 or result.status == 429


def not_modified(asked: tuple[tuple[str, str], ...], result: ProxyResult) -> bool:
    """Does a client's conditional GET or HEAD (`asked`: its If-None-Match, If-Modified-Since) get a 304 for this
    200 answer? RFC 9110 13.1.2 (weak comparison) and 13.1.3, If-None-Match first (13.2.2)."""
    if not asked or result.status != 200:
        return False
    by_name = {name.lower(): value for name, value in asked}
    if "if-none-match" in by_name:
        wanted, etag = parse_etags(by_name["if-none-match"]), result.header("ETag").strip()
        if wanted.star_tag:
            return True
        tag, _ = unquote_etag(etag) if etag else (None, False)
        return tag is not None and wanted.contains_weak(tag)
    since, modified = http_time(by_name.get("if-modified-since", "")), http_time(result.header("Last-Modified"))
    return since is not None and modified is not None and modified <= since


def as_not_modified(result: ProxyResult) -> ProxyResult:
    """The 304 that stands for this answer (RFC 9110 15.4.5): no content, and of its fields only those a cache
    needs; labelled as the answer was (HIT, MISS...)."""
    headers = [(name, value) for name, value in result.headers if name.lower() in NOT_MODIFIED_FIELDS]
    return ProxyResult(304, "Not Modified", headers, b"", cache=result.cache, extra=list(result.extra),
                       fetch_ms=result.fetch_ms, stored_at=result.stored_at, rules=result.rules)
