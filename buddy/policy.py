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
import math
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, NamedTuple

from werkzeug.datastructures import RequestCacheControl, ResponseCacheControl
from werkzeug.http import parse_cache_control_header, parse_date, parse_set_header

from buddy.fingerprint import RequestShape, credentials_digest, fingerprint, normalize_method, vary_values
from buddy.messages import STORED_BODY_LIMIT, ProxyRequest, ProxyResult, StoredRequest
from buddy.redis_keys import EntryId
from buddy.settings import DomainSettings

CACHEABLE_METHODS = frozenset({"GET", "HEAD", "POST"})
# A request carrying one of these asks for an answer about its own copy (a range, a 304): it is sent
# through as it is, neither answered from nor stored in the cache, nor coalesced with others.
UNSHAREABLE_HEADERS = ("range", "if-none-match", "if-modified-since", "if-match", "if-unmodified-since", "if-range")
# A Vary on these adds nothing to the key: the proxy sets them itself, or the key already holds them.
ALREADY_KEYED = frozenset({"accept-encoding", "host", "content-length", "content-type"})
_DELTA_SECONDS = re.compile(r"[0-9]+")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_DIRECTIVE = re.compile(r"""[!#$%&'*+.^_`|~0-9A-Za-z-]+(=([!#$%&'*+.^_`|~0-9A-Za-z-]+|"([^"\\]|\\.)*"))?""")
_LIST_SPLIT = re.compile(r""",(?=(?:[^"]*"[^"]*")*[^"]*$)""")  # commas outside quoted strings
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def cacheable_request(request: ProxyRequest) -> bool:
    """May this request be answered from (and stored in) the cache, and coalesced with identical ones?"""
    if request.method not in CACHEABLE_METHODS:
        return False
    sent = request.by_name
    return not any(sent.get(name) for name in UNSHAREABLE_HEADERS)


def entry_for(request: ProxyRequest, credentials: str | None = None) -> EntryId:
    """The request's primary cache entry: made only of what the upstream is sent, plus where it is sent.
    `credentials`: the digest of its credential headers when only that is known (an imported archive)."""
    domain, sent = request.domain, request.forwarded.items()
    if credentials is None:
        credentials = credentials_digest(sent, domain.credential_headers)
    shape = RequestShape(
        method=request.method,
        domain=domain.name,
        upstream=domain.upstream_id,
        path=request.path,
        query=request.query,
        body=request.body,
        content_type=request.header("Content-Type"),
        vary=vary_values(sent, domain.vary_headers),
        credentials="" if domain.share_across_credentials else credentials,
    )
    return EntryId(domain.name, namespaced(request.namespace, fingerprint(shape)))


def stored_request(request: ProxyRequest, url: str, vary: Iterable[str] = ()) -> StoredRequest:
    """What an entry stored for `request` (fetched from `url`) keeps of it: method (HEAD as GET), URL, the
    keyed headers (the mapping's vary headers, and `vary` from the answer's Vary) but never a credential,
    the body up to STORED_BODY_LIMIT, Content-Type, the credentials' digest and the namespace."""
    domain = request.domain
    names = set(domain.vary_headers) | {name.lower() for name in vary}
    headers = tuple(
        (name, value) for name, value in request.forwarded.items()
        if name.lower() in names and name.lower() not in domain.credential_headers
    )
    body_kept = len(request.body) <= STORED_BODY_LIMIT
    return StoredRequest(
        method=normalize_method(request.method), url=url, headers=headers,
        body=request.body if body_kept else b"", body_kept=body_kept,
        content_type=request.header("Content-Type"),
        credentials="" if domain.share_across_credentials else credentials_digest(
            request.forwarded.items(), domain.credential_headers),
        namespace=request.namespace,
    )


def namespaced(namespace: str, digest: str) -> str:
    """An entry's name in its namespace: `ns:<name>:<digest>` (so that a namespace is cleared with one SCAN
    pattern), or the bare digest outside any."""
    return f"ns:{namespace}:{digest}" if namespace else digest


def variant_digest(primary: str, names: Iterable[str], sent: Mapping[str, str]) -> str:
    """The entry for one variant of a varying answer: the primary digest plus the named headers' values,
    in the primary's namespace."""
    values = vary_values(sent.items(), names)
    digest = hashlib.sha256(json.dumps([primary, values], separators=(",", ":")).encode()).hexdigest()
    head, sep, _ = primary.rpartition(":")
    return head + sep + digest


def kept_for(domain: DomainSettings, fresh_for: int) -> int:
    """How long Redis keeps an entry fresh for `fresh_for` seconds: that, plus the mapping's stale grace."""
    return fresh_for + domain.grace


