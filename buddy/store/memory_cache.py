"""L1: each worker's own copy of its hottest cache entries, in memory, kept consistent through pub/sub.

Redis stays the cache; this only saves the round trip and the decoding for entries read again and again. An
entry is admitted on its second read within a while (a one-off read never pushes a hot entry out), the whole
is bounded in bytes (least recently used goes first), and an entry is used only while it is fresh: an expired
one is read from Redis again, where the freshness rules (stale-while-revalidate, stale-if-error) apply.

Consistency: every write to a cache key (a store, a refresh, an import) and every removal (`forget`, `clear-cache`)
publishes its name on the wake-up channel, which every worker of every host subscribes to already (WakeupHub);
a worker drops its copy when it hears it. A worker uses its copies only while its subscription is confirmed,
and drops them all whenever it had to subscribe again (it may have missed a message meanwhile). Pub/sub does
not promise delivery, so no copy is kept longer than MAX_AGE_SECONDS either.

A read that raced a write cannot leave the old value behind: every copy is admitted only if no invalidation
of its key (or of its mapping, or of everything) was heard since the read began.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import NamedTuple, Protocol

from buddy.codec import VaryPointer
from buddy.messages import ProxyResult

MAX_AGE_SECONDS = 30.0  # the longest a copy is used without being read from Redis again
SEEN_LIMIT = 50_000  # keys remembered as read once (for admission on the second read); then forgotten at once
RECENT_DROPS = 20_000  # invalidated keys remembered, to refuse an admission that raced them
EVERYTHING = "*"


class Copy(NamedTuple):
    value: ProxyResult | VaryPointer
    size: int
    until: float  # monotonic: used no later than this (fresh, and MAX_AGE_SECONDS)
    epoch: int  # the subscription it was admitted under
    domain: str


class Ticket(NamedTuple):
    """Taken before a Redis read; `admit` accepts the value read only if nothing invalidated it since."""

    key: str
    domain: str
    generation: int
    epoch: int


class EpochSource(Protocol):
    """Which subscription the copies are valid under (WakeupHub): a number that changes whenever the worker
    subscribes again, None while it is not subscribed."""

    def current(self) -> int | None: ...


def size_of(value: ProxyResult | VaryPointer) -> int:
    """About what a copy takes in memory: its body, headers, and the request it keeps (a POST's body too)."""
    if isinstance(value, VaryPointer):
        return 64 + sum(len(name) for name in value.names)
    size = 512 + len(value.body or b"") + sum(len(name) + len(text) for name, text in value.headers)
    if value.request is not None:
        request = value.request
        size += 256 + len(request.url) + len(request.body) + sum(len(n) + len(v) for n, v in request.headers)
    return size


class MemoryCache:
    """Bounded LRU of decoded entries by Redis key; `epoch()` is the subscription the copies are valid under
    (None: not subscribed, use nothing)."""

    def __init__(self, max_bytes: int, epoch: EpochSource) -> None:
        self.max_bytes = max_bytes
        self.max_entry = max(1, max_bytes // 16)
        self._epoch = epoch
        self._copies: OrderedDict[str, Copy] = OrderedDict()
        self._bytes = 0
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self._generation = 0  # bumped by every invalidation heard
        self._dropped: OrderedDict[str, int] = OrderedDict()  # key or domain -> generation it was last dropped at
        self._forgotten_before = 0  # invalidations older than those in _dropped that are no longer remembered
        self._all_dropped = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def get(self, key: str) -> ProxyResult | VaryPointer | None:
        """A private copy of the entry if this worker holds a valid one, else None."""
        copy = self._copies.get(key)
        if copy is None:
            return None
        if copy.epoch != self._epoch.current() or time.monotonic() >= copy.until:
            with self._lock:
                if self._copies.get(key) is copy:
                    self._remove(key)
            return None
        try:
            with self._lock:
                self._copies.move_to_end(key)
        except KeyError:  # dropped meanwhile by an invalidation
            return None
        value = copy.value
        if isinstance(value, VaryPointer):
            return value
        return value.copy()  # callers relabel it and add Age to theirs

    def ticket(self, key: str, domain: str) -> Ticket | None:
        """Before reading `key` from Redis: None when no copy could be admitted (not subscribed, disabled)."""
        epoch = self._epoch.current()
        if epoch is None or not self.enabled:
            return None
        return Ticket(key, domain, self._generation, epoch)

    def admit(self, ticket: Ticket | None, value: ProxyResult | VaryPointer | None) -> None:
        """Keep a copy of what was read for `ticket`, on its second read, if it is still valid."""
        if ticket is None or value is None:
            return
        if isinstance(value, ProxyResult):
            if value.fresh_for is None or value.body is None:
                return  # an entry of 0.3 (fresh while Redis keeps it: only Redis knows how long), or streamed
            left = min(MAX_AGE_SECONDS, value.stored_at + value.fresh_for - time.time())
            if left <= 0:
                return  # expired: Redis and the freshness rules (stale-while-revalidate...) answer for it
        else:
            left = MAX_AGE_SECONDS
        size = size_of(value)
        if size > self.max_entry:
            return
        with self._lock:
            if ticket.key not in self._seen:
                if len(self._seen) >= SEEN_LIMIT:
                    self._seen.clear()
                self._seen.add(ticket.key)
                return
            if self._stale_ticket(ticket):
                return
            if ticket.key in self._copies:
                self._remove(ticket.key)
            kept = value.copy() if isinstance(value, ProxyResult) else value  # the caller changes its own
            self._copies[ticket.key] = Copy(kept, size, time.monotonic() + left, ticket.epoch, ticket.domain)
            self._bytes += size
            while self._bytes > self.max_bytes and self._copies:
                self._remove(next(iter(self._copies)))

    def invalidate(self, key: str, domain: str | None = None) -> None:
        """Drop one key's copy (`key`), a mapping's (`domain`, key EVERYTHING), or all (both EVERYTHING)."""
        with self._lock:
            self._generation += 1
            if key == EVERYTHING and domain is None:
                self._all_dropped = self._generation
                self._copies.clear()
                self._bytes = 0
                return
            name = key if key != EVERYTHING else f"domain:{domain}"
            self._dropped[name] = self._generation
            self._dropped.move_to_end(name)
            while len(self._dropped) > RECENT_DROPS:
                _, generation = self._dropped.popitem(last=False)
                self._forgotten_before = max(self._forgotten_before, generation)
            if key != EVERYTHING:
                if key in self._copies:
                    self._remove(key)
                return
            for name in [k for k, copy in self._copies.items() if copy.domain == domain]:
                self._remove(name)

    def clear(self) -> None:
        self.invalidate(EVERYTHING)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._copies), "bytes": self._bytes, "max_bytes": self.max_bytes}

    def _stale_ticket(self, ticket: Ticket) -> bool:
        if ticket.epoch != self._epoch.current():
            return True
        if ticket.generation == self._generation:
            return False  # nothing heard since the read began: the common case
        if self._all_dropped > ticket.generation or self._forgotten_before > ticket.generation:
            return True
        return (self._dropped.get(ticket.key, 0) > ticket.generation
                or self._dropped.get(f"domain:{ticket.domain}", 0) > ticket.generation)

    def _remove(self, key: str) -> None:
        copy = self._copies.pop(key)
        self._bytes -= copy.size
