"""Does `buddy export` / `buddy import` stream? Peak memory and speed as the cache slice grows.

For each slice size, a fresh redis-server (the bundled binary) is filled with entries of --body-kb bytes of
incompressible body, stored as the proxy stores them (ResponseCache.put, with their request); then
`flask buddy export -o slice.warc.gz` and, after a clear, `flask buddy import slice.warc.gz` run as real processes,
their resident memory sampled every 20 ms. A streaming command's peak stays flat as the slice grows; one that held
the slice would grow with it. The baseline row is `flask buddy stats` (the same app, no work).

Run from the repo root: python bench/warc.py [--sizes 64,512] [--body-kb 16]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from buddy import policy  # noqa: E402
from buddy.forwarding import build_url  # noqa: E402
from buddy.messages import ProxyRequest, ProxyResult  # noqa: E402
from buddy.redis_keys import RedisKeys  # noqa: E402
from buddy.settings import load_settings  # noqa: E402
from buddy.store.guard import StoreGuard  # noqa: E402
from buddy.store.response_cache import ResponseCache  # noqa: E402
from tests.support.processes import RedisServer  # noqa: E402

UPSTREAM = "https://api.example.org"


def fill(url: str, megabytes: int, body_kb: int) -> int:
    """Store entries worth `megabytes` of bodies the way the proxy stores a fetched answer; how many."""
    import redis

    client = redis.Redis.from_url(url)
    settings = load_settings({"domain_mappings": {"up": {"upstream": UPSTREAM}}}, {})
    domain = settings.domains["up"]
    cache = ResponseCache(client, StoreGuard(probe=client.ping), RedisKeys())
    count = megabytes * 1024 // body_kb
    now = time.time()
    for i in range(count):
        path, headers = f"/items/{i}", [("Accept", "application/json")]
        request = ProxyRequest(domain, "GET", path, "format=json", headers, b"", dict(headers))
        body = os.urandom(body_kb * 1024)  # incompressible: Redis and the file hold every byte
        kept = policy.stored_request(request, build_url(domain, path, "format=json"))
        entry = ProxyResult(200, "OK", [("Content-Type", "application/octet-stream")], body, stored_at=now,
                            fresh_for=86400, request=kept)
        cache.put(policy.entry_for(request), entry, policy.kept_for(domain, 86400))
    client.close()
    return count


def run(args: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(seconds, peak RSS in MB, stdout) of `flask buddy ARGS`, its memory sampled every 20 ms."""
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "flask", "buddy", *args], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    watched, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    out = process.communicate()[0]
    if process.returncode != 0:
        raise SystemExit(f"flask buddy {' '.join(args)} failed ({process.returncode}): {out}")
    return time.monotonic() - started, peak / 1e6, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,512", help="slice sizes in MB of bodies, comma-separated")
    parser.add_argument("--body-kb", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="tiny counts (bench/smoke.py): check that it runs")
    options = parser.parse_args()
    if options.smoke:
        options.sizes, options.body_kb = "2", 4
    rows = [("slice", "entries", "command", "seconds", "MB/s", "peak RSS MB", "file MB")]
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        config = work / "config.json"
        config.write_text(json.dumps({"domain_mappings": {"up": {"upstream": UPSTREAM}}}))
        for megabytes in (int(size) for size in options.sizes.split(",")):
            server = RedisServer(work)
            try:
                env = {**os.environ, "REDIS_URL": server.url, "BUDDY_CONFIG": str(config)}
                count = fill(server.url, megabytes, options.body_kb)
                seconds, peak, _ = run(["stats"], env)
                rows.append((f"{megabytes} MB", str(count), "stats (baseline)", f"{seconds:.1f}", "", f"{peak:.0f}",
                             ""))
                archive = work / "slice.warc.gz"
                seconds, peak, out = run(["export", "-o", str(archive)], env)
                assert f"exported {count} entries" in out, out
                size = archive.stat().st_size / 1e6
                rows.append(("", "", "export", f"{seconds:.1f}", f"{megabytes / seconds:.0f}", f"{peak:.0f}",
                             f"{size:.0f}"))
                server.client().flushall()
                seconds, peak, out = run(["import", str(archive)], env)
                assert f"imported {count} entries" in out, out
                rows.append(("", "", "import", f"{seconds:.1f}", f"{megabytes / seconds:.0f}", f"{peak:.0f}", ""))
                archive.unlink()
            finally:
                server.stop()
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
