"""Rate-limited upstream calls: the throttle, the wait for a slot, the call, and what the upstream's answer teaches
the limiter.

One call per request (`Fetcher.call`): the shared limiter reserves the earliest start that keeps every window of
the mapping within its limits (one Lua call, atomic across workers and hosts; or this process's share of each
limit while Redis is unreachable). A start further off than `throttling.progressive_max_delay` is a 429 at once,
with no slot used. A nearer one is slept for, in short steps, giving the slot back as soon as the client hangs up;
every thread that sleeps here is one fewer for cache hits, so past the waiting room's cap the request is refused
instead. An upstream 429 or 503 pauses the mapping (its Retry-After, else exponential backoff); a normal answer
resets the backoff.
"""
from __future__ import annotations

import logging
import time

from buddy import answers, counters, policy
from buddy.errors import ClientGone, StoreUnavailable, UpstreamError
from buddy.forwarding import build_url
from buddy.messages import ProxyRequest, ProxyResult
from buddy.settings import DomainSettings, Settings
from buddy.store.metrics import MetricsRecorder
from buddy.store.offline import OfflineSwitch
from buddy.store.rate_limiter import Decision, LocalLimiter, RateLimiter, WaitingRoom
from buddy.upstream import UpstreamClient

log = logging.getLogger("buddy.service")
SLOT_CHECK_SECONDS = 0.5  # how often a request sleeping for its rate-limit slot checks that its client is there
PAUSES = 4  # a request waits out a pause and asks again at most this often (a pause set again meanwhile)


class Fetcher:
    """`call(request)`: the upstream's answer to one request, within the mapping's rate limits."""

    def __init__(
        self,
        settings: Settings,
        upstream: UpstreamClient,
        limiter: RateLimiter,
        fallback: LocalLimiter,
        waiting: WaitingRoom,
        metrics: MetricsRecorder,
        offline: OfflineSwitch,
    ) -> None:
        self.settings = settings
        self.upstream = upstream
        self.limiter = limiter
        self.fallback = fallback
        self.waiting = waiting
        self.metrics = metrics
        self.offline = offline

    def call(self, request: ProxyRequest, reserved: Decision | None = None,
             conditional: tuple[tuple[str, str], ...] = ()) -> ProxyResult:
        """Throttle, then fetch: wait for the slot, or answer 429 at once when it is too far off. `reserved`: the
        shared limiter's verdict, already made (with the fill lock, lead.lua); `conditional`: validators that make
        the request conditional (If-None-Match, If-Modified-Since), sent but no part of its key."""
        domain = request.domain
        partition = policy.partition(request)
        if reserved is None:
            decision, limiter = self._throttle(domain, partition)
        else:
            decision, limiter = reserved, self.limiter
        waited = 0.0
        for _ in range(PAUSES):
            if not decision.accepted:
                self.metrics.count(domain.name, "throttle_refused")
                return answers.refused(domain, decision)
            if decision.delay > 0:
                refused = self._wait(request, limiter, decision)
                if refused is not None:
                    return refused
                waited += decision.delay
            if decision.reserved:
                break
            decision, limiter = self._throttle(domain, partition)  # the pause is over: now a slot
        else:
            return answers.refused(domain, decision)
        result = self._fetch(request, conditional)
        if waited > 0:
            result.extra.append(("X-Throttle-Delay", f"{waited:.3f}"))
        if limiter is self.limiter:
            self._learn(domain, result, decision, partition)
        return result

    def _wait(self, request: ProxyRequest, limiter: RateLimiter | LocalLimiter, decision: Decision
              ) -> ProxyResult | None:
        """Sleep for the slot (or the pause); an answer instead when the request may not wait after all."""
        domain = request.domain
        if not self.waiting.enter(domain.name):
            # Every thread that sleeps here is one fewer for cache hits: past the cap, refuse at once.
            self._give_back(limiter, domain, decision)
            self.metrics.count(domain.name, "throttle_refused")
            return answers.refused(domain, decision)
        try:
            self._sleep_for_slot(request, decision.delay)
        except ClientGone:
            self._give_back(limiter, domain, decision)
            self.metrics.count(domain.name, "client_gone")
            raise
        finally:
            self.waiting.leave(domain.name)
        self.metrics.count_many(domain.name, {"throttle_delayed": 1, "throttle_delay_ms": int(decision.delay * 1000)})
        if self.offline.on():  # switched offline while this request slept for its slot
            self._give_back(limiter, domain, decision)
            return answers.offline_miss(domain)
        return None

    def paused(self, request: ProxyRequest) -> bool:
        """Is this request's mapping, or its credential partition, paused by an upstream's 429/503 (or by refusals)
        right now? False when Redis cannot say."""
        try:
            return self.limiter.paused(request.domain, policy.partition(request)) > 0
        except StoreUnavailable:
            return False

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

    def _throttle(self, domain: DomainSettings, partition: str) -> tuple[Decision, RateLimiter | LocalLimiter]:
        try:
            return self.limiter.acquire(domain, partition), self.limiter
        except StoreUnavailable:
            return self.fallback.acquire(domain), self.fallback

    def _learn(self, domain: DomainSettings, result: ProxyResult, decision: Decision, partition: str) -> None:
        """An upstream 429/503 pauses the requests with the same credentials as the one that got it, or the whole
        mapping when it carried none (its Retry-After, else exponential); success resets the level."""
        try:
            answered = counters.outcome(str(result.status))
            if answered is not None and answered.pushes_back:
                pause = policy.retry_after_seconds(result.header("Retry-After"), time.time())
                if pause is not None:
                    pause = min(pause, self.settings.throttling.max_upstream_pause)
                self.limiter.penalize(domain, pause, partition)
            elif decision.level and result.status < 500:
                self.limiter.reset(domain, partition)
        except StoreUnavailable:
            pass

    def _fetch(self, request: ProxyRequest, conditional: tuple[tuple[str, str], ...]) -> ProxyResult:
        domain = request.domain
        url = build_url(domain, request.path, request.query)
        # A HEAD miss fetches the GET so that the entry it stores serves both.
        method = "GET" if request.method == "HEAD" else request.method
        headers = {**request.forwarded, **dict(conditional)} if conditional else request.forwarded
        started = time.monotonic()
        try:
            result = self.upstream.send(domain, method, url, headers, request.body)
        except UpstreamError as exc:
            # The cause's text would carry the URL, and with it any credentials in the query: name its type only.
            log.warning("%s (%s)", exc, type(exc.__cause__).__name__)
            failure = counters.outcome(exc.kind) or counters.OUTCOMES["unreachable"]  # a broken body among them
            self._count_upstream(domain.name, failure, started)
            self.metrics.error(domain.name, failure.name, str(exc))
            error = "upstream timeout" if exc.status == 504 else "upstream unavailable"
            reason = "Gateway Timeout" if exc.status == 504 else "Bad Gateway"
            return answers.json_result(exc.status, reason, error=error, domain=domain.name, message=str(exc))
        answered = counters.outcome(str(result.status)) or counters.OUTCOMES["malformed"]
        result.fetch_ms = self._count_upstream(domain.name, answered, started)
        if answered.is_error:
            self.metrics.error(domain.name, str(result.status), f"upstream '{domain.name}' answered {result.status}",
                               retry_after=result.header("Retry-After") or None)
        return result

    def _count_upstream(self, domain: str, outcome: counters.Outcome, started: float) -> int:
        elapsed_ms = int((time.monotonic() - started) * 1000)
        self.metrics.count_many(domain, {"upstream_requests": 1, "upstream_ms": elapsed_ms, outcome.field: 1})
        return elapsed_ms
