"""Request coalescing across every worker and host on one Redis: one leader fetches, the others wait for its result.

The leader's side is a Fill (one per fill of an entry: its lock, and how the fill ends); the followers' side is
Coalescer._follow (wait for a wake-up, then read the entry, the leader's shared result or its relay).
"""
from __future__ import annotations

import enum
import io
import secrets
import time
from typing import Callable, Iterable, Iterator

import redis

from buddy import codec
from buddy.errors import BrokenBody, CoalesceTimeout, StoreUnavailable
from buddy.forwarding import storable_headers
from buddy.messages import ProxyResult
from buddy.redis_keys import EntryId, RedisKeys
from buddy.store.fill_lock import FillLock, LeadPlan, LockKeeper
from buddy.store.guard import StoreGuard
from buddy.store.pieces import PieceReader, first_piece
from buddy.store.rate_limiter import WaitingRoom
from buddy.store.relay import RelayWriter, follow_chunks, read_meta
from buddy.store.wakeup import WakeupHub
from buddy.upstream import BodyStream

POLL_SECONDS = 1.0  # a waiter re-checks this often even without a wake-up (a dead leader publishes nothing)
DEAF_POLL_SECONDS = 0.05  # ... and this often while its process's subscription is not confirmed
SHARED_RESULT_TTL_MS = 30_000
FOLLOWERS_TTL_MS = 120_000


class WaitingFull(Exception):
    """A follower that may not wait here (no room in this process, or it parks instead): refuse or park it.
    `holder`: the leader this one would follow; `started`: when it began to wait (time.monotonic())."""

    def __init__(self, domain: str, holder: str = "", started: float = 0.0) -> None:
        self.domain = domain
        self.holder = holder
        self.started = started
        super().__init__(domain)


