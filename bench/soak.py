"""Does anything grow that should not? A soak of 90% hits and 10% new misses on the default config.

`gunicorn wsgi:app` as a newcomer runs it (embedded Redis, in a temporary data folder), driven by a few
client threads for `--minutes`. Every `--every` seconds it samples the RSS and open file descriptors of
the master and of each worker, Redis' memory and its key count (cache entries apart from the rest), and
at the end prints the samples and each series' slope per minute (a least-squares fit). Flat RSS, fds and
non-cache keys are the goal; cache keys grow with the misses until entries expire or memory is full.

Run: python bench/soak.py [--minutes 10] [--every 30] [--clients 8] [--smoke]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import redis
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.ports import free_port, wait_for_port  # noqa: E402
from tests.support.processes import stop_group  # noqa: E402
from tests.support.upstream_stub import UpstreamStub  # noqa: E402


def start(data_dir: Path, upstream: str, workdir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = workdir / "soak.json"
    config.write_text(json.dumps({"domain_mappings": {"up": {"upstream": upstream}},
                                  "throttling": {"default_requests_per_hour": 10_000_000},
                                  "logging": {"level": "WARNING"}}))
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "BUDDY_SECURE_KEY")}
    env.update(BUDDY_CONFIG=str(config), BUDDY_DATA_DIR=str(data_dir))
    log = open(workdir / "gunicorn.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", f"127.0.0.1:{port}", "wsgi:app"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    wait_for_port(port, timeout=30, alive=lambda: process.poll() is None)
    return process, f"http://127.0.0.1:{port}"


def drive(base: str, stop: threading.Event, counts: dict[str, int], seed: int) -> None:
    rng, session = random.Random(seed), requests.Session()
    while not stop.is_set():
        if rng.random() < 0.9:
            url = f"{base}/up/warm/{rng.randrange(200)}"
        else:
            url = f"{base}/up/new/{seed}/{counts.setdefault(f'new{seed}', 0)}"
            counts[f"new{seed}"] += 1
        try:
            verdict = session.get(url, timeout=10).headers.get("X-Cache", "?")
        except requests.RequestException:
            verdict = "error"
        counts[verdict] = counts.get(verdict, 0) + 1


def sample(master: psutil.Process, client: redis.Redis, prefix: str = "buddy:") -> dict[str, float]:
    workers = master.children()
    out = {
        "master_rss_mb": master.memory_info().rss / 2**20,
        "master_fds": master.num_fds(),
        "worker_rss_mb": sum(w.memory_info().rss for w in workers) / max(1, len(workers)) / 2**20,
        "worker_fds": sum(w.num_fds() for w in workers if w.name() != "redis-server") / max(1, len(workers)),
        "redis_mb": client.info("memory")["used_memory"] / 2**20,
    }
    kinds: dict[str, int] = {}
    for key in client.scan_iter(count=1000):
        kind = key.decode(errors="replace").removeprefix(prefix).split(":", 1)[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    out["cache_keys"] = kinds.pop("cache", 0)
    out["other_keys"] = sum(kinds.values())
    if kinds and os.environ.get("SOAK_KINDS"):
        print("other keys by kind:", kinds, file=sys.stderr)
    return out


def slope(xs: list[float], ys: list[float]) -> float:
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread if spread else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--every", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="6 s, a sample every 2 s: check that the script runs")
    args = parser.parse_args()
    minutes, every = (0.1, 2.0) if args.smoke else (args.minutes, args.every)
    upstream = UpstreamStub()
    with tempfile.TemporaryDirectory() as tmp:
        process, base = start(Path(tmp) / "data", upstream.url, Path(tmp))
        stop = threading.Event()
        counts: dict[str, int] = {}
        try:
            master = psutil.Process(process.pid)
            client = redis.Redis.from_url(f"unix://{Path(tmp) / 'data' / 'redis.sock'}")
            for i in range(200):  # warm the hits
                requests.get(f"{base}/up/warm/{i}", timeout=10)
            threads = [threading.Thread(target=drive, args=(base, stop, counts, i), daemon=True)
                       for i in range(args.clients)]
            for t in threads:
                t.start()
            started, samples = time.monotonic(), []
            while True:
                at = (time.monotonic() - started) / 60
                samples.append((at, sample(master, client)))
                if at >= minutes:
                    break
                time.sleep(every)
            stop.set()
            for t in threads:
                t.join(15)
        finally:
            stop_group(process)
            upstream.stop()
    names = list(samples[0][1])
    print(f"{'minute':>7} " + " ".join(f"{n:>13}" for n in names))
    for at, values in samples:
        print(f"{at:7.2f} " + " ".join(f"{values[n]:13.2f}" for n in names))
    xs = [at for at, _ in samples]
    print(f"{'slope/min':>7} " + " ".join(f"{slope(xs, [v[n] for _, v in samples]):13.3f}" for n in names))
    total = sum(v for k, v in counts.items() if not k.startswith("new"))
    print(f"requests: {total} ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()) if not k.startswith('new'))})")


if __name__ == "__main__":
    main()
