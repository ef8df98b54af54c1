"""The response cache: one compressed blob per key with a Redis-native TTL, and a per-domain index of entries."""
from __future__ import annotations

import logging
from typing import Callable, NamedTuple

import redis

from buddy import codec
from buddy.codec import VaryPointer
from buddy.messages import ProxyResult
from buddy.redis_keys import EntryId, RedisKeys
from buddy.store.fill_lock import load_script
from buddy.store.guard import StoreGuard

log = logging.getLogger("buddy.cache")
BATCH = 500  # entries per round trip when pruning or clearing: Redis is never blocked for long
PRUNE_ON_STORE = 10


class DomainEntries(NamedTuple):
    """What the index says about one domain's cached responses."""

    entries: int
    size_bytes: int
    expired: int
    ttl_buckets: dict[str, int]


TTL_BUCKETS = (("under_1h", 0, 3600), ("1h_to_1d", 3600, 86400), ("1d_to_7d", 86400, 604800),
               ("over_7d", 604800, None))


class ResponseCache:
    """GET and SET of encoded responses; a blob that does not decode counts as a miss.

    Every stored entry is also listed in its domain's index (digest -> expiry, and its size), so that a
    domain can be counted, measured and cleared without scanning the keyspace.
    """

    def __init__(self, client: redis.Redis, guard: StoreGuard, keys: RedisKeys) -> None:
        self.client = client
        self.guard = guard
        self.keys = keys
        self._store = client.register_script(load_script("store_entry"))
        self._prune = client.register_script(load_script("prune_index"))

    def get(self, entry: EntryId) -> ProxyResult | VaryPointer | None:
        """The stored response, or the vary pointer that says which variant to read; None on a miss."""
        key = self.keys.cache(entry.domain, entry.digest)
        blob = self.guard.run(lambda: self.client.get(key), key)
        if blob is None:
            return None
        try:
            return codec.decode(blob)
        except codec.CodecError as exc:
            log.info("unreadable cache entry treated as a miss: %s", exc)
            return None

    def put(
        self,
        entry: EntryId,
        response: ProxyResult,
        ttl_seconds: int,
        pointer: tuple[EntryId, VaryPointer, int] | None = None,
    ) -> None:
        """Store the entry (and, for a varying answer, the pointer at its primary entry: where, what, TTL)
        and, in the same round trip, forget a few expired ones from the index, so that the index stays
        bounded even when nobody reads the metrics (which prune the rest)."""
        blob = codec.encode(response)
        d = entry.domain
        keys = [self.keys.cache(d, entry.digest), self.keys.index(d), self.keys.sizes(d), self.keys.stats(d)]

        def store() -> None:
            pipe = self.client.pipeline(transaction=False)
            if pointer is not None:
                at, names, pointer_ttl = pointer
                pipe.set(self.keys.cache(at.domain, at.digest), codec.encode_pointer(names), ex=pointer_ttl)
            self._store(keys=keys, args=[blob, ttl_seconds * 1000, entry.digest], client=pipe)
            self._prune(keys=keys[1:], args=[PRUNE_ON_STORE], client=pipe)
            pipe.execute()

        self.guard.run(store, keys[0])

    def prune(self, domain: str) -> int:
        """Drop index entries whose TTL has passed; returns how many."""
        keys = [self.keys.index(domain), self.keys.sizes(domain), self.keys.stats(domain)]
        total = 0
        while True:
            pruned = int(self.guard.run(lambda: self._prune(keys=keys, args=[BATCH])))
            total += pruned
            if pruned < BATCH:
                return total

    def describe(self, domain: str) -> DomainEntries:
        """Live entries, their size, how many expired so far, and how much TTL they have left."""
        self.prune(domain)
        now = self.guard.run(lambda: self.client.time())
        now_ms = int(now[0]) * 1000 + int(now[1]) // 1000

        def read() -> list:
            pipe = self.client.pipeline(transaction=False)
            pipe.zcard(self.keys.index(domain))
            pipe.hmget(self.keys.stats(domain), ["bytes", "expired"])
            for _, low, high in TTL_BUCKETS:
                pipe.zcount(self.keys.index(domain), now_ms + low * 1000, now_ms + high * 1000 if high else "+inf")
            return pipe.execute()

        entries, (size, expired), *buckets = self.guard.run(read)
        ttl = {name: int(count) for (name, _, _), count in zip(TTL_BUCKETS, buckets)}
        return DomainEntries(int(entries), int(size or 0), int(expired or 0), ttl)

    def clear(self, domain: str, progress: Callable[[int], None] = lambda n: None) -> int:
        """Remove every cached response of `domain`, a batch at a time; returns how many went."""
        index, sizes = self.keys.index(domain), self.keys.sizes(domain)
        removed = 0
        while True:
            digests = [d.decode() for d in self.guard.run(lambda: self.client.zrange(index, 0, BATCH - 1))]
            if not digests:
                break

            def unlink() -> list:
                pipe = self.client.pipeline(transaction=False)
                pipe.unlink(*[self.keys.cache(domain, d) for d in digests])
                pipe.zrem(index, *digests)
                pipe.hdel(sizes, *digests)
                return pipe.execute()

            gone = int(self.guard.run(unlink)[0])
            removed += gone
            progress(len(digests))
        removed += self._clear_unindexed(domain)
        # Whatever was stored meanwhile is still indexed: its sizes are what is left.
        left = sum(int(v) for v in self.guard.run(lambda: self.client.hvals(sizes)))
        self.guard.run(lambda: self.client.hset(self.keys.stats(domain), "bytes", left))
        return removed

    def _clear_unindexed(self, domain: str) -> int:
        """Entries the index does not list (stored by an older version, or an index evicted by an
        allkeys-* Redis): found with SCAN MATCH, a batch at a time, so Redis is never blocked for long."""
        removed, cursor = 0, 0
        while True:
            cursor, found = self.guard.run(
                lambda: self.client.scan(cursor, match=self.keys.cache_pattern(domain), count=BATCH)
            )
            if found:
                removed += int(self.guard.run(lambda: self.client.unlink(*found)))
            if cursor == 0:
                return removed
