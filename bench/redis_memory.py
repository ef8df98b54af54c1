"""How many 2 KB JSON answers fit in a MB of Redis, and does the cache keep working once Redis is full?

Three ways of storing the same encoded blobs (`codec.encode` of ~2 KB of ConceptNet-shaped JSON) under the same
key names, each on its own redis-server (the bundled binary):
  raw SET   the baseline: SET key blob PX ttl, nothing else;
  proxy     this version's ResponseCache.put (the entry and a per-domain counter, nothing per entry);
  0.2       the previous layout: the entry plus a per-domain index (sorted set) and sizes hash, both
            without a TTL (the Lua of version 0.2, inlined below).

1. Entries per MB: N entries into an unlimited Redis; Redis' used_memory growth per entry.
2. Fill past maxmemory, with the embedded default's policy (volatile-lru): rounds of new entries, each stored
   the way a miss stores it (fill lock SET NX PX, store, release), with a hot set of 100 entries read after
   every 100 stores. Per round: how many times maxmemory has been written, entries resident, hot hit rate,
   stores and locks Redis refused, and what the proxy's census counts against a full SCAN.
3. Census cost: how long one count of every domain takes as the keyspace grows (exact, then sampled).

Run from the repo root: python bench/redis_memory.py [--entries 20000] [--maxmemory 8mb] [--rounds 4]
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from buddy import codec  # noqa: E402
from buddy.errors import StoreUnavailable  # noqa: E402
from buddy.messages import ProxyResult  # noqa: E402
from buddy.redis_keys import EntryId, RedisKeys  # noqa: E402
from buddy.store.fill_lock import FillLock  # noqa: E402
from buddy.store.guard import StoreGuard  # noqa: E402
from buddy.store.response_cache import ResponseCache  # noqa: E402
from tests.support.processes import RedisServer  # noqa: E402
from tests.support.upstream_stub import conceptnet_json  # noqa: E402

TTL = 86_400
DOMAIN = "conceptnet"
HOT = 100

V02_STORE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local size = string.len(ARGV[1])
local old = tonumber(redis.call('HGET', KEYS[3], ARGV[3]) or 0)
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[3])
redis.call('HSET', KEYS[3], ARGV[3], size)
redis.call('HINCRBY', KEYS[4], 'bytes', size - old)
redis.call('HINCRBY', KEYS[4], 'sets', 1)
return size
"""
V02_PRUNE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local freed = 0
for _, digest in ipairs(gone) do
  freed = freed + tonumber(redis.call('HGET', KEYS[2], digest) or 0)
  redis.call('HDEL', KEYS[2], digest)
  redis.call('ZREM', KEYS[1], digest)
