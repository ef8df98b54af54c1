"""The request flow: look up, decide (buddy.policy), then answer from the cache, or coalesce and fetch as the leader,
store, and answer.

For a cacheable request the policy's decision against what is stored says FRESH (answer with it), STALE (answer with
it expired; maybe refresh it in the background) or ASK. To ask, a request takes the entry's fill lock and leads
(buddy.leader: fetch, store, end the fill) or follows whoever holds it (buddy.coalesce; parked without a thread
under buddy's worker, buddy.parking). An expired entry may stand in for a failed fetch (stale-if-error). Last, a
client's own conditional (If-None-Match, If-Modified-Since) is answered: 304 when the answer it gets matches.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace

from buddy import answers, parking, policy
from buddy.answers import from_cache, json_result
from buddy.background import ShortLived
from buddy.coalesce import Coalescer, Fill, NotShared, WaitingFull
from buddy.errors import CoalesceTimeout, StoreUnavailable
from buddy.fetcher import Fetcher
from buddy.forwarding import keep_access_key
from buddy.leader import Leader
from buddy.lookup import Looked, Lookup, look_up
from buddy.messages import ProxyRequest, ProxyResult
from buddy.redis_keys import EntryId, RedisKeys
from buddy.settings import DomainSettings, Settings
from buddy.store.fill_lock import LOCK_TTL_MS, LeadPlan
from buddy.store.metrics import MetricsRecorder
from buddy.store.offline import OfflineSwitch
from buddy.store.rate_limiter import RateLimiter
from buddy.store.response_cache import ResponseCache

log = logging.getLogger("buddy.service")
LOCK_MARGIN_SECONDS = 2.0
REFRESHES_PER_PROCESS = 8  # background refreshes (stale-while-revalidate) one worker runs at once at most
# X-Cache of an answer, and the counter it adds to (service._tally); an answer a label does not name is a miss.
LABEL_COUNTERS = {"HIT": "hits", "COALESCED": "coalesced", "STALE": "stale"}

__all__ = ["Lookup", "Looked", "ProxyService", "json_result"]


class ProxyService:
    """look up -> decide -> answer from the cache, or coalesce -> fetch -> store."""

    def __init__(
        self,
        settings: Settings,
        keys: RedisKeys,
        cache: ResponseCache,
        fetcher: Fetcher,
        coalescer: Coalescer,
        limiter: RateLimiter,
        metrics: MetricsRecorder,
        offline: OfflineSwitch,
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.cache = cache
        self.fetcher = fetcher
        self.coalescer = coalescer
        self.limiter = limiter
        self.metrics = metrics
        self.offline = offline
        self.leader = Leader(settings, keys, cache, fetcher, limiter, metrics)
        self.refreshers = ShortLived("buddy-refresh", REFRESHES_PER_PROCESS)  # stale-while-revalidate

    # -- answering ---------------------------------------------------------------------------------------

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
            if policy.reuse(request.domain, found.hit, control, time.time()).use is policy.Use.FRESH:
                return self._finish(request, from_cache(found.hit, "HIT")), None
        return None, Looked(found, asked)

    def handle(self, request: ProxyRequest, looked: Looked | None = None) -> ProxyResult:
        """The answer to a request; `looked`: the lookup `fresh_hit` made for it a moment ago (not made again)."""
        return self._finish(request, self._answer(request, looked))

    def _finish(self, request: ProxyRequest, result: ProxyResult) -> ProxyResult:
        """Count what the answer cost and saved, and shape it for this client: a 304 for its own conditional that
        the answer meets, no body for HEAD, the access key where it spelled it."""
        self._tally(request.domain.name, result)
        if request.conditions and policy.not_modified(request.conditions, result):
            result.close_stream()
            result = policy.as_not_modified(result)
        if request.method == "HEAD" and result.stream is not None:
            result.close_stream()  # a relay keeps reading for its followers; headers (Content-Length) stay
            result.stream = iter(())
        if request.key_prefix or request.key_param:
            result.headers = keep_access_key(result.headers, request.domain, request.key_prefix, request.key_param)
        return result

    def lookup(self, request: ProxyRequest, primary: EntryId) -> Lookup:
        """Read the request's entry, following a vary pointer to the variant for this request's headers."""
        return look_up(self.cache, request, primary)

    def _answer(self, request: ProxyRequest, looked: Looked | None = None) -> ProxyResult:
        domain = request.domain
        offline = self.offline.on()
        control = policy.request_control(request.header("Cache-Control"), request.header("Pragma"))
        if not policy.cacheable_request(request):
            if offline:
                return answers.offline_miss(domain)
            if control.only_if_cached:
                return answers.not_cached(domain)
            result = self.fetcher.call(request)
            self.leader.invalidate(request, result)
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
                    return answers.offline_miss(domain) if offline else answers.not_cached(domain)
                return self._bypass(request)
            decision = policy.reuse(domain, found.hit, control, time.time(), offline)
            if found.hit is not None and decision.use is policy.Use.FRESH:
                # A parked follower run again finds the answer it waited on: coalesced, like those who waited here.
                return from_cache(found.hit, "COALESCED" if parking.resumed(found.entry) else "HIT")
            if found.hit is not None and decision.use is policy.Use.STALE:
                if decision.refresh:
                    self._refresh_later(request, found)
                return from_cache(found.hit, "STALE")
            if decision.stand_in:
                stale = found.hit
            if offline:
                return answers.offline_miss(domain)
            if control.only_if_cached:
                return answers.not_cached(domain)
            if stale is not None and self.fetcher.paused(request):
                return self._stand_in(domain, stale, None)  # paused: the expired entry now, no slot, no call
            # Taking the lock also looks at the entry again and, if it is still missing, reserves the upstream
            # start: one round trip (lead.lua), where lock, look-up and throttle were three.
            throttle_keys, throttle_args = self.limiter.plan(domain, policy.partition(request))
            plan = LeadPlan(self.keys.cache(primary.domain, primary.digest), throttle_keys, throttle_args)
            parked = parking.resumed(found.entry)
            try:
                result = self.coalescer.run(
                    found.entry, LOCK_TTL_MS, domain.read_timeout + LOCK_MARGIN_SECONDS, domain.coalesce_timeout,
                    lambda fill, ahead: self.leader.lead(request, found, fill, control, asked, ahead, plan),
                    lambda result: policy.follower_may_take(result, primary.digest, request.forwarded),
                    lambda entry: policy.usable(domain, entry, control, asked),
                    plan,
                    following=(parked.holder, parked.started) if parked is not None else None,
                    parks=parking.parkable(),
                )
            except NotShared as exc:
                if exc.reason == "private":
                    break
                continue
            except WaitingFull as exc:
                if parking.parkable():  # it waits without a thread: the worker keeps the connection, runs it again
                    hub = self.coalescer.hub
                    raise parking.Parked(found.entry, exc.holder, exc.started, request.body, hub) from None
                self.metrics.count(domain.name, "throttle_refused")
                result = answers.too_many_waiting(domain)
            except CoalesceTimeout as exc:
                result = answers.coalesce_timeout(exc.domain, str(exc))
            except StoreUnavailable:
                return self._stand_in(domain, stale, self._bypass(request))
            return self._stand_in(domain, stale, result)
        # The answer is not one to share (private, no-store, Vary: *): this request asks for itself.
        result = self.fetcher.call(request)
        result.cache = "PASS"
        return self._stand_in(domain, stale, result)

    def _stand_in(self, domain: DomainSettings, stale: ProxyResult | None, result: ProxyResult | None) -> ProxyResult:
        """Stale-if-error: the expired entry instead of a failed fetch (unreachable, timeout, 5xx, 429), or instead
        of a fetch at all while the mapping is paused (`result` None)."""
        if result is not None and (stale is None or not policy.failed(result)):
            return result
        assert stale is not None
        if result is not None:
            result.close_stream()
            log.info("'%s' answered with an expired entry: the upstream call ended in %s", domain.name, result.status)
        self.metrics.count(domain.name, "stale_if_error")
        answer = from_cache(stale, "STALE")
        answer.cache = "STALE-IF-ERROR"  # shown as STALE; it saved no upstream call (one was made, failed, or paused)
        return answer

    def _bypass(self, request: ProxyRequest) -> ProxyResult:
        result = self.fetcher.call(request)
        result.cache = "BYPASS"
        return result

    def _tally(self, domain: str, result: ProxyResult) -> None:
        """Count what the request cost and saved (buffered; flushed to Redis once a second)."""
        label = result.cache
        if label == "PASS":
            result.cache = "MISS"
            self.metrics.count(domain, "passthrough")
        elif label == "COALESCE-TIMEOUT":
            self.metrics.count(domain, "coalesce_timeouts")
        elif label in LABEL_COUNTERS:
            saved = {} if result.body is None else {"bytes_saved": len(result.body), "ms_saved": result.fetch_ms}
            self.metrics.count_many(domain, {LABEL_COUNTERS[label]: 1, **saved})
        elif label == "STALE-IF-ERROR":
            result.cache = "STALE"
            self.metrics.count(domain, "stale")
        elif label == "OFFLINE":
            self.metrics.count(domain, "offline_refusals")
        elif label == "NOT-CACHED":
            result.cache = "MISS"
            self.metrics.count(domain, "not_cached")
        else:  # MISS, REVALIDATED (asked upstream, body from the cache), BYPASS
            self.metrics.count(domain, "misses")

    # -- stale-while-revalidate --------------------------------------------------------------------------

    def _refresh_later(self, request: ProxyRequest, found: Lookup) -> None:
        """Stale-while-revalidate: refresh the entry in a thread of this process, unless a refresh (or any
        fetch of it) runs anywhere already (the fill lock), or this process runs as many as it may."""
        if not self.refreshers.reserve():
            return
        started = False
        try:
            fill = self.coalescer.try_lead(found.entry, LOCK_TTL_MS, request.domain.coalesce_timeout)
            if fill is not None:
                detached = replace(request, client_gone=lambda: False)  # nobody waits on it to hang up
                try:
                    self.refreshers.run(self._refresh, detached, found, fill)
                except RuntimeError:  # no thread to be had: let go at once, so that no request waits on it
                    log.warning("no thread for a background refresh of '%s'", request.domain.name)
                    fill.abandon()
                else:
                    started = True
        except StoreUnavailable:
            pass
        finally:
            if not started:
                self.refreshers.release()

    def _refresh(self, request: ProxyRequest, found: Lookup, fill: Fill) -> None:
        domain = request.domain
        try:
            result = self.leader.lead(request, found, fill, policy.RequestControl(), time.time())
            result.close_stream()  # an over-size body: followers read it from the relay, which keeps going
            if result.cache in ("HIT", "STALE"):
                return  # refreshed meanwhile by another request: nothing was fetched
            self.metrics.count(domain.name, "background_refreshes")
            if policy.failed(result):
                self.metrics.count(domain.name, "refresh_failures")
                log.info("background refresh of an entry of '%s' got %s; the expired entry stays", domain.name,
                         result.status)
        except Exception:
            log.exception("background refresh for '%s' failed", domain.name)
