"""Request coalescing across every worker and host on one Redis: one leader fetches, the others wait for its result."""
from __future__ import annotations

import secrets
import time
from typing import Callable, Iterable, Iterator

import redis

from buddy import codec
from buddy.errors import BrokenBody, CoalesceTimeout, StoreUnavailable
from buddy.messages import ProxyResult
from buddy.redis_keys import EntryId, RedisKeys
from buddy.store.fill_lock import FillLock, LeadPlan, LockKeeper
from buddy.store.guard import StoreGuard
from buddy.store.rate_limiter import WaitingRoom
from buddy.store.relay import RelayWriter, follow_chunks, read_meta
from buddy.store.wakeup import WakeupHub
from buddy.upstream import BodyStream, storable_headers

POLL_SECONDS = 1.0  # a waiter re-checks this often even without a wake-up (a dead leader publishes nothing)
DEAF_POLL_SECONDS = 0.05  # ... and this often while its process's subscription is not confirmed
SHARED_RESULT_TTL_MS = 30_000
FOLLOWERS_TTL_MS = 120_000


class WaitingFull(Exception):
    """This process already has as many requests waiting on one mapping as it may: refuse, do not wait."""

    def __init__(self, domain: str) -> None:
        self.domain = domain
        super().__init__(domain)


class NotShared(Exception):
    """The leader's answer is not for this request: `private` (each asks the upstream itself) or `vary`
    (it varies on a header this request sends differently: look the entry up again)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


Accept = Callable[[ProxyResult], bool]


class Coalescer:
    """`run(entry, lead)`: become the leader and call `lead(token)`, or follow whoever leads and return its result."""

    def __init__(
        self,
        client: redis.Redis,
        guard: StoreGuard,
        keys: RedisKeys,
        hub: WakeupHub,
        relay_limit: int,
        waiting: WaitingRoom | None = None,
    ) -> None:
        self.client = client
        self.guard = guard
        self.keys = keys
        self.hub = hub
        self.relay_limit = relay_limit
        self.waiting = waiting  # shared with requests that sleep for a rate-limit slot: both hold a thread
        self.lock = FillLock(client, guard, keys)
        self.keeper = LockKeeper(self.lock)

    def run(
        self,
        entry: EntryId,
        lock_ttl_ms: int,
        idle_timeout: float,
        timeout: float,
        lead: Callable[..., ProxyResult],
        accept: Accept = lambda result: True,
        usable: Accept = lambda entry: True,
        plan: LeadPlan | None = None,
    ) -> ProxyResult:
        """Lead, or wait up to `timeout` for the leader's answer and return it if `accept` says it is ours.

        With a `plan`, taking the lock also reads the entry again and reserves the upstream start in the same
        round trip (FillLock.lead), and `lead` is called with what that found: `lead(token, ahead)`.

        A follower also takes the entry from the cache once it is there, if `usable` says it may (an expired
        entry kept for stale-if-error is no answer to wait for). StoreUnavailable before anything was fetched
        propagates, so the caller can serve without Redis; NotShared when the leader's answer may not be given
        to this request.
        """
        started = time.monotonic()
        deadline = started + timeout
        token = secrets.token_hex(12)
        vanished = ""
        while True:
            if plan is None:
                won, holder = self.lock.acquire(entry, token, lock_ttl_ms, vanished)
            else:
                won, holder, ahead = self.lock.lead(entry, token, lock_ttl_ms, plan, vanished)
            if won:
                self.keeper.hold(entry, token, lock_ttl_ms, timeout)
                return lead(token) if plan is None else lead(token, ahead)
            if holder:
                if self.waiting is not None and not self.waiting.enter(entry.domain, per_mapping=False):
                    raise WaitingFull(entry.domain)
                try:
                    result = self._follow(entry, holder, deadline, idle_timeout, accept, usable)
                finally:
                    if self.waiting is not None:
                        self.waiting.leave(entry.domain)
                if result is not None:
                    return result
                vanished = holder
            if time.monotonic() >= deadline:
                raise CoalesceTimeout(entry.domain, time.monotonic() - started)

    def try_lead(self, entry: EntryId, lock_ttl_ms: int, timeout: float) -> str | None:
        """Take the lock if nobody holds it (a background refresh): the token to lead with, else None."""
        token = secrets.token_hex(12)
        won, _ = self.lock.acquire(entry, token, lock_ttl_ms)
        if not won:
            return None
        self.keeper.hold(entry, token, lock_ttl_ms, timeout)
        return token

    def _follow(
        self, entry: EntryId, holder: str, deadline: float, idle_timeout: float, accept: Accept, usable: Accept
    ) -> ProxyResult | None:
        """Wait for `holder`'s result; None when the holder is gone without one (the caller then tries to lead)."""
        waiter = self.hub.register(entry)  # before the re-check: a result published from now on wakes us
        try:
            first = True
            while True:
                result, lock_holder = self._check(entry, holder, idle_timeout, usable, count_me=first)
                first = False
                if result is not None:
                    if not accept(result):
                        result.close_stream()
                        raise NotShared("vary")
                    return result
                if lock_holder != holder:
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                interval = POLL_SECONDS if self.hub.listening else DEAF_POLL_SECONDS
                waiter.wait(min(interval, remaining))
        finally:
            self.hub.unregister(entry, waiter)

    def _check(
        self, entry: EntryId, holder: str, idle_timeout: float, usable: Accept, count_me: bool
    ) -> tuple[ProxyResult | None, str]:
        """One round trip: who holds the lock now, then the cache entry, this leader's shared result and relay.

        The lock is read first: a leader writes its result before it deletes the lock, so a lock seen gone
        here means the reads after it see that result, if there is one.
        """
        relay_key = self.keys.relay(entry, holder)

        def read() -> list:
            pipe = self.client.pipeline(transaction=count_me)  # MULTI when it writes: no count without its TTL
            if count_me:
                pipe.incr(self.keys.followers(entry, holder))
                pipe.pexpire(self.keys.followers(entry, holder), FOLLOWERS_TTL_MS)
            pipe.get(self.keys.lock(entry))
            pipe.get(self.keys.cache(entry.domain, entry.digest))
            pipe.get(self.keys.shared_result(entry, holder))
            pipe.exists(relay_key)
            return pipe.execute()[-4:]

        lock_holder, cached, shared, relaying = self.guard.run(read)
        lock_holder = lock_holder.decode() if lock_holder else ""
        if shared == codec.NOT_SHARED:
            raise NotShared("private")
        for blob, from_cache in ((cached, True), (shared, False)):
            if blob:
                try:
                    found = codec.decode(blob)
                except codec.CodecError:
                    continue
                # A vary pointer is no answer (the leader shares one), nor is an entry too old for this request.
                if isinstance(found, ProxyResult) and (not from_cache or usable(found)):
                    found.cache = "COALESCED"
                    return found, lock_holder
        if relaying:
            meta = read_meta(self.client, self.guard, relay_key)
            if meta is not None:
                after, status, reason, headers = meta
                chunks = follow_chunks(self.client, self.guard, relay_key, after, idle_timeout)
                return ProxyResult(status, reason, headers, stream=chunks, cache="COALESCED"), lock_holder
        return None, lock_holder

    def hand_off(self, entry: EntryId, token: str, shared: ProxyResult | None, private: bool = False) -> None:
        """The leader is done. Its followers read the cache entry, else `shared` (a copy of its answer with
        nothing private in it), else nothing (they fetch for themselves); `private`: tell them so at once.
        (A leader that stored its answer at `entry` lets go in the store's own call: ResponseCache.put.)"""
        self.keeper.drop(entry, token)
        blob = codec.NOT_SHARED if private else codec.encode(shared) if shared is not None else b""
        self.lock.release(entry, token, blob, SHARED_RESULT_TTL_MS)

    def relay(
        self, entry: EntryId, token: str, result: ProxyResult, drop: frozenset[str] = frozenset()
    ) -> Iterable[bytes]:
        """An over-size body: relay it to the requests waiting on this leader, if there are any.

        With nobody waiting, nothing is copied into Redis and the lock goes at once (a request that comes
        later fetches for itself). Otherwise the body goes into a Redis stream as it arrives, at most
        `relay_limit` bytes of it, and the relay goes on even if the leader's own client stops reading.
        The followers get the leader's headers less `drop` (fields the upstream called private).
        """
        assert isinstance(result.stream, BodyStream)
        waiting = self.guard.run(lambda: self.client.get(self.keys.followers(entry, token)))
        if not waiting:
            self.hand_off(entry, token, None)
            return result.stream
        writer = RelayWriter(self.client, self.guard, self.keys.relay(entry, token), self.relay_limit)
        writer.start(result.status, result.reason, storable_headers(result.headers, drop))
        self.lock.announce(entry)
        return RelayedBody(result.stream, writer, lambda: self.hand_off(entry, token, None))


class RelayedBody:
    """The leader's streamed body, copied chunk by chunk into the relay; finishing releases the lock.

    If the leader's client goes away (or asked with HEAD), `close()` keeps reading the upstream into the
    relay, so that the followers still get the whole body.
    """

    def __init__(self, source: BodyStream, writer: RelayWriter, release: Callable[[], None]) -> None:
        self.source = source
        self.writer = writer
        self.release = release
        self._chunks = iter(source)
        self._finished = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self._chunks:
                self.writer.chunk(chunk)
                yield chunk
        except BrokenBody:
            self._finish()  # the relay ends unfinished too, then the leader's client is cut off
            raise
        self._finish()

    def close(self) -> None:
        if self._finished:
            return
        try:
            if not self.writer.broken:
                for chunk in self._chunks:
                    self.writer.chunk(chunk)
                    if self.writer.broken:
                        break
        except BrokenBody:
            pass  # marked unfinished for the followers below; the leader's client has gone already
        self.source.close()
        self._finish()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self.writer.finish(complete=not self.source.failed and not self.writer.broken)
        try:
            self.release()
        except StoreUnavailable:
            pass  # the lock expires by itself; the body is already out
