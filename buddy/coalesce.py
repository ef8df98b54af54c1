"""Request coalescing across every worker and host on one Redis: one leader fetches, the others wait for its result."""
from __future__ import annotations

import secrets
import time
from typing import Callable, Iterator

import redis

from buddy import codec
from buddy.codec import CachedResponse
from buddy.errors import CoalesceTimeout
from buddy.messages import ProxyResult
from buddy.redis_keys import EntryId, RedisKeys
from buddy.store.fill_lock import FillLock
from buddy.store.guard import StoreGuard
from buddy.store.relay import RelayWriter, follow_chunks, read_meta
from buddy.store.wakeup import WakeupHub
from buddy.upstream import BodyStream, storable_headers

POLL_SECONDS = 1.0  # a waiter re-checks this often even without a wake-up (a dead leader publishes nothing)
DEAF_POLL_SECONDS = 0.05  # ... and this often while its process's subscription is not confirmed
HEARTBEAT_SECONDS = 1.0
SHARED_RESULT_TTL_MS = 30_000


class Coalescer:
    """`run(entry, lead)`: become the leader and call `lead(token)`, or follow whoever leads and return its result."""

    def __init__(
        self, client: redis.Redis, guard: StoreGuard, keys: RedisKeys, hub: WakeupHub, timeout: float
    ) -> None:
        self.client = client
        self.guard = guard
        self.keys = keys
        self.hub = hub
        self.timeout = timeout
        self.lock = FillLock(client, guard, keys)

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
            while True:
                result, lock_holder = self._check(entry, holder, idle_timeout)
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

    def _check(self, entry: EntryId, holder: str, idle_timeout: float) -> tuple[ProxyResult | None, str]:
        """One round trip: who holds the lock now, then the cache entry, this leader's shared result and relay.

        The lock is read first: a leader writes its result before it deletes the lock, so a lock seen gone
        here means the reads after it see the result, if there is one.
        """
        relay_key = self.keys.relay(entry, holder)

        def read() -> list:
            pipe = self.client.pipeline(transaction=False)
            pipe.get(self.keys.lock(entry))
            pipe.get(self.keys.cache(entry.domain, entry.digest))
            pipe.get(self.keys.shared_result(entry, holder))
            pipe.exists(relay_key)
            return pipe.execute()

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

    def heartbeat(self, entry: EntryId, token: str, lock_ttl_ms: int) -> Callable[[], None]:
        """A callable the leader invokes as it makes progress; it extends the lock at most once a second."""
        last = [time.monotonic()]

        def beat() -> None:
            now = time.monotonic()
            if now - last[0] >= HEARTBEAT_SECONDS:
                last[0] = now
                self.lock.extend(entry, token, lock_ttl_ms)

        return beat

    def hand_off(self, entry: EntryId, token: str, result: ProxyResult, stored: bool) -> None:
        """The leader is done: followers read the cache entry if it was stored, else a shared copy of the result."""
        shared = b""
        if not stored and result.body is not None:
            copy = CachedResponse(result.status, result.reason, storable_headers(result.headers), result.body, time.time())
            shared = codec.encode(copy)
        self.lock.release(entry, token, shared, SHARED_RESULT_TTL_MS)

    def relay(self, entry: EntryId, token: str, result: ProxyResult, beat: Callable[[], None]) -> "RelayedBody":
        """Start relaying an over-size body: followers attach now and read it while the leader's client does."""
        writer = RelayWriter(self.client, self.guard, self.keys.relay(entry, token))
        writer.start(result.status, result.reason, storable_headers(result.headers))
        self.lock.announce(entry)
        assert isinstance(result.stream, BodyStream)
        return RelayedBody(result.stream, writer, beat, lambda: self.lock.release(entry, token))


def coalesced(entry: CachedResponse) -> ProxyResult:
    return ProxyResult(entry.status, entry.reason, list(entry.headers), entry.body, cache="COALESCED")


class RelayedBody:
    """The leader's streamed body, copied chunk by chunk into the relay; finishing releases the lock."""

    def __init__(
        self, source: BodyStream, writer: RelayWriter, beat: Callable[[], None], release: Callable[[], None]
    ) -> None:
        self.source = source
        self.writer = writer
        self.beat = beat
        self.release = release
        self._finished = False

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.source:
            self.writer.chunk(chunk)
            self.beat()
            yield chunk
        self._finish(complete=not self.source.failed)

    def close(self) -> None:
        self.source.close()
        self._finish(complete=False)

    def _finish(self, complete: bool) -> None:
        if self._finished:
            return
        self._finished = True
        self.writer.finish(complete)
        try:
            self.release()
        except Exception:  # the lock expires by itself; the client's response is already complete
            pass
