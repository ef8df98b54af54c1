"""Do parked requests starve cache hits? And how long do 100 identical concurrent misses take?

For each gunicorn worker class (sync, gthread, gevent if installed) on a 4-worker proxy, this script:
  1. measures hit latency with nothing else in flight,
  2. parks 120 distinct slow misses (the upstream stub takes 4 s each) and measures hit latency meanwhile,
  3. fires 100 concurrent identical misses at a 500 ms upstream and times until all have answered.

Run: python bench/parked.py [--classes sync,gthread,gevent] [--threads 32]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from tests.support.processes import Gunicorn, RedisServer  # noqa: E402
from tests.support.upstream_stub import UpstreamStub  # noqa: E402


def start_proxy(workdir: Path, redis_url: str, upstream: str, worker_class: str, threads: int) -> Gunicorn:
    proxy = Gunicorn(
        workdir,
        {"domain_mappings": {"up": {"upstream": upstream, "read_timeout": 30}},
         "throttling": {"default_requests_per_hour": 1_000_000}, "logging": {"level": "WARNING"}},
        {"REDIS_URL": redis_url}, workers=4,
        extra_args=("-k", worker_class, "--threads", str(threads if worker_class == "gthread" else 1),
                    "--worker-connections", "1000"),
    )
    proxy.wait_until_serving("/up/warm")
    return proxy


def hit_latencies(base: str, seconds: float) -> list[float]:
    session = requests.Session()
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        try:
            response = session.get(f"{base}/up/warm", timeout=5)
            assert response.headers["X-Cache"] == "HIT", response.headers
        except requests.Timeout:
            pass  # a starved proxy: the hit counts as taking the whole timeout
        out.append(time.perf_counter() - start)
    return out


def summary(latencies: list[float]) -> str:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"{statistics.median(ordered) * 1000:8.1f} {p99 * 1000:8.1f} {ordered[-1] * 1000:8.1f}"


def run_class(worker_class: str, threads: int, workdir: Path, redis: RedisServer, upstream: UpstreamStub,
              parked: int = 120, burst: int = 100, scale: float = 1.0) -> list[str]:
    """`scale` < 1 shortens every wait and the upstream's delays alike (bench/smoke.py)."""
    redis.client().flushall()
    proxy = start_proxy(workdir, redis.url, upstream.url, worker_class, threads)
    base = proxy.url
    rows = []
    try:
        rows.append(f"{worker_class:8} {'idle hits':28} {summary(hit_latencies(base, 2 * scale))}")
        pool = ThreadPoolExecutor(max_workers=parked)
        started = time.monotonic()
        slow = f"sleep={4000 * scale:.0f}"
        futures = [pool.submit(requests.get, f"{base}/up/parked/{worker_class}/{i}?{slow}", timeout=60)
                   for i in range(parked)]
        time.sleep(0.5 * scale)  # let them reach the upstream
        rows.append(f"{worker_class:8} {f'hits, {parked} misses parked':28} {summary(hit_latencies(base, 3 * scale))}")
        done, _ = wait(futures, timeout=max(0.0, started + 15 - time.monotonic()))
        ok = sum(1 for f in done if f.exception() is None and f.result().status_code == 200)
        rows.append(f"{worker_class:8} {'parked misses answered':28} {ok:>8}/{parked} within 15 s")
        if ok < parked:  # a starved class would take minutes to drain; restart it rather than wait
            proxy.stop()
            pool.shutdown(cancel_futures=True)
            proxy = start_proxy(workdir, redis.url, upstream.url, worker_class, threads)
            base = proxy.url
        else:
            pool.shutdown()
        upstream.clear()
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=burst) as pool_of_burst:
            answers = list(pool_of_burst.map(
                lambda _: requests.get(f"{base}/up/burst/{worker_class}?sleep={500 * scale:.0f}", timeout=60),
                range(burst)))
        burst_time = time.monotonic() - started
        rows.append(f"{worker_class:8} {f'{burst} identical misses':28} {burst_time * 1000:8.0f} ms for all "
                    f"(upstream 500 ms, {upstream.count()} upstream call(s), "
                    f"{sum(a.status_code == 200 for a in answers)}/{burst} ok)")
    finally:
        proxy.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = "sync,gthread" + (",gevent" if importlib.util.find_spec("gevent") else "")
    parser.add_argument("--classes", default=default)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("BUDDY_THREADS", "64")))
    parser.add_argument("--parked", type=int, default=120, help="distinct slow misses parked at once")
    parser.add_argument("--burst", type=int, default=100, help="identical concurrent misses")
    parser.add_argument("--smoke", action="store_true", help="tiny counts (bench/smoke.py): check that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.classes, args.threads, args.parked, args.burst = "gthread", 8, 4, 4
    upstream = UpstreamStub()
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp))
        try:
            print(f"{'class':8} {'scenario':28} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
            for worker_class in args.classes.split(","):
                for row in run_class(worker_class, args.threads, Path(tmp), redis, upstream, args.parked, args.burst,
                                     scale=0.25 if args.smoke else 1.0):
                    print(row, flush=True)
        finally:
            redis.stop()
            upstream.stop()


if __name__ == "__main__":
    main()
