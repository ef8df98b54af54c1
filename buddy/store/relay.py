"""Over-size bodies for followers: the leader appends chunks to a Redis stream as its own client reads them."""
from __future__ import annotations

import json
import logging
import time
from typing import Iterator

import redis

from buddy.errors import BrokenBody, StoreUnavailable
from buddy.store.connect import for_blocking_reads
from buddy.store.guard import StoreGuard

log = logging.getLogger("buddy.coalesce")
RELAY_TTL_SECONDS = 60
BLOCK_MS = 1000  # how long one XREAD of a follower waits for the leader's next chunk
# Entries a follower reads at once: 256 KB of a body's 64 KB chunks (a reply is held whole in the connection's reader
# buffer, which keeps that size until the connection reads again: see buddy.store.pieces).
RELAY_BATCH = 4


class RelayWriter:
    """Writes meta, chunks and an end mark; a Redis failure stops the relay, never the leader's own response."""

    def __init__(self, client: redis.Redis, guard: StoreGuard, key: str, limit: int) -> None:
        self.client = client
        self.guard = guard
        self.key = key
        self.limit = limit
        self.written = 0
        self.broken = False

    def _add(self, kind: bytes, data: bytes) -> None:
        if self.broken:
            return

        def write() -> None:
            pipe = self.client.pipeline(transaction=True)  # MULTI: the stream never exists without its TTL
            pipe.xadd(self.key, {b"k": kind, b"d": data})
            pipe.expire(self.key, RELAY_TTL_SECONDS)
            pipe.execute()

        try:
            self.guard.run(write, key=self.key)
        except StoreUnavailable:
            self.broken = True
            log.warning("relay of an over-size body to coalesced requests stopped: Redis failed")

    def start(self, status: int, reason: str, headers: list[tuple[str, str]]) -> None:
        self._add(b"m", json.dumps({"s": status, "r": reason, "h": headers}).encode())

    def chunk(self, data: bytes) -> None:
        if self.broken:
            return
        self.written += len(data)
        if self.written > self.limit:
            log.warning("over-size body passed the relay limit (%d bytes); coalesced requests are cut off", self.limit)
            self._add(b"x", b"")
            self.broken = True
            return
        self._add(b"c", data)

    def finish(self, complete: bool) -> None:
        if not self.broken:
            self._add(b"e" if complete else b"x", b"")
            self.broken = True  # nothing more goes in


def read_meta(client: redis.Redis, guard: StoreGuard, key: str) -> tuple[bytes, int, str, list[tuple[str, str]]] | None:
    """The relay's first entry (id, status, reason, headers), or None when there is no relay."""
    entries = guard.run(lambda: client.xrange(key, count=1), key=key)
    if not entries:
        return None
    entry_id, fields = entries[0]
    meta = json.loads(fields[b"d"])
    return entry_id, int(meta["s"]), str(meta["r"]), [(str(n), str(v)) for n, v in meta["h"]]


def follow_chunks(
    client: redis.Redis, guard: StoreGuard, key: str, after: bytes, idle_timeout: float
) -> Iterator[bytes]:
    """Yield the body's chunks as the leader adds them, up to the end mark.

    A relay that the leader marks unfinished (its upstream broke off, the body passed the relay limit),
    that stalls, or that Redis loses raises BrokenBody: the follower's client must see a cut body, never a
    short one that ends cleanly. XREAD BLOCK waits on the server on purpose: it goes through the client with the long
    socket timeout (redis.socket_timeout), not the short one of ordinary commands.
    """
    last, quiet_since = after, time.monotonic()
    reader = for_blocking_reads(client)
    while True:
        try:
            batches = guard.run(lambda: reader.xread({key: last}, count=RELAY_BATCH, block=BLOCK_MS), key=key)
        except StoreUnavailable as exc:
            log.warning("relay of an over-size body broke off: Redis failed")
            raise BrokenBody("the relay of the leader's body broke off") from exc
        if not batches:
            if time.monotonic() - quiet_since > idle_timeout:
                log.warning("relay of an over-size body stalled; cutting the response off")
                raise BrokenBody("the relay of the leader's body stalled")
            continue
        quiet_since = time.monotonic()
        for entry_id, fields in batches[0][1]:
            last = entry_id
            kind = fields[b"k"]
            if kind == b"c":
                yield fields[b"d"]
            elif kind == b"x":
                log.warning("a relayed body ended unfinished (upstream broke off or relay limit); cutting it off")
                raise BrokenBody("the leader's body could not be relayed whole")
            else:
                return