end
if #gone > 0 then
  redis.call('HINCRBY', KEYS[3], 'bytes', -freed)
  redis.call('HINCRBY', KEYS[3], 'expired', #gone)
end
return #gone
"""


def answer(i: int) -> ProxyResult:
    """About 2 KB of ConceptNet-shaped JSON, different for every i."""
    body = conceptnet_json(i, f"/c/en/term{i}")
    return ProxyResult(200, "OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))], body)


def digest(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


class Layout:
    """One way of storing entries: `store(i)` raises StoreUnavailable when Redis refuses."""

    def __init__(self, name: str, client: redis.Redis) -> None:
        self.name = name
        self.client = client
        self.keys = RedisKeys()
        self.guard = StoreGuard()
        self.cache = ResponseCache(client, self.guard, self.keys)
        self.store: Callable[[int], None] = {"raw SET": self._raw, "proxy": self._proxy, "0.2": self._v02}[name]
        self._v02_store = client.register_script(V02_STORE)
        self._v02_prune = client.register_script(V02_PRUNE)

    def _raw(self, i: int) -> None:
        blob = codec.encode(answer(i))
        self.guard.run(lambda: self.client.set(self.keys.cache(DOMAIN, digest(i)), blob, ex=TTL))

    def _proxy(self, i: int) -> None:
        self.cache.put(EntryId(DOMAIN, digest(i)), answer(i), TTL)

    def _v02(self, i: int) -> None:
        k = self.keys
        keys = [k.cache(DOMAIN, digest(i)), k.index(DOMAIN), k.sizes(DOMAIN), k.stats(DOMAIN)]

        def store() -> None:
            pipe = self.client.pipeline(transaction=False)
            self._v02_store(keys=keys, args=[codec.encode(answer(i)), TTL * 1000, digest(i)], client=pipe)
            self._v02_prune(keys=keys[1:], args=[10], client=pipe)
            pipe.execute()

        self.guard.run(store)

    def hit(self, i: int) -> bool:
        try:
            return self.cache.get(EntryId(DOMAIN, digest(i))) is not None
        except StoreUnavailable:
            return False


def server(workdir: Path, maxmemory: str = "0") -> RedisServer:
    s = RedisServer(Path(tempfile.mkdtemp(dir=workdir)))
    s.client().config_set("maxmemory", maxmemory)
    s.client().config_set("maxmemory-policy", "volatile-lru")  # what the embedded Redis and deploy/ use
    return s


def entries_per_mb(workdir: Path, n: int) -> None:
    blob = sum(len(codec.encode(answer(i))) for i in range(200)) / 200
    body = sum(len(answer(i).body or b"") for i in range(200)) / 200
    print(f"\n1. Entries per MB of Redis: {n:,} answers of {body:,.0f} B of JSON each, stored as {blob:,.0f} B blobs")
    print(f"{'layout':<10} {'bytes/entry':>12} {'entries/MB':>11} {'vs raw SET':>11}")
    baseline = 0.0
    for name in ("raw SET", "proxy", "0.2"):
        s = server(workdir)
        try:
            client = s.client()
            layout = Layout(name, client)
            layout.store(0)
            before = client.info("memory")["used_memory"]
            for i in range(1, n + 1):
                layout.store(i)
            per_entry = (client.info("memory")["used_memory"] - before) / n
        finally:
            s.stop()
        baseline = baseline or per_entry
        print(f"{name:<10} {per_entry:>12,.0f} {2**20 / per_entry:>11,.0f} {baseline / per_entry:>10.0%}")


def fill_past_maxmemory(workdir: Path, maxmemory: str, rounds: int, most: int | None = None) -> None:
    """`most`: stores per round at most (--smoke: that it runs, not how a full Redis behaves)."""
    print(f"\n2. Filling a {maxmemory} Redis (volatile-lru) past maxmemory: a miss takes the fill lock, stores and "
          f"releases;\n   {HOT} hot entries are read after every 100 stores. 'written' counts maxmemory's worth "
          "of blobs written so far.")
    print(f"{'layout':<8} {'round':>5} {'written':>8} {'resident':>9} {'hot hits':>9} {'stores refused':>15} "
          f"{'locks refused':>14} {'census':>7} {'SCAN':>6}")
    limit = None
    for name in ("raw SET", "proxy", "0.2"):
        s = server(workdir, maxmemory)
        try:
            client = s.client()
            limit = limit or client.config_get("maxmemory")["maxmemory"]
            layout, lock = Layout(name, client), FillLock(client, StoreGuard(), RedisKeys())
            blob = len(codec.encode(answer(0)))
            per_round = min(int(int(limit) / blob), most or 1 << 62)  # one maxmemory's worth of blobs per round
            for h in range(HOT):
                layout.store(-1 - h)
            written = 0
            for r in range(1, rounds + 1):
                refused_stores = refused_locks = hot_reads = hot_hits = 0
                for j in range(per_round):
                    i = written + j
                    entry = EntryId(DOMAIN, digest(i))
                    try:
                        won, _ = lock.acquire(entry, f"t{i}", 3000)
                    except StoreUnavailable:
                        won = False
                        refused_locks += 1
                    try:
                        layout.store(i)
                    except StoreUnavailable:
                        refused_stores += 1
                    if won:
                        try:
                            lock.release(entry, f"t{i}")
                        except StoreUnavailable:
                            pass
                    if j % 100 == 99:
                        hot_reads += HOT
                        hot_hits += sum(layout.hit(-1 - h) for h in range(HOT))
                written += per_round
                # Counted first, then checked: on a Redis this small, the census's own replies (client buffers
                # count toward maxmemory) evict a few entries, which a SCAN before it would still see.
                counted = layout.cache.census(max_age=0).describe(DOMAIN).entries
                resident = len(set(client.scan_iter(match=layout.keys.cache_pattern(DOMAIN), count=1000)))
                print(f"{name:<8} {r:>5} {written * blob / int(limit):>7.1f}x {resident:>9,} "
                      f"{hot_hits / max(hot_reads, 1):>9.1%} {refused_stores:>15,} {refused_locks:>14,} "
                      f"{counted:>7,} {resident:>6,}")
        finally:
            s.stop()


def census_cost(workdir: Path, sizes: tuple[int, ...] = (3_000, 30_000, 100_000, 500_000)) -> None:
    print("\n3. Census cost (one count of every domain: /admin/metrics, /metrics, `flask buddy stats`), two domains\n"
          "   holding 2/3 and 1/3 of the keys; exact up to 3,000 keys a domain, then sampled (30,000 keys read,\n"
          "   3,000 a domain measured).")
    print(f"{'keys':>9} {'exact':>6} {'ms':>7} {'error, big domain':>18} {'error, small domain':>20}")
    s = server(workdir)
    try:
        client = s.client()
        keys, blob = RedisKeys(), codec.encode(answer(0))
        cache = ResponseCache(client, StoreGuard(), keys)
        have = 0
        for total in sizes:
            pipe = client.pipeline(transaction=False)
            for i in range(have, total):
                pipe.set(keys.cache("big" if i % 3 else "small", digest(i)), blob, ex=TTL)
                if i % 10_000 == 9_999:
                    pipe.execute()
            pipe.execute()
            have = total
            big, small = sum(1 for i in range(total) if i % 3), sum(1 for i in range(total) if not i % 3)
            started = time.perf_counter()
            census = cache.census(max_age=0)
            ms = (time.perf_counter() - started) * 1000
            errors = census.describe("big").entries / big - 1, census.describe("small").entries / small - 1
            print(f"{total:>9,} {str(census.exact):>6} {ms:>7.0f} {errors[0]:>+17.2%} {errors[1]:>+19.2%}")
    finally:
        s.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--maxmemory", default="8mb")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--smoke", action="store_true", help="tiny counts (bench/smoke.py): check that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.entries, args.maxmemory, args.rounds = 300, "2mb", 1
    logging.getLogger("buddy").setLevel(logging.CRITICAL)  # a refused store is a table cell here, not a log line
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        entries_per_mb(workdir, args.entries)
        fill_past_maxmemory(workdir, args.maxmemory, args.rounds, 300 if args.smoke else None)
        census_cost(workdir, (300, 4_000) if args.smoke else (3_000, 30_000, 100_000, 500_000))


if __name__ == "__main__":
    main()
