"""The response cache: one compressed blob per key with a Redis-native TTL, and no other per-entry state."""
from __future__ import annotations

import logging
import random
import secrets
import threading
import time
from typing import Callable, Iterable, Mapping, NamedTuple

import redis

from buddy import codec
from buddy.codec import VaryPointer
from buddy.fingerprint import url_digest
from buddy.messages import ProxyResult
from buddy.redis_keys import EntryId, RedisKeys
from buddy.store.connect import is_cluster, primaries, scan_batches
from buddy.store.fill_lock import load_script
from buddy.store.guard import StoreGuard
from buddy.store.memory_cache import EVERYTHING, MemoryCache
from buddy.store.pieces import PieceReader, Value
from buddy.store.wakeup import entry_message as wake_message

log = logging.getLogger("buddy.cache")
BATCH = 1000  # keys per round trip when counting or clearing: Redis is never blocked for long
CENSUS_SAMPLE = 30_000  # keys a census reads at most; a Redis holding fewer is read whole
MEASURE_SAMPLE = 3_000  # keys a census measures per domain at most; with fewer found, the count is exact
CENSUS_MAX_AGE = 1.0  # seconds a census is reused by this process (one scrape asks once per domain)
ACK = "!ack"  # a wake-up message every worker answers (see ResponseCache.invalidate); no mapping name starts with "!"
ACK_WAIT_SECONDS = 0.25
# Freshness left: an entry past its TTL is kept (stale) for its mapping's grace period; "stale" counts those.
TTL_BUCKETS = (("stale", None, 0), ("under_1h", 0, 3600), ("1h_to_1d", 3600, 86400), ("1d_to_7d", 86400, 604800),
               ("over_7d", 604800, None))


class DomainEntries(NamedTuple):
    """One domain's cached responses: how many, the Redis memory they take, and how much TTL they have left."""

    entries: int
    size_bytes: int
    ttl_buckets: dict[str, int]


class Census(NamedTuple):
    """Every domain's entries as counted in one pass over the keyspace (or over a uniform sample of it)."""

    domains: dict[str, DomainEntries]
    keys_read: int  # keys the pass looked at
    keys_total: int  # keys in the Redis database (DBSIZE) when it started
    exact: bool  # every key read, every cache key found measured

    def describe(self, domain: str) -> DomainEntries:
        return self.domains.get(domain, DomainEntries(0, 0, {name: 0 for name, _, _ in TTL_BUCKETS}))


