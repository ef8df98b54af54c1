"""The request flow in plain Python: cache hit, else coalesce, fetch upstream as the leader, store, answer."""
from __future__ import annotations

import json
import logging
import math
import time
from email.utils import parsedate_to_datetime

from buddy.codec import CachedResponse
from buddy.coalesce import Coalescer
from buddy.errors import CoalesceTimeout, StoreUnavailable, UpstreamError
from buddy.fingerprint import RequestShape, credentials_digest, fingerprint, vary_values
from buddy.messages import ProxyRequest, ProxyResult
from buddy.redis_keys import EntryId, RedisKeys
from buddy.settings import DomainSettings, Settings
from buddy.store.metrics import MetricsRecorder
from buddy.store.rate_limiter import Decision, LocalLimiter, RateLimiter
from buddy.store.response_cache import ResponseCache
from buddy.upstream import UpstreamClient, build_url, forwardable_request_headers, storable_headers

log = logging.getLogger("buddy.service")
CACHEABLE_METHODS = frozenset({"GET", "HEAD", "POST"})
# A request carrying one of these asks for an answer about its own copy (a range, a 304): it is sent
# through as it is, neither answered from nor stored in the cache, nor coalesced with others.
UNSHAREABLE_HEADERS = ("Range", "If-None-Match", "If-Modified-Since", "If-Match", "If-Unmodified-Since", "If-Range")
LOCK_MARGIN_SECONDS = 2.0


def json_result(status: int, reason: str, **body: object) -> ProxyResult:
    """An answer the proxy makes itself (errors), shaped like any upstream answer so followers can share it."""
    payload = json.dumps(body).encode()
    return ProxyResult(status, reason, [("Content-Type", "application/json")], payload)


