"""Do slow clients starve cache hits? Hit latency idle, then beside 400 hostile clients, in the same run.

For the default worker shape (gunicorn.conf.py: 4 workers x 64 threads, default settings, so
server.header_timeout 10 s and server.body_timeout 30 s) and, for comparison, the same with `-k gthread`,
this script measures cache hits (each on a new connection, and on one kept-alive connection):
  1. with nothing else going on,
  2. beside 400 connections that send their request head one byte a second (no key needed; a connection
     the proxy closes is opened again at once, as an attacker would),
  3. beside 400 connections that each send a whole `Connection: close` request and then neither read
     nor close,
  4. beside 400 connections that send a POST body one byte a second: the proxy reads it, and a thread
     waits for it until body_timeout,
  5. the same with `security.require_secure_key` on and the slow bodies sent without the key (the hits
     carry it): refused before their bodies are read,
  6. beside 300 connections that each ask for a cached 8 MB answer and never read it (a small receive
     buffer, as a slow client far away has): each answer is left to the worker's loop (server.send_buffer),
     where gthread's threads each block on one.
A hit that takes longer than the client timeout (5 s) counts as failed and as 5 s in the percentiles.

Run: python bench/slow_clients.py [--classes default,gthread] [--seconds 12] [--clients 400]
       [--scenario 'idle,never read']
"""
from __future__ import annotations

import argparse
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.ports import free_port, wait_for_port  # noqa: E402
from tests.support.processes import RedisServer, stop_group  # noqa: E402
from tests.support.upstream_stub import UpstreamStub  # noqa: E402

TIMEOUT = 5.0


KEY = "bench-slow-clients-key-0123456789"
BIG = f"/up/big/{8 * 1024 * 1024}"


def start_proxy(workdir: Path, redis_url: str, upstream: str, worker_class: str,
                keyed: bool) -> tuple[subprocess.Popen, str, int]:
    port = free_port()
    config = workdir / f"config-{port}.json"
    security = {"require_secure_key": True, "secure_key": KEY} if keyed else {}
    config.write_text(json.dumps({"domain_mappings": {"up": {"upstream": upstream}}, "security": security,
                                  "logging": {"level": "ERROR"}}))
    env = {**os.environ, "REDIS_URL": redis_url, "BUDDY_CONFIG": str(config)}
    env.pop("WEB_CONCURRENCY", None), env.pop("BUDDY_THREADS", None)  # the default shape
    klass = () if worker_class == "default" else ("-k", worker_class)
    args = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", f"127.0.0.1:{port}", *klass, "wsgi:app"]
    log = open(workdir / f"gunicorn-{port}.log", "wb")
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for_port(port, alive=lambda: process.poll() is None)
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):  # wait for the workers, not just the master's socket; the second call is a hit
        try:
            requests.get(f"{base}/up/warm", timeout=5, headers={"X-API-Buddy-Key": KEY} if keyed else {})
            break
        except requests.RequestException:
            time.sleep(0.1)
    return process, base, port


class Hostile:
    """`count` connections kept open by one thread; `opening` sends what a connection sends first, and
    `trickle` (if any) is sent one byte a second after it. A connection the proxy closes is replaced."""

    def __init__(self, port: int, count: int, opening: bytes, trickle: bytes = b"", receive: int = 0) -> None:
        self.port, self.opening, self.trickle, self.receive = port, opening, trickle, receive
        self.replaced = 0
        self.socks: list[tuple[socket.socket, int]] = [self._open() for _ in range(count)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _open(self) -> tuple[socket.socket, int]:
        sock = socket.socket()
        if self.receive:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive)
        sock.settimeout(5)
        sock.connect(("127.0.0.1", self.port))
        sock.sendall(self.opening)
        return sock, 0

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            if not self.trickle:
                continue
            for i, (sock, sent) in enumerate(self.socks):
                try:
                    sock.send(self.trickle[sent:sent + 1])
                    self.socks[i] = (sock, sent + 1)
                except OSError:
                    sock.close()
                    self.replaced += 1
                    try:
                        self.socks[i] = self._open()
                    except OSError:
                        pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        for sock, _ in self.socks:
            sock.close()


def hit_latencies(base: str, seconds: float, keep_alive: bool, keyed: bool) -> tuple[list[float], int]:
    session = requests.Session()
    key = {"X-API-Buddy-Key": KEY} if keyed else {}
    out, failed = [], 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        try:
            if keep_alive:
                response = session.get(f"{base}/up/warm", timeout=TIMEOUT, headers=key)
            else:
                response = requests.get(f"{base}/up/warm", timeout=TIMEOUT, headers={"Connection": "close", **key})
            assert response.headers["X-Cache"] == "HIT", response.headers
            out.append(time.perf_counter() - start)
        except requests.RequestException:
            failed += 1
            out.append(TIMEOUT)
            session = requests.Session()
    return out, failed


