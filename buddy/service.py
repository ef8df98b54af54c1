"""The request flow in plain Python: cache hit, else coalesce, fetch upstream as the leader, store, answer."""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import replace
from typing import NamedTuple

from buddy import policy
from buddy.coalesce import Coalescer, NotShared, WaitingFull
from buddy.codec import VaryPointer
from buddy.errors import ClientGone, CoalesceTimeout, StoreUnavailable, UpstreamError
from buddy.messages import ProxyRequest, ProxyResult
from buddy.redis_keys import EntryId, RedisKeys
from buddy.settings import DomainSettings, Settings
from buddy.store.fill_lock import LOCK_TTL_MS, Ahead, LeadPlan
from buddy.store.metrics import MetricsRecorder
from buddy.store.offline import OfflineSwitch
from buddy.store.rate_limiter import Decision, LocalLimiter, RateLimiter, WaitingRoom
from buddy.store.response_cache import ResponseCache
from buddy.upstream import UpstreamClient, build_url, keep_access_key, storable_headers

log = logging.getLogger("buddy.service")
LOCK_MARGIN_SECONDS = 2.0
WAITING_RETRY_AFTER = 2  # seconds: by then the request it would have waited on has often been answered
SLOT_CHECK_SECONDS = 0.5  # how often a request sleeping for its rate-limit slot checks that its client is there
REFRESHES_PER_PROCESS = 8  # background refreshes (stale-while-revalidate) one worker runs at once at most


def json_result(status: int, reason: str, **body: object) -> ProxyResult:
    """An answer the proxy makes itself (errors), shaped like any upstream answer so followers can share it."""
    payload = json.dumps(body).encode()
    return ProxyResult(status, reason, [("Content-Type", "application/json")], payload)


class Lookup(NamedTuple):
    """Where a request's answer lives: its primary entry, or the variant a vary pointer there leads to."""

    primary: EntryId
    entry: EntryId
    hit: ProxyResult | None