class ProxyService:
    """hit -> coalesce -> throttle -> fetch -> store."""

    def __init__(
        self,
        settings: Settings,
        keys: RedisKeys,
        cache: ResponseCache,
        upstream: UpstreamClient,
        coalescer: Coalescer,
        limiter: RateLimiter,
        fallback_limiter: LocalLimiter,
        metrics: MetricsRecorder,
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.cache = cache
        self.upstream = upstream
        self.coalescer = coalescer
        self.limiter = limiter
        self.fallback_limiter = fallback_limiter
        self.metrics = metrics

    def entry_for(self, request: ProxyRequest) -> EntryId | None:
        """Which cache entry answers the request, or None when it must not be cached at all."""
        if request.method not in CACHEABLE_METHODS or any(request.header(h) for h in UNSHAREABLE_HEADERS):
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
            credentials="" if domain.share_across_credentials else credentials_digest(
                request.headers, domain.credential_headers
            ),
        )
        return EntryId(domain.name, fingerprint(shape))

    def handle(self, request: ProxyRequest) -> ProxyResult:
        result = self._answer(request)
        self._tally(request.domain.name, result)
        if request.method == "HEAD" and result.stream is not None:
            result.close_stream()  # a relay keeps reading for its followers; headers (Content-Length) stay
            result.stream = iter(())
        return result

    def _answer(self, request: ProxyRequest) -> ProxyResult:
        entry = self.entry_for(request)
        if entry is None:
            result = self._call_upstream(request)
            result.cache = "PASS"  # shown to the client as MISS; counted apart from cache misses
            return result
        try:
            hit = self.cache.get(entry)
        except StoreUnavailable:
            return self._bypass(request)
        if hit is not None:
            return from_cache(hit)
        domain = request.domain
        lock_ttl_ms = int((domain.connect_timeout + domain.read_timeout + LOCK_MARGIN_SECONDS) * 1000)
        try:
            return self.coalescer.run(
                entry, lock_ttl_ms, domain.read_timeout + LOCK_MARGIN_SECONDS,
                lambda token: self._lead(request, entry, token),
            )
        except CoalesceTimeout as exc:
            return json_result(504, "Gateway Timeout", error="coalesce timeout", domain=exc.domain, message=str(exc))
        except StoreUnavailable:
            return self._bypass(request)

    def _tally(self, domain: str, result: ProxyResult) -> None:
        """Count what the request cost and saved (buffered; flushed to Redis once a second)."""
        if result.cache == "PASS":
            result.cache = "MISS"
            self.metrics.count(domain, "passthrough")
        elif result.cache in ("HIT", "COALESCED"):
            saved = {} if result.body is None else {"bytes_saved": len(result.body), "ms_saved": result.fetch_ms}
            self.metrics.count_many(domain, {"hits" if result.cache == "HIT" else "coalesced": 1, **saved})
        else:
            self.metrics.count(domain, "misses")

    def _lead(self, request: ProxyRequest, entry: EntryId, token: str) -> ProxyResult:
        """Fetch as the one leader; whatever happens, followers are handed a result or the lock is let go."""
        handed_off = False
        try:
            # The previous leader may have stored the entry between our miss and our lock.
            hit = self.cache.get(entry)
            if hit is not None:
                return from_cache(hit)
            result = self._call_upstream(request)
            try:
                if result.stream is not None:
                    result.stream = self.coalescer.relay(entry, token, result)
                    handed_off = True  # the relay (or relay()) has let go of the lock
                    return result
                stored = self._store(request.domain, entry, result)
                self.coalescer.hand_off(entry, token, result, stored)
                handed_off = True
                if not stored and self.ttl_for(request.domain, result.status):
                    result.cache = "BYPASS"
            except StoreUnavailable:
                result.cache = "BYPASS"
            return result
        finally:
            if not handed_off:
                try:
                    self.coalescer.hand_off(entry, token, None, stored=False)
                except StoreUnavailable:
                    pass  # the lock expires by itself

    def _store(self, domain: DomainSettings, entry: EntryId, result: ProxyResult) -> bool:
        ttl = self.ttl_for(domain, result.status) if result.body is not None else None
        if not ttl:
            return False
        stored = CachedResponse(
            result.status, result.reason, storable_headers(result.headers), result.body, time.time(), result.fetch_ms
        )
        try:
            self.cache.put(entry, stored, ttl)
        except StoreUnavailable:
            return False
        return True

    def _bypass(self, request: ProxyRequest) -> ProxyResult:
        result = self._call_upstream(request)
        result.cache = "BYPASS"
        return result

    def _call_upstream(self, request: ProxyRequest) -> ProxyResult:
        """Throttle, then fetch: wait for the reserved slot, or answer 429 at once when it is too far off."""
        domain = request.domain
        decision, limiter = self._throttle(domain)
        if not decision.accepted:
            self.metrics.count(domain.name, "throttle_refused")
            return refused(domain, decision)
        if decision.delay > 0:
            self.metrics.count(domain.name, "throttle_delayed")
            self.metrics.count(domain.name, "throttle_delay_ms", int(decision.delay * 1000))
            time.sleep(decision.delay)  # a leader's lock is kept alive meanwhile by the LockKeeper
        result = self._fetch(request)
        if decision.delay > 0:
            result.extra.append(("X-Throttle-Delay", f"{decision.delay:.3f}"))
        if limiter is self.limiter:
            self._learn(domain, result, decision)
        return result

    def _throttle(self, domain: DomainSettings) -> tuple[Decision, RateLimiter | LocalLimiter]:
        try:
            return self.limiter.acquire(domain), self.limiter
        except StoreUnavailable:
            return self.fallback_limiter.acquire(domain), self.fallback_limiter

    def _learn(self, domain: DomainSettings, result: ProxyResult, decision: Decision) -> None:
        """An upstream 429/503 pauses the domain (its Retry-After, else exponential); success resets the level."""
        try:
            if result.status in (429, 503):
                self.limiter.penalize(domain, retry_after_seconds(result.headers))
            elif decision.level and result.status < 500:
                self.limiter.reset(domain)
        except StoreUnavailable:
            pass

    def _fetch(self, request: ProxyRequest) -> ProxyResult:
        domain = request.domain
        url = build_url(domain, request.path, request.query)
        # A HEAD miss fetches the GET so that the entry it stores serves both.
        method = "GET" if request.method == "HEAD" else request.method
        headers = forwardable_request_headers(request.headers)
        started = time.monotonic()
        try:
            response = self.upstream.send(domain, method, url, headers, request.body)
        except UpstreamError as exc:
            # The cause's text would carry the URL, and with it any credentials in the query: name its type only.
            log.warning("%s (%s)", exc, type(exc.__cause__).__name__)
            outcome = "timeout" if exc.status == 504 else "unreachable"
            self._count_upstream(domain.name, outcome, started)
            self.metrics.error(domain.name, outcome, str(exc))
            error = "upstream timeout" if exc.status == 504 else "upstream unavailable"
            reason = "Gateway Timeout" if exc.status == 504 else "Bad Gateway"
            return json_result(exc.status, reason, error=error, domain=domain.name, message=str(exc))
        fetch_ms = self._count_upstream(domain.name, str(response.status), started)
        if response.status >= 500 or response.status == 429:
            self.metrics.error(domain.name, str(response.status), f"upstream '{domain.name}' answered {response.status}")
        return ProxyResult(
            response.status, response.reason, response.headers, response.body, response.stream, fetch_ms=fetch_ms
        )

    def _count_upstream(self, domain: str, outcome: str, started: float) -> int:
        elapsed_ms = int((time.monotonic() - started) * 1000)
        self.metrics.count(domain, "upstream_requests")
        self.metrics.count(domain, "upstream_ms", elapsed_ms)
        self.metrics.count(domain, f"status:{outcome}")
        return elapsed_ms

    def ttl_for(self, domain: DomainSettings, status: int) -> int | None:
        """2xx for the domain's TTL, 404/410 for the negative TTL, nothing else (never 5xx, 429 or 206)."""
        if 200 <= status < 300 and status != 206:
            return domain.ttl_seconds
        if status in (404, 410):
            return domain.negative_ttl_seconds
        return None


def refused(domain: DomainSettings, decision: Decision) -> ProxyResult:
    """429 without consuming a slot: the next free slot is further off than the longest allowed delay."""
    wait = max(1, math.ceil(decision.delay))
    result = json_result(
        429, "Too Many Requests", error="rate limited", domain=domain.name,
        message=f"'{domain.name}' is at its rate limit; the next upstream slot is {decision.delay:.1f}s away",
        retry_after=wait,
    )
    result.headers += [
        ("Retry-After", str(wait)),
        ("X-RateLimit-Limit", str(decision.limit or domain.max_requests_per_hour)),
        ("X-RateLimit-Remaining", "0"),
        ("X-RateLimit-Reset", str(wait)),
    ]
    return result


def retry_after_seconds(headers: list[tuple[str, str]]) -> float | None:
    """An upstream's Retry-After, in seconds from now: delta-seconds or an HTTP date; None when absent or odd."""
    value = next((v for n, v in headers if n.lower() == "retry-after"), "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def from_cache(entry: CachedResponse) -> ProxyResult:
    age = max(0, int(time.time() - entry.stored_at))
    headers = [(name, value) for name, value in entry.headers if name.lower() != "age"]
    return ProxyResult(
        entry.status, entry.reason, headers, entry.body, cache="HIT", extra=[("Age", str(age))], fetch_ms=entry.fetch_ms
    )