class ResponseCache:
    """GET and SET of encoded responses; a blob that does not decode counts as a miss.

    Nothing but the entry itself lives as long as an entry: no index, no sizes hash. Such bookkeeping has
    no TTL, so under volatile-lru it is never evicted and, once Redis is full, crowds out every entry; under
    allkeys-lru it is evicted and then lies. Instead, counts are read from the keyspace itself (`census`),
    and a domain is cleared with SCAN.
    """

    def __init__(
        self,
        client: redis.Redis,
        guard: StoreGuard,
        keys: RedisKeys,
        grace: Mapping[str, int] | None = None,
        memory: MemoryCache | None = None,
    ) -> None:
        self.client = client
        self.guard = guard
        self.keys = keys
        self.memory = memory if memory is not None and memory.enabled else None  # this worker's L1 copies
        self.on_memory_hit: Callable[[str], None] = lambda domain: None  # told the domain of each L1 answer
        self.grace = dict(grace or {})  # domain -> seconds an entry is kept past its TTL
        self.pieces = PieceReader(client, guard)
        self._store = client.register_script(load_script("store_entry"))
        self._invalidate = client.register_script(load_script("invalidate"))
        self._measure = client.register_script(load_script("measure_entries"))
        self._drop_legacy = client.register_script(load_script("prune_index"))
        self._legacy_dropped: set[str] = set()  # domains whose pre-0.3 index this process has removed
        self._census_lock = threading.Lock()
        self._census: tuple[float, Census] | None = None  # (when, census)
        self.cluster = is_cluster(client)

    def get(self, entry: EntryId) -> ProxyResult | VaryPointer | None:
        """The stored response, or the vary pointer that says which variant to read; None on a miss.
        A hot entry comes from this worker's memory (L1) while it is fresh there."""
        key = self.keys.cache(entry.domain, entry.digest)
        memory = self.memory
        ticket = None
        if memory is not None and not self.guard.open_for(key):  # its Redis down or hung: a store may go unheard
            copy = memory.get(key)
            if copy is not None:
                self.on_memory_hit(entry.domain)
                return copy
            ticket = memory.ticket(key, entry.domain)
        value = self.decode(self.pieces.read(key))
        if value is None:
            return None
        if ticket is not None:
            memory.admit(ticket, value)  # type: ignore[union-attr]  # a ticket comes from memory
        return value

    def complete(self, key: str, first: bytes | None) -> ProxyResult | VaryPointer | None:
        """The stored value at `key`, given the first piece of it read a moment ago (lead.lua reads one): see
        buddy.store.pieces."""
        return self.decode(self.pieces.complete(key, first))

    @staticmethod
    def decode(blob: Value | None) -> ProxyResult | VaryPointer | None:
        """A stored value as read from Redis; None for nothing, or for a blob that does not decode (a miss)."""
        if blob is None:
            return None
        try:
            return codec.decode(blob)
        except codec.CodecError as exc:
            log.info("unreadable cache entry treated as a miss: %s", exc)
            return None

    def heard(self, message: str) -> None:
        """A message on the wake-up channel: drop this worker's copy of whatever it names (L1); after a clear,
        its census too (the next count reads the keyspace again); say so when asked (an invalidation's barrier)."""
        domain, _, digest = message.partition("\n")
        if domain == ACK:
            key = self.keys.ack(digest)

            def count() -> None:
                pipe = self.client.pipeline(transaction=False)
                pipe.incr(key)
                pipe.expire(key, 10)
                pipe.execute()

            self.guard.run(count, key=key)
            return
        if EVERYTHING in (message, digest):
            self._census = None
        if self.memory is None:
            return
        if message == EVERYTHING:
            self.memory.clear()
        elif digest == EVERYTHING:
            self.memory.invalidate(EVERYTHING, domain)
        elif digest:
            self.memory.invalidate(self.keys.cache(domain, digest))

    def _announce(self, message: str) -> None:
        """Tell every worker (this one at once) that what `message` names changed."""
        self.heard(message)
        self.guard.run(lambda: self.client.publish(self.keys.fill_channel, message))

    def put(
        self,
        entry: EntryId,
        response: ProxyResult,
        ttl_seconds: int,
        pointer: tuple[EntryId, VaryPointer, int] | None = None,
        release: tuple[str, str] | None = None,
        url: str | None = None,
    ) -> bool:
        """Store the entry (and, for a varying answer, the pointer at its primary entry: where, what, TTL), let go of
        the fill lock `release` names (its key, the leader's token), note a GET answer (and its pointer) in the index
        of its upstream `url` (see `invalidate`), and tell every worker to drop its copies and wake the requests
        waiting on them, in one script call (EVALSHA: one round trip, on a cluster to the node of the domain's
        slot). True if the lock was still the leader's and is gone. The first store of a domain in this process
        also drops the index an older version may have left (it has no TTL, and would keep a full Redis full)."""
        blob = codec.encode(response)
        d = entry.domain
        key = self.keys.cache(d, entry.digest)
        messages = [wake_message(entry)]
        keys = [key, self.keys.stats(d)]
        also: list[bytes | int | str] = []  # what follows ARGV[5] (see store_entry.lua)
        what = ""
        if pointer is not None:
            at, names, pointer_ttl = pointer
            messages.append(wake_message(at))
            keys.append(self.keys.cache(at.domain, at.digest))
            also += [codec.encode_pointer(names), pointer_ttl * 1000, messages[1]]
            what += "p"
        if release is not None:
            keys.append(release[0])
            also.append(release[1])
            what += "l"
        if url is not None:
            keys.append(self.keys.url_index(d, url_digest(url)))
            what += "i"
        args = [codec.sendable(blob), ttl_seconds * 1000, self.keys.fill_channel, messages[0], what, *also]
        if d not in self._legacy_dropped:
            legacy = self._legacy_keys(d)
            self.guard.run(lambda: self._drop_legacy(keys=legacy), what="prune_index.lua", key=legacy[0])
            self._legacy_dropped.add(d)
        try:
            _, released = self.guard.run(lambda: self._store(keys=keys, args=args), key=key)
        finally:
            for written in messages:  # this worker at once (a copy admitted meanwhile may be the old value); the
                self.heard(written)  # others when they hear the script's PUBLISH
        return bool(released)

    def invalidate(self, domain: str, urls: Iterable[str]) -> int:
        """Remove every stored GET answer of these upstream URLs (their variants and vary pointers too), from every
        worker's memory as well; how many were removed. RFC 9111 4.4, after an unsafe request to them."""
        removed = 0
        prefix = self.keys.cache(domain, "")
        for url in urls:
            index = self.keys.url_index(domain, url_digest(url))
            gone = self.guard.run(lambda: self._invalidate(keys=[index], args=[self.keys.fill_channel, prefix, domain]),
                                  key=index)
            for key in gone:  # this worker's copies at once; the others' when they hear the script's messages
                name = key.decode() if isinstance(key, bytes) else str(key)
                self.heard(f"{domain}\n{name[len(prefix):]}")
            removed += len(gone)
        if removed and self.memory is not None:
            self._until_every_worker_heard(domain)
        return removed

    def _until_every_worker_heard(self, domain: str) -> None:
        """A barrier after an invalidation: every worker subscribed to the wake-up channel hears its messages in
        order, so once each has answered one more ("ack"), none will answer from its memory with what was removed.
        Waits ACK_WAIT_SECONDS at most (a worker that is stuck stops using its copies on its own: see MemoryCache)."""
        token = secrets.token_hex(8)
        receivers = int(self.guard.run(lambda: self.client.publish(self.keys.fill_channel, f"{ACK}\n{token}")))
        key = self.keys.ack(token)
        deadline = time.monotonic() + ACK_WAIT_SECONDS
        while time.monotonic() < deadline:
            if int(self.guard.run(lambda: self.client.get(key), key=key) or 0) >= receivers:
                return
            time.sleep(0.002)
        log.info("not every worker of '%s' said it heard an invalidation within %g s", domain, ACK_WAIT_SECONDS)

    def forget(self, entry: EntryId) -> None:
        """Remove one entry (a vary pointer's variants stay, each with its own TTL), from every worker's memory too."""
        key = self.keys.cache(entry.domain, entry.digest)
        self.guard.run(lambda: self.client.unlink(key), key=key)
        self._announce(wake_message(entry))

    def census(self, max_age: float = CENSUS_MAX_AGE) -> Census:
        """Count every domain's entries, bytes and TTLs by reading the keyspace itself: all of it when Redis holds
        up to CENSUS_SAMPLE keys, else the first CENSUS_SAMPLE keys SCAN returns, scaled up by DBSIZE; the keys
        found are measured (memory, TTL, response or vary pointer) up to MEASURE_SAMPLE per domain, a random
        subset beyond. Nothing is remembered per entry, so eviction cannot make the counts lie; and nothing here
        counts as an access (SCAN, PTTL, OBJECT, MEMORY), so reading the metrics never shields an entry from LRU.

        SCAN walks Redis's hash table in bucket order, and a key's bucket is a keyed hash of its name, so its
        first keys are a uniform sample of the keyspace: a domain holding a share p of all keys is counted with a
        standard error of sqrt((1 - p) / (p * CENSUS_SAMPLE)): 0.6% at p = 0.5, 1.7% at 0.1, 5.7% at 0.01.
        """
        with self._census_lock:  # one census at a time per process; the threads that waited share it
            kept = self._census
            if kept is not None and time.monotonic() - kept[0] < max_age:
                return kept[1]
            result = self._take_census()
            self._census = (time.monotonic(), result)
            return result

    def describe(self, domain: str) -> DomainEntries:
        """One domain's entries, bytes and TTLs (from a census shared by every domain; see `census`)."""
        return self.census().describe(domain)

    def _take_census(self) -> Census:
        """On a cluster, each primary is sampled alike (its share of CENSUS_SAMPLE) and scaled by its own DBSIZE; a
        domain lives on one primary (its hash tag), so its counts come from that primary's sample."""
        nodes = self.guard.run(lambda: primaries(self.client))
        quota = max(1, CENSUS_SAMPLE // len(nodes))
        sums: dict[str, list[int]] = {}
        read_all = total_all = 0
        exact = True
        for _, node in nodes:
            total = int(self.guard.run(node.dbsize))
            found, read, complete = self._scan_sample(node, quota)
            if complete:
                total = read
            scale = max(total, read) / read if read else 1.0
            exact = exact and complete
            read_all, total_all = read_all + read, total_all + max(total, read)
            for domain, names in found.items():
                measured = names if len(names) <= MEASURE_SAMPLE else random.sample(names, MEASURE_SAMPLE)
                exact = exact and measured is names
                responses, size, buckets = self._measure_keys(measured, self.grace.get(domain, 0))
                factor = scale * len(names) / len(measured)
                counts = sums.setdefault(domain, [0] * (2 + len(TTL_BUCKETS)))
                for i, n in enumerate([responses, size, *buckets]):
                    counts[i] += round(n * factor)
        domains = {
            domain: DomainEntries(counts[0], counts[1], {name: n for (name, _, _), n in zip(TTL_BUCKETS, counts[2:])})
            for domain, counts in sums.items()
        }
        return Census(domains, read_all, total_all, exact)

    def _scan_sample(self, node: redis.Redis, quota: int) -> tuple[dict[str, list[bytes]], int, bool]:
        """Cache keys by domain among the first `quota` keys SCAN returns on this server (one primary of a
        cluster); how many keys it read; whether that was all of them."""
        prefix = self.keys.cache_prefix.encode()
        found: dict[str, set[bytes]] = {}
        seen: set[bytes] = set()  # SCAN may return a key twice while Redis rehashes
        cursor = 0
        while True:
            cursor, batch = self.guard.run(lambda: node.scan(cursor, count=BATCH))
            seen.update(batch)
            for key in batch:
                if key.startswith(prefix):
                    tag, sep, _ = key[len(prefix):].rpartition(b"}:")
                    if sep and tag.startswith(b"{"):
                        found.setdefault(tag[1:].decode(errors="replace"), set()).add(key)
            if cursor == 0 or len(seen) >= quota:
                return {domain: list(keys) for domain, keys in found.items()}, len(seen), cursor == 0

    def _measure_keys(self, names: list[bytes], grace: int) -> tuple[int, int, list[int]]:
        """(responses, their bytes, their count per bucket of freshness left) among these keys of one domain,
        whose entries Redis keeps `grace` seconds past their TTL."""
        bounds = [(high + grace) * 1000 for _, _, high in TTL_BUCKETS if high is not None]
        responses, size, buckets = 0, 0, [0] * len(TTL_BUCKETS)
        for start in range(0, len(names), BATCH):
            chunk = names[start : start + BATCH]
            counted = self.guard.run(lambda: self._measure(keys=chunk, args=bounds), what="measure_entries.lua",
                                     key=chunk[0].decode())
            responses, size = responses + int(counted[0]), size + int(counted[1])
            buckets = [b + int(n) for b, n in zip(buckets, counted[3:])]
        return responses, size, buckets

    def clear(
        self, domain: str, progress: Callable[[int], None] = lambda n: None, namespace: str | None = None
    ) -> int:
        """Remove every cached response of `domain` (and its vary pointers), or only those in `namespace`, found
        with SCAN MATCH a batch at a time so that Redis is never blocked for long; returns how many keys went.
        SCAN returns every key that exists from start to end of the pass; what is stored meanwhile may stay."""
        legacy = self._legacy_keys(domain)
        self.guard.run(lambda: self._drop_legacy(keys=legacy), key=legacy[0])
        pattern = self.keys.cache_pattern(domain, namespace)
        removed = 0
        # On a cluster, SCAN runs on every primary (from a fresh view of the cluster; a cluster with slots down
        # fails the clear rather than leave a part of it); UNLINK goes to the node of the keys' slot.
        for found in scan_batches(self.client, self.guard.run, match=pattern, count=BATCH):
            removed += int(self.guard.run(lambda: self.client.unlink(*found), key=found[0].decode()))
            progress(len(found))
        self._census = None
        self._announce(f"{domain}\n{EVERYTHING}")  # every worker drops its copies of the mapping's entries
        return removed

    def _legacy_keys(self, domain: str) -> list[str]:
        return [self.keys.index(domain), self.keys.sizes(domain), self.keys.stats(domain)]