class NotShared(Exception):
    """The leader's answer is not for this request: `private` (each asks the upstream itself) or `vary`
    (it varies on a header this request sends differently: look the entry up again)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


Accept = Callable[[ProxyResult], bool]


class Coalescer:
    """`run(entry, lead)`: become the leader and call `lead(fill)`, or follow whoever leads and return its result."""

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
        self.pieces = PieceReader(client, guard)
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
        following: tuple[str, float] | None = None,
        parks: bool = False,
    ) -> ProxyResult:
        """Lead, or wait up to `timeout` for the leader's answer and return it if `accept` says it is ours.

        The leader gets its Fill: `lead(fill)`, or with a `plan`, where taking the lock also reads the entry again
        and reserves the upstream start in the same round trip (FillLock.lead), `lead(fill, ahead)` with what that
        found. A follower also takes the entry from the cache once it is there, if `usable` says it may (an expired
        entry kept for stale-if-error is no answer to wait for). StoreUnavailable before anything was fetched
        propagates, so the caller can serve without Redis; NotShared when the leader's answer may not be given
        to this request. `parks`: a follower does not wait here (it would hold a thread): it looks once, and raises
        WaitingFull if the answer is not there yet, for the caller to park it (buddy.parking). `following`:
        (leader, started) of a parked follower run again: it follows that leader again, its deadline counted
        from when it first waited.
        """
        started = time.monotonic() if following is None else following[1]
        deadline = started + timeout
        token = secrets.token_hex(12)
        vanished = ""
        while True:
            if following is not None:
                (won, holder), following = (False, following[0]), None
            elif plan is None:
                won, holder = self.lock.acquire(entry, token, lock_ttl_ms, vanished)
            else:
                won, holder, ahead = self.lock.lead(entry, token, lock_ttl_ms, plan, vanished)
            if won:
                self.keeper.hold(entry, token, lock_ttl_ms, timeout)
                fill = Fill(self, entry, token)
                return lead(fill) if plan is None else lead(fill, ahead)
            waits_here = holder and not parks and (
                self.waiting is None or self.waiting.enter(entry.domain, per_mapping=False))
            if holder and not waits_here:
                # No waiting here: one look (its answer may be there already), else the caller parks or refuses.
                result, lock_holder = self._take(entry, holder, idle_timeout, accept, usable, count_me=True)
                if result is not None:
                    return result
                if lock_holder == holder and time.monotonic() < deadline:
                    raise WaitingFull(entry.domain, holder, started)
                vanished = holder if lock_holder != holder else ""
            elif holder:
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

    def try_lead(self, entry: EntryId, lock_ttl_ms: int, timeout: float) -> Fill | None:
        """Take the lock if nobody holds it (a background refresh): the Fill to lead with, else None."""
        token = secrets.token_hex(12)
        won, _ = self.lock.acquire(entry, token, lock_ttl_ms)
        if not won:
            return None
        self.keeper.hold(entry, token, lock_ttl_ms, timeout)
        return Fill(self, entry, token)

    def _follow(
        self, entry: EntryId, holder: str, deadline: float, idle_timeout: float, accept: Accept, usable: Accept
    ) -> ProxyResult | None:
        """Wait for `holder`'s result; None when the holder is gone without one (the caller then tries to lead)."""
        waiter = self.hub.register(entry)  # before the re-check: a result published from now on wakes us
        try:
            first = True
            while True:
                result, lock_holder = self._take(entry, holder, idle_timeout, accept, usable, count_me=first)
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

    def _take(
        self, entry: EntryId, holder: str, idle_timeout: float, accept: Accept, usable: Accept, count_me: bool
    ) -> tuple[ProxyResult | None, str]:
        """`_check`, and the answer found only if it is this request's to take (else NotShared)."""
        result, lock_holder = self._check(entry, holder, idle_timeout, usable, count_me)
        if result is not None and not accept(result):
            result.close_stream()
            raise NotShared("vary")
        return result, lock_holder

    def _check(
        self, entry: EntryId, holder: str, idle_timeout: float, usable: Accept, count_me: bool
    ) -> tuple[ProxyResult | None, str]:
        """One round trip: who holds the lock now, then the cache entry, this leader's shared result and relay.

        The lock is read first: a leader writes its result before it deletes the lock, so a lock seen gone
        here means the reads after it see that result, if there is one.
        """
        relay_key = self.keys.relay(entry, holder)
        cache_key, shared_key = self.keys.cache(entry.domain, entry.digest), self.keys.shared_result(entry, holder)

        def read() -> list:
            pipe = self.client.pipeline(transaction=count_me)  # MULTI when it writes: no count without its TTL
            if count_me:
                pipe.incr(self.keys.followers(entry, holder))
                pipe.pexpire(self.keys.followers(entry, holder), FOLLOWERS_TTL_MS)
            pipe.get(self.keys.lock(entry))
            first_piece(pipe, cache_key)
            first_piece(pipe, shared_key)
            pipe.exists(relay_key)
            return pipe.execute()[-4:]

        lock_holder, cached, shared, relaying = self.guard.run(read, key=self.keys.lock(entry))
        lock_holder = lock_holder.decode() if lock_holder else ""
        if shared == codec.NOT_SHARED:
            raise NotShared("private")
        for key, first, from_cache in ((cache_key, cached, True), (shared_key, shared, False)):
            if first:
                blob = self.pieces.complete(key, first)  # (a large value is read again, in pieces)
                if blob is None:
                    continue
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


class Ending(enum.Enum):
    """How a fill ended: what its followers get, and who let go of the lock."""

    STORED = "stored"  # the answer is in the cache; the store's own script let go of the lock and woke them
    SHARED = "shared"  # an answer not to keep (an error, no-store...): a copy for the followers, then the lock goes
    PRIVATE = "private"  # an answer not to share: each follower asks for itself
    ABANDONED = "abandoned"  # the leader left without an answer (its client hung up, a fault): a follower leads


