"""Do cache hits keep flowing while a neighbour floods throttled misses, or while Redis hangs?

On the default worker shape (`gunicorn.conf.py`: gthread, 4 workers x 64 threads), this script measures
hit latency in one run:
  1. idle;
  2. with N distinct misses in flight on a 1-request-per-second mapping (each would wait minutes for its
     slot), then hangs those clients up and counts how many of them still reach the upstream afterwards;
  3. with the Redis server stopped by SIGSTOP (hung: it accepts connections and never answers). Hits
     cannot be read then; every request goes upstream as BYPASS. In each worker the first call waits
     out the short command timeout (buddy.store.connect.COMMAND_TIMEOUT_SECONDS, not `redis.socket_timeout`,
     which is for blocking reads); after that, requests should answer at upstream speed instead of each
     waiting on Redis again.

Run: python bench/stalls.py [--misses 300] [--seconds 3] [--smoke]
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.processes import Gunicorn, RedisServer  # noqa: E402
from tests.support.upstream_stub import UpstreamStub  # noqa: E402


def start_proxy(workdir: Path, redis_url: str, upstream: str, smoke: bool = False) -> Gunicorn:
    """The default shape of gunicorn.conf.py (4 workers), one free mapping and one at 1 request a second (smoke:
    one worker, and a 1-second Redis socket timeout)."""
    proxy = Gunicorn(workdir, {
        "domain_mappings": {"up": {"upstream": upstream}, "slow": {"upstream": upstream, "max_requests_per_second": 1}},
        "throttling": {"default_requests_per_hour": 10_000_000},  # BYPASS goes upstream: never the limit here
        "logging": {"level": "WARNING"},
        **({"redis": {"socket_timeout": 1}} if smoke else {}),
    }, {"REDIS_URL": redis_url}, workers=1 if smoke else 4)
    proxy.wait_until_serving("/up/warm")
    return proxy


def hit_latencies(base: str, seconds: float) -> tuple[list[float], int]:
    """(latencies, failures) of back-to-back requests for one cached URL; a timeout counts as 2 s."""
    session = requests.Session()
    out, failures = [], 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        try:
            session.get(f"{base}/up/warm", timeout=2).raise_for_status()
        except requests.RequestException:
            failures += 1
        out.append(time.perf_counter() - start)
    return out, failures


def row(scenario: str, latencies: list[float], failures: int, note: str = "") -> str:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (f"{scenario:34} {len(ordered):>6} {statistics.median(ordered) * 1000:8.1f} {p99 * 1000:8.1f} "
            f"{ordered[-1] * 1000:8.1f} {failures:>6}  {note}")


def flood(port: int, count: int) -> list[socket.socket]:
    """`count` open connections, each with one distinct throttled miss sent and never read."""
    conns = []
    for i in range(count):
        conn = socket.create_connection(("127.0.0.1", port), timeout=5)
        conn.sendall(f"GET /slow/flood/{i} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        conns.append(conn)
    return conns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--misses", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--smoke", action="store_true", help="tiny counts: check that the script runs")
    args = parser.parse_args()
    misses, seconds = (20, 0.5) if args.smoke else (args.misses, args.seconds)
    upstream = UpstreamStub()
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp))
        proxy = start_proxy(Path(tmp), redis.url, upstream.url, args.smoke)
        base, port = proxy.url, proxy.port
        try:
            print(f"{'scenario':34} {'hits':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'failed':>6}")
            print(row("idle", *hit_latencies(base, seconds)), flush=True)

            conns = flood(port, misses)
            time.sleep(0.5)
            answered = 0
            for conn in conns:  # refused at once (429) beyond the waiting cap: those have an answer already
                conn.settimeout(0.01)
                try:
                    answered += conn.recv(12).startswith(b"HTTP/1.1 429")
                except OSError:
                    pass
            print(row(f"{misses} throttled misses in flight", *hit_latencies(base, seconds),
                      note=f"{answered} refused at once with 429"), flush=True)
            for conn in conns:
                conn.close()
            reached_before = upstream.count("/flood/")
            time.sleep(1.0 if args.smoke else 10.0)
            after = upstream.count("/flood/") - reached_before
            print(f"{'after they hung up':34} {after} of them reached the upstream later "
                  f"({reached_before} before the hang-up)", flush=True)

            os.kill(redis.process.pid, signal.SIGSTOP)
            try:  # each worker's first Redis call waits out the command timeout (0.5 s); then the circuit is open
                first = 1.5
                print(row(f"Redis hung (SIGSTOP), first {first:g} s", *hit_latencies(base, first)), flush=True)
                print(row("Redis hung, the next seconds", *hit_latencies(base, seconds)), flush=True)
            finally:
                os.kill(redis.process.pid, signal.SIGCONT)
            time.sleep(1.5)
            print(row("Redis back", *hit_latencies(base, seconds)), flush=True)
        finally:
            proxy.stop()
            redis.stop()
            upstream.stop()


if __name__ == "__main__":
    main()
