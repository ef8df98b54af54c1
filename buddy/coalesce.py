"""Request coalescing across every worker and host on one Redis: one leader fetches, the others wait for its result."""
from __future__ import annotations

import secrets
import time
from typing import Callable, Iterator

import redis

from buddy import codec
from buddy.codec import CachedResponse
from buddy.errors import CoalesceTimeout, StoreUnavailable
from buddy.messages import ProxyResult
from buddy.redis_keys import EntryId, RedisKeys
from buddy.store.fill_lock import FillLock, LockKeeper
from buddy.store.guard import StoreGuard
from buddy.store.relay import RelayWriter, follow_chunks, read_meta
from buddy.store.wakeup import WakeupHub
from buddy.upstream import BodyStream, storable_headers

POLL_SECONDS = 1.0  # a waiter re-checks this often even without a wake-up (a dead leader publishes nothing)
DEAF_POLL_SECONDS = 0.05  # ... and this often while its process's subscription is not confirmed
SHARED_RESULT_TTL_MS = 30_000
FOLLOWERS_TTL_MS = 120_000


class Coalescer:
    """`run(entry, lead)`: become the leader and call `lead(token)`, or follow whoever leads and return its result."""

    def __init__(
        self,
        client: redis.Redis,
        guard: StoreGuard,
        keys: RedisKeys,
        hub: WakeupHub,
        timeout: float,
        relay_limit: int,
    ) -> None:
        self.client = client
        self.guard = guard
        self.keys = keys
        self.hub = hub
        self.timeout = timeout
        self.relay_limit = relay_limit
        self.lock = FillLock(client, guard, keys)
        self.keeper = LockKeeper(self.lock)

    def run(
        self, entry: EntryId, lock_ttl_ms: int, idle_timeout: float, lead: Callable[[str], ProxyResult]
    ) -> ProxyResult:
        """StoreUnavailable before anything was fetched propagates, so the caller can serve without Redis."""
        started = time.monotonic()
        deadline = started + self.timeout
        token = secrets.token_hex(12)
        vanished = ""
        while True:
            won, holder = self.lock.acquire(entry, token, lock_ttl_ms, vanished)
            if won:
                self.keeper.hold(entry, token, lock_ttl_ms)
                return lead(token)
            if holder:
                result = self._follow(entry, holder, deadline, idle_timeout)
                if result is not None:
                    return result
                vanished = holder
            if time.monotonic() >= deadline:
                raise CoalesceTimeout(entry.domain, time.monotonic() - started)

    def _follow(self, entry: EntryId, holder: str, deadline: float, idle_timeout: float) -> ProxyResult | None:
        """Wait for `holder`'s result; None when the holder is gone without one (the caller then tries to lead)."""
        waiter = self.hub.register(entry)  # before the re-check: a result published from now on wakes us
        try:
            first = True
            while True:
                result, lock_holder = self._check(entry, holder, idle_timeout, count_me=first)
                first = False
                if result is not None:
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
        self, entry: EntryId, holder: str, idle_timeout: float, count_me: bool
    ) -> tuple[ProxyResult | None, str]:
        """One round trip: who holds the lock now, then the cache entry, this leader's shared result and relay.

        The lock is read first: a leader writes its result before it deletes the lock, so a lock seen gone
        here means the reads after it see that result, if there is one.
        """
        relay_key = self.keys.relay(entry, holder)

        def read() -> list:
            pipe = self.client.pipeline(transaction=False)
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
        for blob in (cached, shared):
            if blob:
                try:
                    return coalesced(codec.decode(blob)), lock_holder
                except codec.CodecError:
                    continue
        if relaying:
            meta = read_meta(self.client, self.guard, relay_key)
            if meta is not None:
                after, status, reason, headers = meta
                chunks = follow_chunks(self.client, self.guard, relay_key, after, idle_timeout)
                return ProxyResult(status, reason, headers, stream=chunks, cache="COALESCED"), lock_holder
        return None, lock_holder

    def hand_off(self, entry: EntryId, token: str, result: ProxyResult | None, stored: bool) -> None:
        """The leader is done: followers read the cache entry if it was stored, else a shared copy of the result."""
        self.keeper.drop(entry, token)
        shared = b""
        if result is not None and not stored and result.body is not None:
            copy = CachedResponse(
                result.status, result.reason, storable_headers(result.headers), result.body, time.time(),
                result.fetch_ms,
            )
            shared = codec.encode(copy)
        self.lock.release(entry, token, shared, SHARED_RESULT_TTL_MS)

    def relay(self, entry: EntryId, token: str, result: ProxyResult) -> Iterator[bytes]:
        """An over-size body: relay it to the requests waiting on this leader, if there are any.

        With nobody waiting, nothing is copied into Redis and the lock goes at once (a request that comes
        later fetches for itself). Otherwise the body goes into a Redis stream as it arrives, at most
        `relay_limit` bytes of it, and the relay goes on even if the leader's own client stops reading.
        """
        assert isinstance(result.stream, BodyStream)
        waiting = self.guard.run(lambda: self.client.get(self.keys.followers(entry, token)))
        if not waiting:
            self.hand_off(entry, token, None, stored=False)
            return result.stream
        writer = RelayWriter(self.client, self.guard, self.keys.relay(entry, token), self.relay_limit)
        writer.start(result.status, result.reason, storable_headers(result.headers))
        self.lock.announce(entry)
        return RelayedBody(result.stream, writer, lambda: self.hand_off(entry, token, None, stored=False))


def coalesced(entry: CachedResponse) -> ProxyResult:
    return ProxyResult(
        entry.status, entry.reason, list(entry.headers), entry.body, cache="COALESCED", fetch_ms=entry.fetch_ms
    )


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
        for chunk in self._chunks:
            self.writer.chunk(chunk)
            yield chunk
        self._finish()

    def close(self) -> None:
        if self._finished:
            return
        if not self.writer.broken:
            for chunk in self._chunks:
                self.writer.chunk(chunk)
                if self.writer.broken:
                    break
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