@dataclass(frozen=True)
class Storage:
    """What to do with an upstream answer: store it (for `ttl` seconds, keyed also on `vary`), share it."""

    ttl: int | None
    vary: tuple[str, ...] = ()
    shareable: bool = True
    drop: frozenset[str] = frozenset()  # header names kept out of the stored copy


def upstream_header(result: ProxyResult, name: str) -> str | None:
    """Every value of a header as the upstream sent it, joined with ', '; None when a value is malformed
    (control characters): a header that cannot be read is not one to trust an answer's privacy to."""
    lower = name.lower()
    headers = result.upstream_headers if result.upstream_headers is not None else result.headers
    values = [value for key, value in headers if key.lower() == lower]
    if any(_CONTROL.search(value) for value in values):
        return None
    return ", ".join(values)


class Privacy(NamedTuple):
    """What an answer's Cache-Control says about sharing it."""

    private: bool  # `private` with no field list: the whole answer is one user's
    no_store: bool
    private_fields: frozenset[str]  # `private="Set-Cookie"`: only these fields are


def privacy(value: str) -> Privacy | None:
    """Read Cache-Control for what a shared cache must not keep; directives compare case-insensitively
    (RFC 9111 5.2) and repeat (`private, private="X"` is private). None when any directive is not
    `token[=token|quoted-string]` or `private=` names no field: such an answer is not stored."""
    private, no_store, fields = False, False, set()
    for directive in (d.strip() for d in _LIST_SPLIT.split(value)):
        if not directive:
            continue
        if not _DIRECTIVE.fullmatch(directive):
            return None
        name, _, argument = directive.partition("=")
        name = name.lower()
        if name == "no-store":
            no_store = True
        elif name == "private" and not argument:
            private = True
        elif name == "private":
            named = [f.lower() for f in parse_set_header(argument.strip('"'))]
            if not named or not all(_TOKEN.fullmatch(f) and f != "*" for f in named):
                return None
            fields.update(named)
    return Privacy(private, no_store, frozenset(fields))


def ttl_for(domain: DomainSettings, status: int) -> int | None:
    """2xx for the domain's TTL, 404/410 for the negative TTL, nothing else (never 5xx, 429 or 206)."""
    if 200 <= status < 300 and status != 206:
        return domain.ttl_seconds
    if status in (404, 410):
        return domain.negative_ttl_seconds
    return None


def response_vary(domain: DomainSettings, value: str) -> tuple[str, ...] | None:
    """The request headers an answer varies on beyond those already in its key; None for `Vary: *` or a
    Vary that is not a list of header names."""
    names = {name.strip().lower() for name in value.split(",") if name.strip()}
    if "*" in names or not all(_TOKEN.fullmatch(name) for name in names):
        return None
    keyed = ALREADY_KEYED | set(domain.vary_headers)
    if not domain.share_across_credentials:
        keyed |= domain.credential_headers
    return tuple(sorted(names - keyed))


def storage(domain: DomainSettings, result: ProxyResult) -> Storage:
    """Whether (and how) an upstream answer with a whole body may be stored and shared."""
    ttl = ttl_for(domain, result.status) if result.body is not None else None
    if ttl is not None and domain.ttl_from_upstream:
        lifetime = upstream_lifetime(result)
        if lifetime is not None:
            ttl = min(ttl, lifetime) or None  # max-age=0: not stored
    if not domain.respect_upstream_cache_control:
        return Storage(ttl)
    vary_value, control_value = upstream_header(result, "Vary"), upstream_header(result, "Cache-Control")
    vary = None if vary_value is None else response_vary(domain, vary_value)
    said = None if control_value is None else privacy(control_value)
    if vary is None or said is None or said.private or said.no_store:
        return Storage(None, shareable=False)
    return Storage(ttl, vary, drop=said.private_fields)


def upstream_lifetime(result: ProxyResult) -> int | None:
    """What freshness the upstream gives its answer (`s-maxage`, else `max-age`, less its `Age`), in whole
    seconds; None when it says nothing readable."""
    value = upstream_header(result, "Cache-Control")
    if not value:
        return None
    parsed = parse_cache_control_header(value.lower(), None, ResponseCacheControl)
    lifetime = parsed.s_maxage if isinstance(parsed.s_maxage, int) else parsed.max_age
    if not isinstance(lifetime, int) or isinstance(lifetime, bool):
        return None
    already = (upstream_header(result, "Age") or "").strip()
    return max(0, lifetime - (int(already) if _DELTA_SECONDS.fullmatch(already) and len(already) <= 12 else 0))


def follower_may_take(result: ProxyResult, primary: str, sent: Mapping[str, str]) -> bool:
    """May a request waiting on the same entry be given this answer? Not if it varies on a header whose
    value this request does not share with the one the answer was fetched for."""
    return not result.vary or variant_digest(primary, result.vary, sent) == result.variant


