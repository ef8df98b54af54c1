"""The request flow in plain Python: cache hit, else fetch upstream, store what may be stored, answer."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from buddy.codec import CachedResponse
from buddy.errors import StoreUnavailable
from buddy.fingerprint import RequestShape, credentials_digest, fingerprint, vary_values
from buddy.redis_keys import RedisKeys
from buddy.settings import DomainSettings, Settings
from buddy.store.response_cache import ResponseCache
from buddy.upstream import BodyStream, UpstreamClient, build_url, forwardable_request_headers, storable_headers

CACHEABLE_METHODS = frozenset({"GET", "HEAD", "POST"})


@dataclass(frozen=True)
class ProxyRequest:
    """A client request already mapped to its domain, with a safe upstream path and query."""

    domain: DomainSettings
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str:
        name = name.lower()
        return next((value for key, value in self.headers if key.lower() == name), "")


@dataclass
class ProxyResult:
    """What the client gets: status, headers and either a whole body or a stream."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes | None = None
    stream: BodyStream | None = None
    cache: str = "MISS"
    extra: list[tuple[str, str]] = field(default_factory=list)

    def all_headers(self) -> list[tuple[str, str]]:
        return [*self.headers, ("X-Cache", self.cache), *self.extra]


class ProxyService:
    """hit -> (coalesce, throttle: later issues) -> fetch -> store."""

    def __init__(self, settings: Settings, keys: RedisKeys, cache: ResponseCache, upstream: UpstreamClient) -> None:
        self.settings = settings
        self.keys = keys
        self.cache = cache
        self.upstream = upstream

    def cache_key(self, request: ProxyRequest) -> str | None:
        """The Redis key of the request's response, or None when it must not be cached at all."""
        if request.method not in CACHEABLE_METHODS or request.header("Range"):
            return None
        domain = request.domain
        shape = RequestShape(
            method=request.method,
            domain=domain.name,
            path=request.path,
            query=request.query,
            body=request.body,
            content_type=request.header("Content-Type"),
            vary=vary_values(request.headers, domain.vary_headers),
            credentials="" if domain.share_across_credentials else credentials_digest(request.headers),
        )
        return self.keys.cache(domain.name, fingerprint(shape))

    def handle(self, request: ProxyRequest) -> ProxyResult:
        key = self.cache_key(request)
        bypass = False
        if key is not None:
            try:
                hit = self.cache.get(key)
            except StoreUnavailable:
                hit, bypass = None, True
            if hit is not None:
                return self._from_cache(hit)
        result = self._fetch(request)
        if key is not None and not bypass and result.body is not None:
            ttl = self.ttl_for(request.domain, result.status)
            if ttl:
                entry = CachedResponse(result.status, result.reason, storable_headers(result.headers), result.body, time.time())
                try:
                    self.cache.put(key, entry, ttl)
                except StoreUnavailable:
                    bypass = True
        result.cache = "BYPASS" if bypass else "MISS"
        if request.method == "HEAD" and result.stream is not None:
            result.stream.close()
            result.stream, result.body = None, b""
        return result

    def _fetch(self, request: ProxyRequest) -> ProxyResult:
        domain = request.domain
        url = build_url(domain, request.path, request.query)
        # A HEAD miss fetches the GET so that the entry it stores serves both.
        method = "GET" if request.method == "HEAD" else request.method
        response = self.upstream.send(domain, method, url, forwardable_request_headers(request.headers), request.body)
        return ProxyResult(response.status, response.reason, response.headers, response.body, response.stream)

    def ttl_for(self, domain: DomainSettings, status: int) -> int | None:
        """2xx for the domain's TTL, 404/410 for the negative TTL, nothing else (never 5xx or 429)."""
        if 200 <= status < 300 and status != 206:
            return domain.ttl_seconds
        if status in (404, 410):
            return domain.negative_ttl_seconds
        return None

    @staticmethod
    def _from_cache(entry: CachedResponse) -> ProxyResult:
        age = max(0, int(time.time() - entry.stored_at))
        headers = [(name, value) for name, value in entry.headers if name.lower() != "age"]
        return ProxyResult(entry.status, entry.reason, headers, entry.body, cache="HIT", extra=[("Age", str(age))])

