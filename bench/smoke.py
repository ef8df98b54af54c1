"""Every bench script, once, with tiny counts (`--smoke`): CI runs this so that none of them can rot unnoticed.

Nothing here is a measurement and nothing is asserted about speed; a script passes when it exits 0. Most of a
smoke run is waiting (servers starting, sleeps), so the scripts run four at a time (BENCH_SMOKE_JOBS), each on
its own free ports and temporary folders, the longest first so that none of them runs on alone at the end.

Run: python bench/smoke.py
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BENCH = Path(__file__).resolve().parent
NOT_SCRIPTS = {"smoke.py", "ceiling_app.py"}  # this one, and a WSGI app that hits.py serves
# The slowest smoke runs (each starts several proxies), started first; the others follow in alphabetical order.
LONGEST = ("tracking_spike.py", "warc.py", "memory.py", "soak.py", "hits.py", "slow_clients.py", "stalls.py")


def run(script: str) -> tuple[str, subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(BENCH / script), "--smoke"], cwd=BENCH.parent, capture_output=True,
                          text=True, timeout=300)
    return script, done, time.monotonic() - started


def main() -> int:
    scripts = sorted((path.name for path in BENCH.glob("*.py") if path.name not in NOT_SCRIPTS),
                     key=lambda name: (LONGEST.index(name) if name in LONGEST else len(LONGEST), name))
    started, failed = time.monotonic(), []
    with ThreadPoolExecutor(max_workers=int(os.environ.get("BENCH_SMOKE_JOBS", "4"))) as pool:
        for script, done, took in pool.map(run, scripts):  # in order, each once it (and those before it) ended
            verdict = "ok" if done.returncode == 0 else f"FAILED ({done.returncode})"
            print(f"{script:18} {verdict:12} {took:6.1f} s", flush=True)
            if done.returncode != 0:
                failed.append(script)
                print(done.stdout[-2000:], done.stderr[-4000:], sep="\n", file=sys.stderr)
    print(f"{len(scripts)} scripts in {time.monotonic() - started:.1f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
