"""Cache policy as pure functions: under which key, whether and how long to store, what followers may share.

The service asks, this module answers; nothing here touches Redis, Flask or the network. The rules are
those of a shared cache (RFC 9111) for reference data:
- the key describes exactly what was sent upstream (`entry_for`); an upstream's `Vary` adds the named
  request headers to it (`variant_digest`);
- 2xx answers are kept for the mapping's TTL and 404/410 for its negative TTL (an upstream's max-age does
  not shorten that: reference data is cached as long as the mapping says); 5xx, 429, 206 never;
- unless the mapping sets `respect_upstream_cache_control = false`, an answer marked `private` or
  `no-store`, or with `Vary: *`, is neither stored nor handed to coalesced requests (each asks for itself);
  `private="Field"` keeps the answer but drops those fields from the stored copy.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from werkzeug.datastructures import ResponseCacheControl
from werkzeug.http import parse_cache_control_header, parse_date, parse_set_header

from buddy.fingerprint import RequestShape, credentials_digest, fingerprint, vary_values
from buddy.messages import ProxyRequest, ProxyResult
from buddy.redis_keys import EntryId
from buddy.settings import DomainSettings

CACHEABLE_METHODS = frozenset({"GET", "HEAD", "POST"})
# A request carrying one of these asks for an answer about its own copy (a range, a 304): it is sent
# through as it is, neither answered from nor stored in the cache, nor coalesced with others.
UNSHAREABLE_HEADERS = ("range", "if-none-match", "if-modified-since", "if-match", "if-unmodified-since", "if-range")
# A Vary on these adds nothing to the key: the proxy sets them itself, or the key already holds them.
ALREADY_KEYED = frozenset({"accept-encoding", "host", "content-length", "content-type"})
_DELTA_SECONDS = re.compile(r"[0-9]+")


def cacheable_request(request: ProxyRequest) -> bool:
    """May this request be answered from (and stored in) the cache, and coalesced with identical ones?"""
    return request.method in CACHEABLE_METHODS and not any(request.header(h) for h in UNSHAREABLE_HEADERS)


def entry_for(request: ProxyRequest) -> EntryId:
    """The request's primary cache entry: made only of what the upstream is sent, plus where it is sent."""
    domain, sent = request.domain, request.forwarded.items()
    shape = RequestShape(
        method=request.method,
        domain=domain.name,
        upstream=domain.upstream_id,
        path=request.path,
        query=request.query,
        body=request.body,
        content_type=request.header("Content-Type"),
        vary=vary_values(sent, domain.vary_headers),
        credentials="" if domain.share_across_credentials else credentials_digest(sent, domain.credential_headers),
    )
    return EntryId(domain.name, fingerprint(shape))


def variant_digest(primary: str, names: Iterable[str], sent: Mapping[str, str]) -> str:
    """The entry for one variant of a varying answer: the primary digest plus the named headers' values."""
    values = vary_values(sent.items(), names)
    return hashlib.sha256(json.dumps([primary, values], separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class Storage:
    """What to do with an upstream answer: store it (for `ttl` seconds, keyed also on `vary`), share it."""

    ttl: int | None
    vary: tuple[str, ...] = ()
    shareable: bool = True
    drop: frozenset[str] = frozenset()  # header names kept out of the stored copy


def cache_control(result: ProxyResult) -> ResponseCacheControl:
    """The answer's Cache-Control; directives compare case-insensitively (RFC 9111 5.2)."""
    return parse_cache_control_header(result.header("Cache-Control").lower(), cls=ResponseCacheControl)


def ttl_for(domain: DomainSettings, status: int) -> int | None:
    """2xx for the domain's TTL, 404/410 for the negative TTL, nothing else (never 5xx, 429 or 206)."""
    if 200 <= status < 300 and status != 206:
        return domain.ttl_seconds
    if status in (404, 410):
        return domain.negative_ttl_seconds
    return None


def response_vary(domain: DomainSettings, result: ProxyResult) -> tuple[str, ...] | None:
    """The request headers the answer varies on beyond those already in its key; None for `Vary: *`."""
    names = {name.lower() for name in parse_set_header(result.header("Vary"))}
    if "*" in names:
        return None
    keyed = ALREADY_KEYED | set(domain.vary_headers)
    if not domain.share_across_credentials:
        keyed |= domain.credential_headers
    return tuple(sorted(names - keyed))


def storage(domain: DomainSettings, result: ProxyResult) -> Storage:
    """Whether (and how) an upstream answer with a whole body may be stored and shared."""
    ttl = ttl_for(domain, result.status) if result.body is not None else None
    if not domain.respect_upstream_cache_control:
        return Storage(ttl)
    directives = cache_control(result)
    vary = response_vary(domain, result)
    if directives.private is True or directives.no_store or vary is None:
        return Storage(None, shareable=False)
    drop = frozenset(parse_set_header(directives.private)) if isinstance(directives.private, str) else frozenset()
    return Storage(ttl, vary, drop=frozenset(name.lower() for name in drop))


def follower_may_take(result: ProxyResult, primary: str, sent: Mapping[str, str]) -> bool:
    """May a request waiting on the same entry be given this answer? Not if it varies on a header whose
    value this request does not share with the one the answer was fetched for."""
    return not result.vary or variant_digest(primary, result.vary, sent) == result.variant


def retry_after_seconds(value: str, now: float) -> float | None:
    """An upstream's Retry-After in seconds from `now` (RFC 9110 10.2.3: ASCII delta-seconds or an
    HTTP-date); None when absent or anything else, so that the caller backs off as if none was sent."""
    value = value.strip()
    if not value:
        return None
    if _DELTA_SECONDS.fullmatch(value):
        return float(min(int(value), 10**12))  # a thousand digits is still just 'very long'
    when = parse_date(value)
    if when is None:
        return None
    return max(0.0, when.timestamp() - now)
