"""The request flow: look up, decide (buddy.policy), then answer from the cache, or coalesce and fetch as the leader,
store, and answer.

For a cacheable request the policy's decision against what is stored says FRESH (answer with it), STALE (answer with
it expired; maybe refresh it in the background) or ASK. To ask, a request takes the entry's fill lock or follows
whoever holds it (buddy.coalesce); the leader fetches through the Fetcher (rate limits), conditionally when the
stored entry has a validator: a 304 freshens the stored answer without moving its body again. Every answer to an
unsafe request that reached the upstream without an error invalidates the stored GET answers of its URL. Last, a
client's own conditional (If-None-Match, If-Modified-Since) is answered: 304 when the answer it gets matches.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Callable, NamedTuple

from buddy import answers, parking, policy
from buddy.answers import from_cache, json_result
from buddy.background import ShortLived
from buddy.coalesce import Coalescer, Fill, NotShared, WaitingFull
from buddy.codec import VaryPointer
from buddy.errors import ClientGone, CoalesceTimeout, StoreUnavailable
from buddy.fetcher import Fetcher
from buddy.messages import ProxyRequest, ProxyResult
from buddy.redis_keys import EntryId, RedisKeys
from buddy.settings import DomainSettings, Settings
from buddy.store.fill_lock import LOCK_TTL_MS, Ahead, LeadPlan
from buddy.store.metrics import MetricsRecorder
from buddy.store.offline import OfflineSwitch
from buddy.store.rate_limiter import RateLimiter
from buddy.store.response_cache import ResponseCache
from buddy.upstream import build_url, keep_access_key, storable_headers

log = logging.getLogger("buddy.service")
LOCK_MARGIN_SECONDS = 2.0
REFRESHES_PER_PROCESS = 8  # background refreshes (stale-while-revalidate) one worker runs at once at most
# X-Cache of an answer, and the counter it adds to (service._tally); an answer a label does not name is a miss.
LABEL_COUNTERS = {"HIT": "hits", "COALESCED": "coalesced", "STALE": "stale"}

__all__ = ["Lookup", "Looked", "ProxyService", "json_result"]


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
                return answers.offline_miss(domain)
            if control.only_if_cached:
                return answers.not_cached(domain)
            result = self.fetcher.call(request)
            self._invalidate(request, result)
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
                    lambda fill, ahead: self._lead(request, found, fill, control, asked, ahead, plan),
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
            result = self._lead(request, found, fill, policy.RequestControl(), time.time())
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

    # -- the leader ---------------------------------------------------------------------------------------

    def _lead(
        self,
        request: ProxyRequest,
        found: Lookup,
        fill: Fill,
        control: policy.RequestControl,
        asked: float,
        ahead: Ahead | None = None,
        plan: LeadPlan | None = None,
    ) -> ProxyResult:
        """Fetch as the one leader; whatever happens, the fill ends (see Fill): its followers are handed a result,
        or the lock is let go.

        `ahead`: what taking the lock found (FillLock.lead, run with `plan`): the entry as it is now, and the
        upstream start already reserved when there was none."""
        domain = request.domain
        result: ProxyResult | None = None
        try:
            # The previous leader may have stored the entry between our miss and our lock.
            if ahead is None:
                hit = self.lookup(request, found.primary).hit
            else:
                primary_key = self.keys.cache(found.primary.domain, found.primary.digest)  # the key lead.lua read
                hit = self._follow(request, found.primary, self.cache.complete(primary_key, ahead.blob)).hit
            if hit is not None and policy.usable(domain, hit, control, asked):
                use = policy.reuse(domain, hit, control, time.time()).use
                return from_cache(hit, "STALE" if use is policy.Use.STALE else "HIT")
            stored = hit if hit is not None else found.hit  # what a 304 would freshen
            reserved = None
            if ahead is not None and ahead.verdict is not None and plan is not None:
                reserved = self.limiter.decision(ahead.verdict, plan.throttle_keys, plan.throttle_args)
            try:
                conditional = policy.validators(stored) if stored is not None and not control.no_store else ()
                result = self.fetcher.call(request, reserved, conditional)
                if conditional:
                    result = self._after_conditional(request, found, fill, stored, result, control)
                if fill.open:
                    self._settle(request, found, fill, result, store=not control.no_store)
                self._invalidate(request, result)
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
                failed = answers.internal_error(domain)
                if fill.open:
                    fill.share(failed)
                return failed
        finally:
            fill.abandon()  # (nothing, once it has ended, or while a relay ends it)

    def _after_conditional(
        self, request: ProxyRequest, found: Lookup, fill: Fill, stored: ProxyResult | None, result: ProxyResult,
        control: policy.RequestControl,
    ) -> ProxyResult:
        """The upstream's answer to the leader's conditional request. A 304 freshens the stored answer (stored, the
        fill ended); a 304 about another representation is asked again, whole; anything else is the new answer,
        for the caller to settle as any other."""
        domain = request.domain
        if result.status != 304 or stored is None:
            if result.status == 200:
                self.metrics.count(domain.name, "revalidated_changed")
            return result
        merged = policy.freshened(stored, result, result.headers)
        if merged is None:
            log.info("'%s' answered 304 about another representation than the stored one; asking again, whole",
                     domain.name)
            return self.fetcher.call(request)
        storage = policy.storage(domain, merged, took=result.fetch_ms / 1000)
        kept = replace(merged, headers=storable_headers(merged.headers, storage.drop), fresh_for=storage.ttl,
                       rules=storage.rules, upstream_headers=None)
        self.metrics.count_many(domain.name, {"revalidated_unchanged": 1,
                                              "revalidation_bytes_saved": len(stored.body or b"")})
        if storage.ttl is None or control.no_store:
            self.cache.forget(found.entry)  # no longer to be kept (private, no-store now): nor to answer stale
            fill.share(kept) if storage.shareable else fill.private()
        elif not self._store(domain, found.primary, found.entry, kept, storage, fill, url=self._url_if_get(request)):
            fill.share(kept)
        return from_cache(kept.copy(), "REVALIDATED")

    def _settle(self, request: ProxyRequest, found: Lookup, fill: Fill, result: ProxyResult, store: bool) -> None:
        """Store the leader's answer as policy (and the client's no-store) allows, and end the fill: its followers
        get the stored entry, a copy, or the relay of a streamed body."""
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
                fill.private()
                return
            keep = self._keeper(request, found, fill, result) if result.live and store else None
            # The relay ends the fill when the body ends (with a live stream kept once whole, by storing it).
            result.stream = fill.relay(result, storage.drop, keep, self.settings.cache.max_cache_response_size)
            return
        target = found.primary
        if storage.vary:
            target = EntryId(domain.name, policy.variant_digest(found.primary.digest, storage.vary, request.forwarded))
            result.vary, result.variant = storage.vary, target.digest
        kept = ProxyResult(
            result.status, result.reason, storable_headers(result.headers, storage.drop), result.body,
            fetch_ms=result.fetch_ms, stored_at=result.stored_at, vary=result.vary, variant=result.variant,
            fresh_for=storage.ttl, rules=storage.rules,
            request=policy.stored_request(request, build_url(domain, request.path, request.query), storage.vary),
        )
        # Followers of this entry read it from the cache when it is stored there (and the store lets go of the
        # lock and wakes them, in the same call), else a copy of it.
        ends_fill = target == entry and storage.shareable
        stored = storage.ttl is not None and self._store(domain, found.primary, target, kept, storage,
                                                         fill if ends_fill else None, url=self._url_if_get(request))
        if fill.open:
            if not storage.shareable:
                fill.private()
            else:
                fill.share(None if stored and target == entry else kept)
        if storage.ttl is not None and not stored:
            result.cache = "BYPASS"

    def _keeper(self, request: ProxyRequest, found: Lookup, fill: Fill, result: ProxyResult
                ) -> Callable[[bytes], bool] | None:
        """For a live stream (an LLM's events) that policy would keep were it whole: what stores it once it has
        ended whole (True: stored, the fill ended by the store), for later requests to replay as a hit."""
        domain = request.domain
        headers = [(name, value) for name, value in result.headers if name.lower() != "content-length"]
        whole = policy.storage(domain, replace(result, body=b"", stream=None))
        if whole.ttl is None or whole.vary or not whole.shareable:
            return None

        def keep(body: bytes) -> bool:
            kept = ProxyResult(
                result.status, result.reason, storable_headers(headers, whole.drop), body, fetch_ms=result.fetch_ms,
                stored_at=result.stored_at, fresh_for=whole.ttl, rules=whole.rules,
                request=policy.stored_request(request, build_url(domain, request.path, request.query)),
            )
            return self._store(domain, found.primary, found.primary, kept, whole, fill, url=self._url_if_get(request))

        return keep

    def _store(
        self, domain: DomainSettings, primary: EntryId, target: EntryId, kept: ProxyResult, storage: policy.Storage,
        fill: Fill | None = None, url: str | None = None,
    ) -> bool:
        """Store `kept` under `target`; a varying answer also leaves a pointer to its variants at `primary`.
        `fill`: the fill the same call ends, letting go of its lock, once stored (not when storing fails);
        `url`: a GET answer's upstream URL, in whose index it is noted (for invalidation)."""
        assert storage.ttl is not None
        pointer = None
        if storage.vary:
            longest = policy.kept_for(domain, max(domain.ttl_seconds, domain.negative_ttl_seconds))
            pointer = (primary, VaryPointer(storage.vary), longest)
        if fill is not None:
            fill.storing()
        try:
            self.cache.put(target, kept, policy.kept_for(domain, storage.ttl), pointer,
                           fill.lock if fill is not None else None, url=url)
        except StoreUnavailable:
            return False
        if fill is not None:
            fill.stored()
        return True

    @staticmethod
    def _url_if_get(request: ProxyRequest) -> str | None:
        """A GET's (or HEAD's) upstream URL: its answers are what an unsafe request to that URL invalidates."""
        if request.method not in ("GET", "HEAD"):
            return None
        return build_url(request.domain, request.path, request.query)

    def _invalidate(self, request: ProxyRequest, result: ProxyResult) -> None:
        """RFC 9111 4.4: an unsafe request answered without an error removes the stored GET answers of its URL (and
        of those its Location and Content-Location name on the same upstream), in every worker's memory too."""
        domain = request.domain
        if request.method in policy.SAFE_METHODS:
            return
        urls = policy.invalidated_urls(domain, request.method, build_url(domain, request.path, request.query), result)
        if not urls:
            return
        try:
            removed = self.cache.invalidate(domain.name, urls)
        except StoreUnavailable:
            log.warning("could not invalidate the stored answers of a %s to '%s': Redis is unavailable",
                        request.method, domain.name)
            return
        self.metrics.count(domain.name, "invalidations", removed)
