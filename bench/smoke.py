"""Every bench script, once, with tiny counts: CI runs this so that none of them can rot unnoticed.

Nothing here is a measurement and nothing is asserted about speed; a script passes when it exits 0.

Run: python bench/smoke.py
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RUNS = {
    "codec_choice.py": [],
    "hits.py": ["--seconds", "0.5", "--rounds", "1", "--workers", "1", "--threads", "4", "--clients", "2",
                "--procs", "1"],
    "parked.py": ["--classes", "gthread", "--threads", "8", "--parked", "4", "--burst", "4"],
    "throttle.py": ["--calls", "200", "--history", "100", "--rate", "5", "--clients", "4", "--requests", "10",
                    "--seconds", "3"],
    "slow_clients.py": ["--classes", "default", "--seconds", "1", "--clients", "20"],
    "redis_memory.py": ["--entries", "300", "--maxmemory", "2mb", "--rounds", "1"],
    "stalls.py": ["--smoke"],
    "soak.py": ["--smoke"],
    "warc.py": ["--sizes", "2", "--body-kb", "4"],
    "misses.py": ["--seconds", "0.5", "--rounds", "1", "--workers", "1", "--threads", "4", "--clients", "2",
                  "--procs", "1", "--single", "20"],
}


def main() -> int:
    listed = {path.name for path in BENCH.glob("*.py")} - {"smoke.py", "ceiling_app.py"}
    missing = listed - set(RUNS)
    if missing:
        print(f"bench/smoke.py: no smoke run for {', '.join(sorted(missing))}", file=sys.stderr)
        return 1
    failed = []
    for script, args in RUNS.items():
        started = time.monotonic()
        run = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=BENCH.parent, capture_output=True,
                             text=True, timeout=300)
        took = time.monotonic() - started
        verdict = "ok" if run.returncode == 0 else f"FAILED ({run.returncode})"
        print(f"{script:18} {verdict:12} {took:6.1f} s", flush=True)
        if run.returncode != 0:
            failed.append(script)
            print(run.stdout[-2000:], run.stderr[-4000:], sep="\n", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
