"""The leader: the one request of a fill that asks the upstream, and what it does with the answer.

It looks once more (the previous leader may have stored the entry meanwhile), fetches through the Fetcher
(conditionally when the stored entry has a validator: a 304 freshens it without moving its body again), stores the
answer as policy allows, and ends the fill (buddy.coalesce.Fill), whatever happens: its followers get the stored
entry, a copy, or the relay of a streamed body. An answer to an unsafe request that reached the upstream without
an error invalidates the stored GET answers of its URL.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Callable

from buddy import answers, policy
from buddy.answers import from_cache
from buddy.coalesce import Fill
from buddy.codec import VaryPointer
from buddy.errors import ClientGone, StoreUnavailable
from buddy.fetcher import Fetcher
from buddy.forwarding import build_url, storable_headers
from buddy.lookup import Lookup, follow_pointer, look_up
from buddy.messages import ProxyRequest, ProxyResult
from buddy.redis_keys import EntryId, RedisKeys
from buddy.settings import DomainSettings, Settings
from buddy.store.fill_lock import Ahead, LeadPlan
from buddy.store.metrics import MetricsRecorder
from buddy.store.rate_limiter import RateLimiter
from buddy.store.response_cache import ResponseCache

log = logging.getLogger("buddy.service")


class Leader:
    """`lead(request, found, fill, ...)`: fetch as a fill's one leader, store, and end the fill."""

    def __init__(
        self, settings: Settings, keys: RedisKeys, cache: ResponseCache, fetcher: Fetcher, limiter: RateLimiter,
        metrics: MetricsRecorder,
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.cache = cache
        self.fetcher = fetcher
        self.limiter = limiter
        self.metrics = metrics

    def lead(
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
                hit = look_up(self.cache, request, found.primary).hit
            else:
                primary_key = self.keys.cache(found.primary.domain, found.primary.digest)  # the key lead.lua read
                read = self.cache.complete(primary_key, ahead.blob)
                hit = follow_pointer(self.cache, request, found.primary, read).hit
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
                self.invalidate(request, result)
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

    def invalidate(self, request: ProxyRequest, result: ProxyResult) -> None:
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
