"""Do workers give back the memory of large answers? Each worker's RSS before, after 10 MB bodies, after a pause.

`gunicorn wsgi:app` (2 workers, the embedded Redis in a temporary folder) is started twice: with glibc's allocator
left as it is (BUDDY_MALLOC=glibc, the old behaviour) and as the workers run by default (buddy.malloc). Against
each, `--clients` clients at a time send `--count` requests per phase, each for a body that does not compress:
- misses: `--mb` MB bodies (under cache.max_cache_response_size, 10 MiB): fetched, stored in Redis, answered;
- hits: the same again, read back from Redis;
- over-size: `--mb` + 2 MB bodies: streamed to the client, never stored;
- coalesced: the over-size bodies again, four identical requests at a time: one leader, three followers that get
  the body through the relay (a Redis stream).
Printed, per worker: its RSS (VmRSS, MiB) when idle before, after each phase, and after `--pause` seconds with
nothing to do; below it, its peak during each phase (VmHWM, reset before each). Memory of the machine's other
processes does not count; the timings do not matter here.

Run: python bench/memory.py [--mb 10] [--count 20] [--clients 4] [--pause 5] [--smoke]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import psutil
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.processes import Gunicorn, stop_group  # noqa: E402
from tests.support.upstream_stub import UpstreamStub  # noqa: E402

MB = 1_000_000
MODES = {"glibc": "glibc's defaults (BUDDY_MALLOC=glibc)", "default": "as workers run by default (buddy.malloc)"}


def workers(master: psutil.Process) -> list[int]:
    """The gunicorn workers' pids (not the embedded redis-server or its keeper), in order."""
    found = []
    for child in master.children():
        try:
            if "gunicorn" in " ".join(child.cmdline()):
                found.append(child.pid)
        except psutil.Error:
            pass
    return sorted(found)


def status(pid: int, field: str) -> float:
    """A /proc/<pid>/status field in MiB (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as lines:
        for line in lines:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak(pid: int) -> None:
    """Start VmHWM again from the current RSS (Linux 4.0+; ignored where it is not allowed)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


def fetch(url: str) -> str:
    with requests.get(url, stream=True, timeout=120) as response:
        for _ in response.iter_content(256 * 1024):
            pass
        return response.headers.get("X-Cache", str(response.status_code))


def run_all(urls: list[str], clients: int) -> dict[str, int]:
    """Fetch every URL, `clients` at a time; how many answers got each X-Cache."""
    verdicts: dict[str, int] = {}
    lock, pending = threading.Lock(), iter(urls)

    def client() -> None:
        while True:
            with lock:
                url = next(pending, None)
            if url is None:
                return
            verdict = fetch(url)
            with lock:
                verdicts[verdict] = verdicts.get(verdict, 0) + 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return verdicts


def phases(base: str, size: int, count: int) -> list[tuple[str, list[str], int]]:
    """(name, URLs, how many clients at once: 0 for --clients) of each phase."""
    over = size + 2 * MB
    return [
        ("misses", [f"{base}/up/noise/{size}/{i}" for i in range(count)], 0),
        ("hits", [f"{base}/up/noise/{size}/{i}" for i in range(count)], 0),
        ("over-size", [f"{base}/up/noise/{over}/{i}" for i in range(count)], 0),
        # Four identical requests at a time, the upstream slow to start: one leads, three follow through the relay.
        ("coalesced", [f"{base}/up/noise/{over}/c{i // 4}?sleep=300" for i in range(count)], 4),
    ]


def measure(mode: str, upstream: UpstreamStub, args: argparse.Namespace, say: Callable[[str], None]
            ) -> dict[int, dict[str, tuple[float, float]]]:
    """Per worker: phase -> (RSS after it, peak during it), MiB; "before" and "pause" have no peak of their own."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {"BUDDY_DATA_DIR": str(Path(tmp) / "data"), "BUDDY_MALLOC": "glibc" if mode == "glibc" else ""}
        config = {"domain_mappings": {"up": {"upstream": upstream.url}},
                  "throttling": {"default_requests_per_hour": 10_000_000}, "logging": {"level": "WARNING"}}
        proxy = Gunicorn(Path(tmp), config, env, workers=2)
        try:
            master = psutil.Process(proxy.process.pid)
            run_all([f"{proxy.url}/up/warm/{i}" for i in range(40)], args.clients)  # every worker has served
            time.sleep(1)
            pids = workers(master)
            table = {pid: {"before": (status(pid, "VmRSS"), status(pid, "VmRSS"))} for pid in pids}
            for name, urls, clients in phases(proxy.url, int(args.mb * MB), args.count):
                for pid in pids:
                    reset_peak(pid)
                verdicts = run_all(urls, clients or args.clients)
                say(f"  {mode:8} {name:10} {', '.join(f'{k} {v}' for k, v in sorted(verdicts.items()))}")
                for pid in pids:
                    table[pid][name] = (status(pid, "VmRSS"), status(pid, "VmHWM"))
            time.sleep(args.pause)
            for pid in pids:
                table[pid]["pause"] = (status(pid, "VmRSS"), status(pid, "VmRSS"))
            return table
        finally:
            stop_group(proxy.process)
            proxy.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=10.0, help="body size in MB (10**6 bytes) of a stored answer")
    parser.add_argument("--count", type=int, default=20, help="requests per phase")
    parser.add_argument("--clients", type=int, default=4, help="clients at a time")
    parser.add_argument("--pause", type=float, default=5.0, help="seconds of rest before the last sample")
    parser.add_argument("--smoke", action="store_true", help="4 requests of 1 MB per phase: check that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.mb, args.count, args.clients, args.pause = 1.0, 4, 2, 0.5
    upstream = UpstreamStub()
    results = {}
    try:
        print(f"{args.count} requests per phase, {args.clients} clients at a time, bodies of {args.mb:g} MB "
              f"(over-size: {args.mb + 2:g} MB)", flush=True)
        for mode in MODES:
            results[mode] = measure(mode, upstream, args, lambda line: print(line, flush=True))
    finally:
        upstream.stop()
    columns = ["before", "misses", "hits", "over-size", "coalesced", "pause"]
    print(f"\nRSS per worker, MiB: idle before, after each phase of {args.count} requests, after {args.pause:g} s "
          "of rest (in brackets: the peak during the phase)")
    print(f"{'allocator':10} {'worker':>6} " + " ".join(f"{c:>11}" for c in columns) + f" {'kept':>6}")
    for mode, table in results.items():
        for n, (_, row) in enumerate(sorted(table.items()), 1):
            cells = []
            for column in columns:
                rss, peak = row[column]
                cells.append(f"{rss:5.0f}" + (f" ({peak:3.0f})" if column not in ("before", "pause") else " " * 6))
            kept = row["pause"][0] - row["before"][0]
            print(f"{mode:10} {n:>6} " + " ".join(f"{c:>11}" for c in cells) + f" {kept:+6.0f}")
    for mode, meaning in MODES.items():
        print(f"  {mode}: {meaning}")
    print("  kept: RSS after the rest less RSS before")


if __name__ == "__main__":
    main()
