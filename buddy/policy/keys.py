"""Which entry a request reads and writes: made only of what the upstream is sent, plus where it is sent.

The key describes exactly what goes upstream (`entry_for`); an upstream's `Vary` adds the named request headers
to it (`variant_digest`). A client's own conditional (If-None-Match, If-Modified-Since on a GET or HEAD) is
answered by the proxy from the entry, so it is no part of the key and never goes upstream (`conditions`); a
request that asks about its own copy otherwise (Range, If-Match, If-Unmodified-Since, If-Range) passes through.
"""
from __future__ import annotations

import hashlib
import json
from typing import Iterable, Mapping
from urllib.parse import urljoin, urlsplit

from buddy.fingerprint import RequestShape, credentials_digest, fingerprint, normalize_method, vary_values
from buddy.fingerprint import partition as credentials_partition
from buddy.messages import STORED_BODY_LIMIT, ProxyRequest, ProxyResult, StoredRequest
from buddy.policy.directives import _TOKEN
from buddy.redis_keys import EntryId
from buddy.settings import DomainSettings

CACHEABLE_METHODS = frozenset({"GET", "HEAD", "POST"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})  # RFC 9110 9.2.1; any other may change the resource
# A GET or HEAD carrying one of these is answered from the entry by the proxy (304 or the stored answer).
CONDITIONAL_HEADERS = frozenset({"if-none-match", "if-modified-since"})
# A request carrying one of these asks about its own copy in ways the proxy does not answer (a range, a
# precondition): it is sent through as it is, neither answered from nor stored in the cache, nor coalesced.
UNSHAREABLE_HEADERS = ("range", "if-match", "if-unmodified-since", "if-range")
# A Vary on these adds nothing to the key: the proxy sets them itself, or the key already holds them.
ALREADY_KEYED = frozenset({"accept-encoding", "host", "content-length", "content-type"})


def conditions(method: str, forwarded: dict[str, str]) -> tuple[dict[str, str], tuple[tuple[str, str], ...]]:
    """Split a client's If-None-Match and If-Modified-Since off a GET or HEAD: (what goes upstream, the
    conditions the proxy answers itself). Other methods keep them: there they are preconditions."""
    if method not in ("GET", "HEAD") or not any(name.lower() in CONDITIONAL_HEADERS for name in forwarded):
        return forwarded, ()
    kept = {name: value for name, value in forwarded.items() if name.lower() not in CONDITIONAL_HEADERS}
    asked = tuple((name, value) for name, value in forwarded.items() if name.lower() in CONDITIONAL_HEADERS)
    return kept, asked


def cacheable_request(request: ProxyRequest) -> bool:
    """May this request be answered from (and stored in) the cache, and coalesced with identical ones?"""
    if request.method not in CACHEABLE_METHODS:
        return False
    sent = request.by_name
    if request.method == "POST" and any(sent.get(name) for name in CONDITIONAL_HEADERS):
        return False  # a precondition on a POST: the upstream's to judge
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


def partition(request: ProxyRequest) -> str:
    """The upstream credentials the request carries ('' for none): an upstream's pause after a 429 or 503 applies to
    the requests that carry the same (or, for requests with none, to the whole mapping), and a mapping with
    `rate_limit_per_credential` limits each partition on its own."""
    domain = request.domain
    return credentials_partition(request.forwarded.items(), request.query, domain.credential_headers,
                                 domain.credential_params)


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


def follower_may_take(result: ProxyResult, primary: str, sent: Mapping[str, str]) -> bool:
    """May a request waiting on the same entry be given this answer? Not if it varies on a header whose
    value this request does not share with the one the answer was fetched for."""
    return not result.vary or variant_digest(primary, result.vary, sent) == result.variant


def invalidated_urls(domain: DomainSettings, method: str, url: str, result: ProxyResult) -> tuple[str, ...]:
    """RFC 9111 4.4: a non-error answer to an unsafe request invalidates the target URI, and the URIs its
    Location and Content-Location name on the same upstream. The upstream URLs whose stored GET answers go."""
    if method in SAFE_METHODS or not 200 <= result.status < 400:
        return ()
    found = [url]
    for name in ("Location", "Content-Location"):
        value = result.header(name).split(",", 1)[0].strip() if result.upstream_headers is None else next(
            (v.strip() for k, v in result.upstream_headers if k.lower() == name.lower()), "")
        if value:
            target = urljoin(url, value).split("#", 1)[0]
            parts = urlsplit(target)
            if (parts.scheme, parts.netloc.lower()) == (domain.scheme, domain.netloc) and (
                    parts.path == (domain.base_path or "/") or parts.path.startswith(domain.base_path + "/")):
                found.append(target)
    return tuple(dict.fromkeys(found))


def kept_for(domain: DomainSettings, fresh_for: float) -> int:
    """How long Redis keeps an entry fresh for `fresh_for` more seconds: that, plus the mapping's stale grace."""
    return max(1, int(fresh_for + 0.999) + domain.grace)
