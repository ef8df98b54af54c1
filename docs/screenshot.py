"""Make docs/dashboard.png: a real gunicorn proxy (embedded Redis, access key on) with three mappings in front of
a local stub upstream, a few minutes of mixed traffic, then the dashboard in headless Chromium.

    python docs/screenshot.py [--minutes 8] [--out docs/dashboard.png]

Needs /usr/bin/chromium (apt-get install chromium) and Playwright for Python (pip install -e ".[dev]").
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.processes import Gunicorn  # noqa: E402
from tests.support.upstream_stub import UpstreamStub  # noqa: E402

KEY = "screenshot-key-not-a-secret-0123456789"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def config(upstream: str) -> dict:
    return {
        "domain_mappings": {
            "wikidata": {"upstream": upstream, "max_requests_per_second": 5},
            "search": {"upstream": upstream, "max_requests_per_minute": 60, "cost_per_call": 0.005,
                       "cost_currency": "USD"},
            "conceptnet": {"upstream": upstream, "ttl_seconds": 90,
                           "stale_while_revalidate_seconds": 600},
        },
        "security": {"require_secure_key": True, "secure_key": KEY},
        "throttling": {"progressive_max_delay": 5},
        "logging": {"level": "WARNING"},
    }


def one_request(base: str, rng: random.Random) -> None:
    """Popular items come back often (a skewed choice), so the hit rate climbs as the cache warms."""
    mapping = rng.choices(["wikidata", "search", "conceptnet"], weights=[5, 2, 3])[0]
    item = int(rng.paretovariate(1.2)) % 400
    slow = {"wikidata": 80, "search": 350, "conceptnet": 40}[mapping]
    try:
        requests.get(f"{base}/{mapping}/item/{item}?sleep={slow}", headers={"X-API-Buddy-Key": KEY}, timeout=30)
    except requests.RequestException:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--out", default=str(ROOT / "docs" / "dashboard.png"))
    options = parser.parse_args()
    from playwright.sync_api import sync_playwright

    rng = random.Random(16)
    work = Path(tempfile.mkdtemp(prefix="buddy-screenshot-"))
    upstream = UpstreamStub()
    proxy = Gunicorn(work, config(upstream.url), {"BUDDY_DATA_DIR": str(work / "data")}, workers=2)
    try:
        proxy.wait_until_serving("/admin/health")
        until = time.monotonic() + options.minutes * 60
        with ThreadPoolExecutor(max_workers=8) as pool:
            while time.monotonic() < until:
                minute_rate = 2 + 3 * rng.random()  # requests per second, changing from one burst to the next
                for _ in range(int(minute_rate * 5)):
                    pool.submit(one_request, proxy.url, rng)
                time.sleep(5)
                if rng.random() < 0.08:  # now and then the paid API pushes back
                    pool.submit(requests.get, f"{proxy.url}/search/status/429?retry_after=30",
                                headers={"X-API-Buddy-Key": KEY}, timeout=30)
        requests.get(f"{proxy.url}/search/status/429?retry_after=30", headers={"X-API-Buddy-Key": KEY}, timeout=30)
        requests.get(f"{proxy.url}/conceptnet/status/503", headers={"X-API-Buddy-Key": KEY}, timeout=30)
        time.sleep(2)  # every worker flushes its counters
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                str(work / "profile"), executable_path="/usr/bin/chromium", headless=True, args=ARGS,
                viewport={"width": 1400, "height": 1000}, device_scale_factor=1,
            )
            page = context.new_page()
            page.goto(f"{proxy.url}/")
            page.fill("input[name=key]", KEY)
            page.click("button[type=submit]")
            page.wait_for_selector("#dashboard")
            page.screenshot(path=options.out, full_page=True)
            context.close()
        print(f"wrote {options.out}")
    finally:
        proxy.stop()
        upstream.stop()


if __name__ == "__main__":
    main()