class Fill:
    """One leader's fill of an entry, from its lock to the end: exactly one ending, and one place that lets go.

    The lock is let go of when the fill ends, however it ends (see Ending): by the store's script for an answer
    stored at the entry (`stored`), else here (`share`, `private`, `abandon`). A streamed body ends later: `relay`
    hands the ending to the stream, which ends the fill when the body has been read to its end or broke off (and,
    for a body kept once whole, stores it then). Ending twice does nothing: a `finally: fill.abandon()` is safe.
    """

    def __init__(self, coalescer: Coalescer, entry: EntryId, token: str) -> None:
        self.coalescer = coalescer
        self.entry = entry
        self.token = token
        self.ending: Ending | None = None
        self.streaming = False  # a relay ends it

    @property
    def lock(self) -> tuple[str, str]:
        """What a store script that lets go of the lock needs: its key and this leader's token."""
        return self.coalescer.keys.lock(self.entry), self.token

    @property
    def open(self) -> bool:
        return self.ending is None and not self.streaming

    def storing(self) -> None:
        """The store about to run lets go of the lock in its own call: nothing extends it from now on."""
        self.coalescer.keeper.drop(self.entry, self.token)

    def stored(self) -> None:
        """The answer is stored at the entry, and the store let go of the lock."""
        self._end(Ending.STORED, None)

    def share(self, result: ProxyResult | None) -> None:
        """The followers get `result` (a copy, with nothing private in it), or, for None, read the entry."""
        self._end(Ending.SHARED, result)

    def private(self) -> None:
        self._end(Ending.PRIVATE, None)

    def abandon(self) -> None:
        """Let go with no answer (a follower leads); for a fill that has ended already, nothing."""
        try:
            self._end(Ending.ABANDONED, None)
        except StoreUnavailable:
            pass  # the lock expires by itself

    def _end(self, ending: Ending, shared: ProxyResult | None) -> None:
        if self.ending is not None or self.streaming and ending is Ending.ABANDONED:
            return
        self.ending = ending
        self.coalescer.keeper.drop(self.entry, self.token)
        if ending is Ending.STORED:
            return
        blob = codec.NOT_SHARED if ending is Ending.PRIVATE else codec.encode(shared) if shared is not None else b""
        self.coalescer.lock.release(self.entry, self.token, blob, SHARED_RESULT_TTL_MS)

    def relay(
        self, result: ProxyResult, drop: frozenset[str] = frozenset(), keep: Keep | None = None,
        keep_limit: int | None = None,
    ) -> Iterable[bytes]:
        """A streamed body: relay it to the requests waiting on this leader (followers), and end the fill when the
        body ends. `keep`: a body that may be kept once whole (a live stream, small enough): it is relayed even
        with nobody waiting yet (a later identical request follows it from its start), and when it ends whole
        within `keep_limit` bytes (by default, the relay's own limit), `keep(body)` stores it and so ends the fill
        (True), or does not (False: it ends here).

        Without `keep` and with nobody waiting, nothing is copied into Redis and the lock goes at once (a request
        that comes later fetches for itself). Otherwise the body goes into a Redis stream as it arrives, at most
        `relay_limit` bytes of it, and the relay goes on even if the leader's own client stops reading. The
        followers get the leader's headers less `drop` (fields the upstream called private).
        """
        assert isinstance(result.stream, BodyStream)
        coalescer = self.coalescer
        followers = coalescer.keys.followers(self.entry, self.token)
        waiting = keep is not None or coalescer.guard.run(lambda: coalescer.client.get(followers), key=followers)
        if not waiting:
            self.share(None)
            return result.stream
        writer = RelayWriter(coalescer.client, coalescer.guard, coalescer.keys.relay(self.entry, self.token),
                             coalescer.relay_limit)
        writer.start(result.status, result.reason, storable_headers(result.headers, drop))
        coalescer.lock.announce(self.entry)
        self.streaming = True
        return RelayedBody(result.stream, writer, self, keep, keep_limit)


Keep = Callable[[bytes], bool]


class RelayedBody:
    """The leader's streamed body, copied chunk by chunk into the relay; its end (whole or not) ends the fill.

    If the leader's client goes away (or asked with HEAD), `close()` keeps reading the upstream into the
    relay, so that the followers still get the whole body. With `keep`, the body is also gathered (up to the
    relay's limit) and handed to `keep` when it ended whole.
    """

    def __init__(self, source: BodyStream, writer: RelayWriter, fill: Fill, keep: Keep | None = None,
                 keep_limit: int | None = None) -> None:
        self.source = source
        self.writer = writer
        self.fill = fill
        self.keep = keep
        self.keep_limit = writer.limit if keep_limit is None else keep_limit
        self._kept: io.BytesIO | None = io.BytesIO() if keep is not None else None  # taken whole without a copy
        self._chunks = iter(source)
        self._finished = False

    def _take(self, chunk: bytes) -> None:
        self.writer.chunk(chunk)
        if self._kept is not None:
            if self.writer.written > self.keep_limit:
                self._kept = None  # too big to keep: relayed (up to the relay's own limit), never stored
            else:
                self._kept.write(chunk)

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self._chunks:
                self._take(chunk)
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
                    self._take(chunk)
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
        whole = not self.source.failed and not self.writer.broken
        self.writer.finish(complete=whole)
        fill = self.fill
        fill.streaming = False
        try:
            if whole and self.keep is not None and self._kept is not None and self.keep(self._kept.getvalue()):
                return  # stored, and the store let go of the lock
            fill.share(None)
        except StoreUnavailable:
            pass  # the lock expires by itself; the body is already out