def summary(latencies: list[float], failed: int) -> str:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (f"{statistics.median(ordered) * 1000:8.1f} {p99 * 1000:8.1f} {ordered[-1] * 1000:8.1f} "
            f"{len(ordered):6} {failed:6}")


def scenarios(clients: int) -> list[tuple[str, bool, Callable[[int], Hostile | None]]]:
    """(name, key required?, start the hostile clients against a port); the heads name the port as Host."""
    def slow_heads(port: int) -> Hostile:
        head = f"GET /up/slow HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Pad: {'a' * 300}\r\n\r\n".encode()
        return Hostile(port, clients, head[:1], head[1:])

    def never_close(port: int) -> Hostile:
        request = f"GET /up/warm HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
        return Hostile(port, clients, request.encode())

    def slow_bodies(port: int) -> Hostile:
        head = f"POST /up/post HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 100000\r\n\r\n".encode()
        return Hostile(port, clients, head, b"x" * 100000)

    def never_read(port: int) -> Hostile:
        requests.get(f"http://127.0.0.1:{port}{BIG}", timeout=30).raise_for_status()  # cached now
        request = f"GET {BIG} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
        hostile = Hostile(port, clients * 3 // 4, request, receive=16 * 1024)
        waiting = [sock for sock, _ in hostile.socks]  # measured once each has its answer coming (or 30 s)
        deadline = time.monotonic() + 30
        while waiting and time.monotonic() < deadline:
            ready = set(select.select(waiting, [], [], 1.0)[0])
            waiting = [sock for sock in waiting if sock not in ready]
        return hostile

    return [("idle", False, lambda port: None), (f"{clients} slow heads", False, slow_heads),
            (f"{clients} never close", False, never_close), (f"{clients} slow bodies", False, slow_bodies),
            (f"{clients} slow bodies, no key", True, slow_bodies),
            (f"{clients * 3 // 4} never read 8 MB", False, never_read)]


def run_class(worker_class: str, seconds: float, clients: int, workdir: Path, redis: RedisServer,
              upstream: UpstreamStub, only: int | None = None, matching: str = "") -> None:
    chosen = [one for one in scenarios(clients)[:only] if any(part in one[0] for part in matching.split(","))]
    for name, keyed, start_hostile in chosen:
        redis.client().flushall()  # a fresh proxy per scenario: a starved one from before must not count
        process, base, port = start_proxy(workdir, redis.url, upstream.url, worker_class, keyed)
        hostile = None
        try:
            hit_latencies(base, 2, False, keyed)  # not counted: every worker's first requests set up connections
            hostile = start_hostile(port)
            time.sleep(min(1.5, seconds) if hostile else 0)  # every hostile connection accepted, a byte or two sent
            for keep_alive in (False, True):
                style = "keep-alive" if keep_alive else "new conn"
                latencies, failed = hit_latencies(base, seconds / 2, keep_alive, keyed)
                print(f"{worker_class:8} {name:28} {style:10} {summary(latencies, failed)}", flush=True)
            if hostile and hostile.replaced:
                print(f"{'':8} {'':28} ({hostile.replaced} hostile connections closed by the proxy, replaced)")
        finally:
            if hostile:
                hostile.stop()
            stop_group(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", default="default,gthread", help="default = gunicorn.conf.py's worker_class")
    parser.add_argument("--seconds", type=float, default=12.0, help="hits measured per scenario (half each style)")
    parser.add_argument("--clients", type=int, default=400)
    parser.add_argument("--scenario", default="",
                        help="only the scenarios whose names contain one of these ('idle,never read')")
    parser.add_argument("--smoke", action="store_true", help="tiny counts (bench/smoke.py): check that it runs")
    args = parser.parse_args()
    only = None
    if args.smoke:  # the default worker, idle and beside one kind of hostile client
        args.classes, args.seconds, args.clients, only = "default", 0.5, 20, 2
    upstream = UpstreamStub()
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(Path(tmp))
        try:
            print(f"{'class':8} {'beside':28} {'hits on':10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
                  f"{'hits':>6} {'failed':>6}", flush=True)
            for worker_class in args.classes.split(","):
                run_class(worker_class, args.seconds, args.clients, Path(tmp), redis, upstream, only, args.scenario)
        finally:
            redis.stop()
            upstream.stop()


if __name__ == "__main__":
    main()