class Looked(NamedTuple):
    """A lookup made for a request before it reached the view (the hit path): what it found, when it asked."""

    found: Lookup
    asked: float


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
        waiting: WaitingRoom,
        offline: OfflineSwitch,
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.cache = cache
        self.upstream = upstream
        self.coalescer = coalescer
        self.limiter = limiter
        self.fallback_limiter = fallback_limiter
        self.metrics = metrics
        self.waiting = waiting
        self.offline = offline
        self._refreshes = threading.BoundedSemaphore(REFRESHES_PER_PROCESS)

    def fresh_hit(
        self, request: ProxyRequest, primary: EntryId | None = None
    ) -> tuple[ProxyResult | None, Looked | None]:
        """A fresh entry this request accepts, answered as `handle` would answer it; else None, and the lookup
        made (None if none was), for `handle` to go on from. Reads the cache only: no lock, no upstream.
        `primary`: the request's entry (policy.entry_for), when the caller knows it already."""
        if not policy.cacheable_request(request):
            return None, None
        asked = time.time()
        found = self.lookup(request, primary or policy.entry_for(request))
        if found.hit is not None:
            control = policy.request_control(request.header("Cache-Control"), request.header("Pragma"))
            if policy.satisfies(request.domain, found.hit, control, time.time()) == "HIT":
                return self._finish(request, from_cache(found.hit, "HIT")), None
        return None, Looked(found, asked)

    def handle(self, request: ProxyRequest, looked: Looked | None = None) -> ProxyResult:
        """The answer to a request; `looked`: the lookup `fresh_hit` made for it a moment ago (not made again)."""
        return self._finish(request, self._answer(request, looked))

    def _finish(self, request: ProxyRequest, result: ProxyResult) -> ProxyResult:
        """Count what the answer cost and saved, and shape it for this client (HEAD, the key it spelled)."""
        self._tally(request.domain.name, result)
        if request.method == "HEAD" and result.stream is not None:
            result.close_stream()  # a relay keeps reading for its followers; headers (Content-Length) stay
            result.stream = iter(())
        if request.key_prefix or request.key_param:
            result.headers = keep_access_key(result.headers, request.domain, request.key_prefix, request.key_param)
        return result

    def lookup(self, request: ProxyRequest, primary: EntryId) -> Lookup:
        """Read the request's entry, following a vary pointer to the variant for this request's headers."""
        return self._follow(request, primary, self.cache.get(primary))

    def _follow(self, request: ProxyRequest, primary: EntryId, found: ProxyResult | VaryPointer | None) -> Lookup:
        """What was read at the primary entry, or, for a vary pointer, the variant for this request's headers."""
        if isinstance(found, VaryPointer):
            entry = EntryId(primary.domain, policy.variant_digest(primary.digest, found.names, request.forwarded))
            found = self.cache.get(entry)
            return Lookup(primary, entry, found if isinstance(found, ProxyResult) else None)
        return Lookup(primary, primary, found)

    def _answer(self, request: ProxyRequest, looked: Looked | None = None) -> ProxyResult:
        domain = request.domain
        offline = self.offline.on()
        control = policy.request_control(request.header("Cache-Control"), request.header("Pragma"))
        if not policy.cacheable_request(request):
            if offline:
                return offline_miss(domain)
            if control.only_if_cached:
                return not_cached(domain)
            result = self._call_upstream(request)
            result.cache = "PASS"  # shown to the client as MISS; counted apart from cache misses
            return result
        primary = policy.entry_for(request)
        asked = time.time() if looked is None else looked.asked
        stale: ProxyResult | None = None  # an expired entry that may stand in for a failed fetch
        for attempt in range(2):  # a second look when the leader's answer turned out to vary on our headers
            try:
                found = looked.found if looked is not None and attempt == 0 else self.lookup(request, primary)
            except StoreUnavailable:
                if offline or control.only_if_cached:
                    return offline_miss(domain) if offline else not_cached(domain)
                return self._bypass(request)
            if found.hit is not None:
                now = time.time()
                verdict = policy.satisfies(domain, found.hit, control, now)
                if verdict is not None:
                    return from_cache(found.hit, verdict)
                if not offline and policy.may_revalidate_later(domain, found.hit, control, now):
                    if not (control.only_if_cached or control.no_store):  # neither spends a call nor stores
                        self._refresh_later(request, found)
                    return from_cache(found.hit, "STALE")
                if policy.may_stand_in(domain, found.hit, control, now, offline):
                    stale = found.hit
            if offline:
                return from_cache(stale, "STALE") if stale is not None else offline_miss(domain)
            if control.only_if_cached:
                return not_cached(domain)
            # Taking the lock also looks at the entry again and, if it is still missing, reserves the upstream
            # start: one round trip (lead.lua), where lock, look-up and throttle were three.
            throttle_keys, throttle_args = self.limiter.plan(domain)
            plan = LeadPlan(self.keys.cache(primary.domain, primary.digest), throttle_keys, throttle_args)
            try:
                result = self.coalescer.run(
                    found.entry, LOCK_TTL_MS, domain.read_timeout + LOCK_MARGIN_SECONDS, domain.coalesce_timeout,
                    lambda token, ahead: self._lead(request, found, token, control, asked, ahead, throttle_args),
                    lambda result: policy.follower_may_take(result, primary.digest, request.forwarded),
                    lambda entry: usable(domain, entry, control, asked),
                    plan,
                )
            except NotShared as exc:
                if exc.reason == "private":
                    break
                continue
            except WaitingFull:
                self.metrics.count(domain.name, "throttle_refused")
                result = too_many_waiting(domain)
            except CoalesceTimeout as exc:
                result = json_result(
                    504, "Gateway Timeout", error="coalesce timeout", domain=exc.domain, message=str(exc)
                )
                result.cache = "COALESCE-TIMEOUT"
            except StoreUnavailable:
                return self._stand_in(domain, stale, self._bypass(request))
            return self._stand_in(domain, stale, result)
        # The answer is not one to share (private, no-store, Vary: *): this request asks for itself.
        result = self._call_upstream(request)
        result.cache = "PASS"
        return self._stand_in(domain, stale, result)

    def _stand_in(self, domain: DomainSettings, stale: ProxyResult | None, result: ProxyResult) -> ProxyResult:
        """Stale-if-error: the expired entry instead of a failed fetch (unreachable, timeout, 5xx, 429)."""
        if stale is None or not policy.failed(result):
            return result
        result.close_stream()
        self.metrics.count(domain.name, "stale_if_error")
        log.info("'%s' answered with an expired entry: the upstream call ended in %s", domain.name, result.status)
        answer = from_cache(stale, "STALE")
        answer.cache = "STALE-IF-ERROR"  # shown as STALE; it saved no upstream call (one was made, and failed)
        return answer

    def _refresh_later(self, request: ProxyRequest, found: Lookup) -> None:
        """Stale-while-revalidate: refresh the entry in a thread of this process, unless a refresh (or any
        fetch of it) runs anywhere already (the fill lock), or this process runs as many as it may."""
        if not self._refreshes.acquire(blocking=False):
            return
        started = False
        try:
            token = self.coalescer.try_lead(found.entry, LOCK_TTL_MS, request.domain.coalesce_timeout)
            if token is not None:
                detached = replace(request, client_gone=lambda: False)  # nobody waits on it to hang up
                thread = threading.Thread(
                    target=self._refresh, args=(detached, found, token), name="buddy-refresh", daemon=True
                )
                try:
                    thread.start()
                except RuntimeError:  # no thread to be had: let go at once, so that no request waits on it
                    log.warning("no thread for a background refresh of '%s'", request.domain.name)
                    self._let_go(found.entry, token, None)
                else:
                    started = True
        except StoreUnavailable:
            pass
        finally:
            if not started:
                self._refreshes.release()

    def _refresh(self, request: ProxyRequest, found: Lookup, token: str) -> None:
        domain = request.domain
        try:
            result = self._lead(request, found, token, policy.RequestControl(), time.time())
            result.close_stream()  # an over-size body: followers read it from the relay, which keeps going
            if result.cache == "HIT":
                return  # refreshed meanwhile by another request: nothing was fetched
            self.metrics.count(domain.name, "background_refreshes")
            if policy.failed(result):
                self.metrics.count(domain.name, "refresh_failures")
                log.info("background refresh of an entry of '%s' got %s; the expired entry stays", domain.name,
                         result.status)
        except Exception:
            log.exception("background refresh for '%s' failed", domain.name)
        finally:
            self._refreshes.release()

    def _tally(self, domain: str, result: ProxyResult) -> None:
        """Count what the request cost and saved (buffered; flushed to Redis once a second)."""
        if result.cache == "PASS":
            result.cache = "MISS"
            self.metrics.count(domain, "passthrough")
        elif result.cache == "COALESCE-TIMEOUT":
            self.metrics.count(domain, "coalesce_timeouts")
        elif result.cache in ("HIT", "COALESCED", "STALE"):
            saved = {} if result.body is None else {"bytes_saved": len(result.body), "ms_saved": result.fetch_ms}
            counter = {"HIT": "hits", "COALESCED": "coalesced", "STALE": "stale"}[result.cache]
            self.metrics.count_many(domain, {counter: 1, **saved})
        elif result.cache == "STALE-IF-ERROR":
            result.cache = "STALE"
            self.metrics.count(domain, "stale")
        elif result.cache == "OFFLINE":
            self.metrics.count(domain, "offline_refusals")
        elif result.cache == "NOT-CACHED":
            result.cache = "MISS"
            self.metrics.count(domain, "not_cached")
        else:
            self.metrics.count(domain, "misses")

    def _lead(
        self,
        request: ProxyRequest,
        found: Lookup,
        token: str,
        control: policy.RequestControl,
        asked: float,
        ahead: Ahead | None = None,
        throttle_args: list[int | str] | None = None,
    ) -> ProxyResult:
        """Fetch as the one leader; whatever happens, followers are handed a result or the lock is let go.

        `ahead`: what taking the lock found (FillLock.lead, run with `throttle_args`): the entry as it is now,
        and the upstream start already reserved when there was none."""
        domain, entry = request.domain, found.entry
        handed_off = False
        result: ProxyResult | None = None
        try:
            # The previous leader may have stored the entry between our miss and our lock.
            if ahead is None:
                hit = self.lookup(request, found.primary).hit
            else:
                hit = self._follow(request, found.primary, self.cache.decode(ahead.blob)).hit
            if hit is not None and usable(domain, hit, control, asked):
                return from_cache(hit, policy.satisfies(domain, hit, control, time.time()) or "HIT")
            reserved = None
            if ahead is not None and ahead.verdict is not None and throttle_args is not None:
                reserved = self.limiter.decision(ahead.verdict, throttle_args)
            try:
                result = self._call_upstream(request, reserved)
                handed_off = self._settle(request, found, token, result, store=not control.no_store)
                return result
            except StoreUnavailable:
                assert result is not None  # only storing and handing off touch Redis here
                result.cache = "BYPASS"
                return result
            except ClientGone:
                raise  # not handed off: the waiting requests take over from a leader that left
            except Exception:
                # A fault of ours must not become one upstream call per waiting request: they share this 500.
                log.exception("unexpected error while fetching for '%s'", domain.name)
                if result is not None:
                    result.close_stream()
                failed = json_result(500, "Internal Server Error", error="internal error", domain=domain.name,
                                     message="the proxy failed to handle this request; see its log")
                if not handed_off:
                    self._let_go(entry, token, failed)
                    handed_off = True
                return failed
        finally:
            if not handed_off:
                self._let_go(entry, token, None)

    def _settle(self, request: ProxyRequest, found: Lookup, token: str, result: ProxyResult, store: bool) -> bool:
        """Store the leader's answer as policy (and the client's no-store) allows and hand it to the followers;
        True once handed off."""
        domain, entry = request.domain, found.entry
        storage = policy.storage(domain, result)
        if not store:
            storage = replace(storage, ttl=None)
        elif storage.ttl is None and found.hit is not None and not policy.failed(result):
            # The upstream answered, and its answer is not one to keep (over-size, private, max-age=0): the
            # expired entry must not go on answering for it (stale-while-revalidate, stale-if-error).
            self.cache.forget(found.entry)
        if result.stream is not None:
            if not storage.shareable or storage.vary:  # a relay cannot tell who may take a varying body
                self.coalescer.hand_off(entry, token, None, private=True)
                return True
            result.stream = self.coalescer.relay(entry, token, result, storage.drop)
            return True  # the relay (or relay()) lets go of the lock
        target = found.primary
        if storage.vary:
            target = EntryId(domain.name, policy.variant_digest(found.primary.digest, storage.vary, request.forwarded))
            result.vary, result.variant = storage.vary, target.digest
        kept = ProxyResult(
            result.status, result.reason, storable_headers(result.headers, storage.drop), result.body,
            fetch_ms=result.fetch_ms, stored_at=result.stored_at, vary=result.vary, variant=result.variant,
            fresh_for=storage.ttl,
            request=policy.stored_request(request, build_url(domain, request.path, request.query), storage.vary),
        )
        # Followers of this entry read it from the cache when it is stored there (and the store lets go of the
        # lock and wakes them, in the same call), else a copy of it.
        release = (entry, token) if target == entry and storage.shareable else None
        stored = storage.ttl is not None and self._store(domain, found.primary, target, kept, storage, release)
        if not (stored and release):
            self.coalescer.hand_off(entry, token, None if stored and target == entry else kept,
                                    private=not storage.shareable)
        if storage.ttl is not None and not stored:
            result.cache = "BYPASS"
        return True

    def _let_go(self, entry: EntryId, token: str, shared: ProxyResult | None) -> None:
        try:
            self.coalescer.hand_off(entry, token, shared)
        except StoreUnavailable:
            pass  # the lock expires by itself

    def _store(
        self, domain: DomainSettings, primary: EntryId, target: EntryId, kept: ProxyResult, storage: policy.Storage,
        release: tuple[EntryId, str] | None = None,
    ) -> bool:
        """Store `kept` under `target`; a varying answer also leaves a pointer to its variants at `primary`.
        `release`: the fill lock (entry, token) that the same call lets go of, once stored (not when it fails)."""
        assert storage.ttl is not None
        pointer = None
        if storage.vary:
            longest = policy.kept_for(domain, max(domain.ttl_seconds, domain.negative_ttl_seconds))
            pointer = (primary, VaryPointer(storage.vary), longest)
        lock = None
        if release is not None:
            self.coalescer.keeper.drop(*release)  # nothing extends it from now on
            lock = (self.keys.lock(release[0]), release[1])
        try:
            self.cache.put(target, kept, policy.kept_for(domain, storage.ttl), pointer, lock)
        except StoreUnavailable:
            return False
        return True

    def _bypass(self, request: ProxyRequest) -> ProxyResult:
        result = self._call_upstream(request)
        result.cache = "BYPASS"
        return result

    def _call_upstream(self, request: ProxyRequest, reserved: Decision | None = None) -> ProxyResult:
        """Throttle, then fetch: wait for the reserved slot, or answer 429 at once when it is too far off.
        `reserved`: the shared limiter's verdict, already made (with the fill lock, lead.lua)."""
        domain = request.domain
        if reserved is None:
            decision, limiter = self._throttle(domain)
        else:
            decision, limiter = reserved, self.limiter
        if not decision.accepted:
            self.metrics.count(domain.name, "throttle_refused")
            return refused(domain, decision)
        if decision.delay > 0:
            if not self.waiting.enter(domain.name):
                # Every thread that sleeps here is one fewer for cache hits: past the cap, refuse at once.
                self._give_back(limiter, domain, decision)
                self.metrics.count(domain.name, "throttle_refused")
                return refused(domain, decision)
            try:
                self._sleep_for_slot(request, decision.delay)
            except ClientGone:
                self._give_back(limiter, domain, decision)
                self.metrics.count(domain.name, "client_gone")
                raise
            finally:
                self.waiting.leave(domain.name)
            self.metrics.count(domain.name, "throttle_delayed")
            self.metrics.count(domain.name, "throttle_delay_ms", int(decision.delay * 1000))
            if self.offline.on():  # switched offline while this request slept for its slot
                self._give_back(limiter, domain, decision)
                return offline_miss(domain)
        result = self._fetch(request)
        if decision.delay > 0:
            result.extra.append(("X-Throttle-Delay", f"{decision.delay:.3f}"))
        if limiter is self.limiter:
            self._learn(domain, result, decision)
        return result

    @staticmethod
    def _sleep_for_slot(request: ProxyRequest, delay: float) -> None:
        """Sleep until the reserved slot, in short steps, giving up as soon as the client has hung up
        (a leader's lock is kept alive meanwhile by the LockKeeper)."""
        until = time.monotonic() + delay
        while (left := until - time.monotonic()) > 0:
            if request.client_gone():
                raise ClientGone(request.domain.name)
            time.sleep(min(SLOT_CHECK_SECONDS, left))
        if request.client_gone():  # one last look: a client that left during the last step gets nothing sent
            raise ClientGone(request.domain.name)

    def _give_back(self, limiter: RateLimiter | LocalLimiter, domain: DomainSettings, decision: Decision) -> None:
        try:
            limiter.release(domain, decision)
        except StoreUnavailable:
            pass  # the reservation ages out with its window

    def _throttle(self, domain: DomainSettings) -> tuple[Decision, RateLimiter | LocalLimiter]:
        try:
            return self.limiter.acquire(domain), self.limiter
        except StoreUnavailable:
            return self.fallback_limiter.acquire(domain), self.fallback_limiter

    def _learn(self, domain: DomainSettings, result: ProxyResult, decision: Decision) -> None:
        """An upstream 429/503 pauses the domain (its Retry-After, else exponential); success resets the level."""
        try:
            if result.status in (429, 503):
                pause = policy.retry_after_seconds(result.header("Retry-After"), time.time())
                if pause is not None:
                    pause = min(pause, self.settings.throttling["max_upstream_pause"])
                self.limiter.penalize(domain, pause)
            elif decision.level and result.status < 500:
                self.limiter.reset(domain)
        except StoreUnavailable:
            pass

    def _fetch(self, request: ProxyRequest) -> ProxyResult:
        domain = request.domain
        url = build_url(domain, request.path, request.query)
        # A HEAD miss fetches the GET so that the entry it stores serves both.
        method = "GET" if request.method == "HEAD" else request.method
        started = time.monotonic()
        try:
            result = self.upstream.send(domain, method, url, request.forwarded, request.body)
        except UpstreamError as exc:
            # The cause's text would carry the URL, and with it any credentials in the query: name its type only.
            log.warning("%s (%s)", exc, type(exc.__cause__).__name__)
            outcome = exc.kind if exc.kind in ("timeout", "malformed") else "unreachable"
            self._count_upstream(domain.name, outcome, started)
            self.metrics.error(domain.name, outcome, str(exc))
            error = "upstream timeout" if exc.status == 504 else "upstream unavailable"
            reason = "Gateway Timeout" if exc.status == 504 else "Bad Gateway"
            return json_result(exc.status, reason, error=error, domain=domain.name, message=str(exc))
        result.fetch_ms = self._count_upstream(domain.name, str(result.status), started)
        if result.status >= 500 or result.status == 429:
            self.metrics.error(domain.name, str(result.status), f"upstream '{domain.name}' answered {result.status}",
                               retry_after=result.header("Retry-After") or None)
        return result

    def _count_upstream(self, domain: str, outcome: str, started: float) -> int:
        elapsed_ms = int((time.monotonic() - started) * 1000)
        self.metrics.count(domain, "upstream_requests")
        self.metrics.count(domain, "upstream_ms", elapsed_ms)
        self.metrics.count(domain, f"status:{outcome}")
        return elapsed_ms


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