class RequestControl(NamedTuple):
    """The client's request Cache-Control (RFC 9111 5.2.1), or `Pragma: no-cache` when it sends none."""

    no_cache: bool = False  # fetch now (coalesced with others fetching now), store the result
    no_store: bool = False  # do not store this answer
    max_age: int | None = None  # only an entry at most this old
    max_stale: float | None = None  # accept an entry expired at most this long (math.inf: any)
    min_fresh: int | None = None  # only an entry fresh for at least this much longer
    only_if_cached: bool = False  # never upstream: 504 when the cache cannot answer

    @property
    def picky(self) -> bool:
        """Does the client bound what it accepts? Then the proxy never hands it a stale entry of its own accord."""
        return self.no_cache or self.max_age is not None or self.min_fresh is not None


def request_control(cache_control: str, pragma: str) -> RequestControl:
    """Read the request's directives, case-insensitively; an unreadable number is ignored, a negative one is 0."""
    if not cache_control.strip():
        return RequestControl(no_cache="no-cache" in pragma.lower())
    parsed = parse_cache_control_header(cache_control.lower(), None, RequestCacheControl)

    def seconds(value: object) -> int | None:
        return None if not isinstance(value, int) or isinstance(value, bool) else max(0, value)

    max_stale = parsed.max_stale
    return RequestControl(
        no_cache=bool(parsed.no_cache), no_store=bool(parsed.no_store), max_age=seconds(parsed.max_age),
        max_stale=math.inf if max_stale is True else seconds(max_stale), min_fresh=seconds(parsed.min_fresh),
        only_if_cached=bool(parsed.only_if_cached),
    )


def age(entry: ProxyResult, now: float) -> float:
    return max(0.0, now - entry.stored_at)


def staleness(entry: ProxyResult, now: float) -> float:
    """How long past its freshness lifetime an entry is (negative while fresh; an entry stored before
    lifetimes were recorded is fresh for as long as Redis keeps it)."""
    return -math.inf if entry.fresh_for is None else age(entry, now) - entry.fresh_for


def satisfies(domain: DomainSettings, entry: ProxyResult, control: RequestControl, now: float) -> str | None:
    """May the cache answer the request with this entry without going upstream: "HIT" (fresh, and as fresh as
    the client asks), "STALE" (expired, but within the client's max-stale, and not `must-revalidate`), or None."""
    if control.no_cache:
        return None
    old, late = age(entry, now), staleness(entry, now)
    if control.max_age is not None and old > control.max_age:
        return None
    if control.min_fresh is not None and late + control.min_fresh > 0:
        return None
    if late <= 0:
        return "HIT"
    if control.max_stale is not None and late <= control.max_stale and not must_revalidate(domain, entry):
        return "STALE"
    return None


def may_revalidate_later(domain: DomainSettings, entry: ProxyResult, control: RequestControl, now: float) -> bool:
    """Stale-while-revalidate: answer with this expired entry at once while one refresh runs in the background."""
    late = staleness(entry, now)
    return 0 < late <= domain.stale_while_revalidate and not control.picky and not must_revalidate(domain, entry)


def may_stand_in(domain: DomainSettings, entry: ProxyResult, control: RequestControl, now: float,
                 offline: bool = False) -> bool:
    """Stale-if-error: may this expired entry answer instead of the upstream's failure (offline: instead of
    going upstream at all, however long it has been kept)?"""
    if control.picky or must_revalidate(domain, entry):
        return False
    return offline or staleness(entry, now) <= domain.stale_if_error


def must_revalidate(domain: DomainSettings, entry: ProxyResult) -> bool:
    """The upstream forbade serving this answer once expired (`must-revalidate`, `proxy-revalidate`)."""
    if not domain.respect_upstream_cache_control:
        return False
    directives = {d.strip().split("=", 1)[0].lower() for d in entry.header("Cache-Control").split(",")}
    return bool(directives & {"must-revalidate", "proxy-revalidate"})


def failed(result: ProxyResult) -> bool:
    """An answer a stale entry may replace: the upstream (or the way to it) failed, or it is throttled."""
    return result.status >= 500 or result.status == 429


def retry_after_seconds(value: str, now: float) -> float | None:
    """An upstream's Retry-After in seconds from `now` (RFC 9110 10.2.3: ASCII delta-seconds or an
    HTTP-date); None when absent or anything else, so that the caller backs off as if none was sent."""
    value = value.strip()
    if not value:
        return None
    if _DELTA_SECONDS.fullmatch(value):
        return float(int(value)) if len(value) <= 12 else 1e12  # int() refuses 4,300 digits and more
    try:
        when = parse_date(value)
        return None if when is None else max(0.0, when.timestamp() - now)
    except (ValueError, OverflowError):  # a year past datetime's range
        return None