def too_many_waiting(domain: DomainSettings) -> ProxyResult:
    """429 for a request that would wait on an identical one while this worker has no thread to spare."""
    result = json_result(
        429, "Too Many Requests", error="too many waiting", domain=domain.name, retry_after=WAITING_RETRY_AFTER,
        message=f"too many requests to '{domain.name}' are waiting in this worker; try again shortly",
    )
    result.headers.append(("Retry-After", str(WAITING_RETRY_AFTER)))
    return result


def usable(domain: DomainSettings, entry: ProxyResult, control: policy.RequestControl, asked: float) -> bool:
    """May a request that missed take this entry once it is in the cache? If it was fetched after the request
    was made (whatever the request asked: `no-cache`, `max-age=0`, a `min-fresh` beyond the TTL), or if it
    satisfies the request."""
    return entry.stored_at >= asked or policy.satisfies(domain, entry, control, time.time()) is not None


def offline_miss(domain: DomainSettings) -> ProxyResult:
    result = json_result(
        504, "Gateway Timeout", error="offline", domain=domain.name,
        message=f"the proxy is offline and holds no answer to this request for '{domain.name}'; nothing was sent "
                "upstream (turn offline mode off with `api-buddy offline off`, or unset BUDDY_OFFLINE)",
    )
    result.cache = "OFFLINE"
    return result


def not_cached(domain: DomainSettings) -> ProxyResult:
    """504 for `Cache-Control: only-if-cached` when the cache cannot answer (RFC 9111 5.2.1.7)."""
    result = json_result(
        504, "Gateway Timeout", error="not cached", domain=domain.name,
        message="the request said only-if-cached and the cache holds no answer it accepts; nothing was sent upstream",
    )
    result.cache = "NOT-CACHED"
    return result


def from_cache(entry: ProxyResult, label: str) -> ProxyResult:
    """A stored entry as the client gets it: labelled HIT or STALE, with its true Age."""
    entry.cache = label
    entry.headers = [(name, value) for name, value in entry.headers if name.lower() != "age"]
    entry.extra.append(("Age", str(max(0, int(time.time() - entry.stored_at)))))
    return entry
