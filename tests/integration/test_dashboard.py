"""The dashboard in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright) against real
gunicorn workers on a real Redis. Without /usr/bin/chromium or Playwright, this one test is skipped."""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

import pytest
import requests

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "dashboard-browser-test-key-0123456789"
AS_ADMIN = {"X-API-Buddy-Key": KEY}


def need_a_browser() -> None:
    if not CHROMIUM.exists():
        pytest.skip("the dashboard's browser test needs Chromium at /usr/bin/chromium: apt-get install chromium")
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("the dashboard's browser test needs Playwright for Python: pip install -e '.[dev]' "
                    "(it drives /usr/bin/chromium; `playwright install` is not needed)")


def settled(url: str, hits: int, misses: int) -> dict[str, Any]:
    """Workers flush their counters once a second: read /admin/metrics until every worker's share landed."""
    deadline = time.monotonic() + 10
    while True:
        report = requests.get(f"{url}/admin/metrics", headers=AS_ADMIN, timeout=10).json()
        cache = report["cache"]
        if (cache["hit_count"], cache["miss_count"]) == (hits, misses) or time.monotonic() > deadline:
            return report
        time.sleep(0.1)


def test_the_page_shows_the_proxys_figures_and_clears_one_mapping(gunicorn, redis_url, upstream, tmp_path) -> None:
    need_a_browser()
    from playwright.sync_api import expect, sync_playwright

    config = {
        "domain_mappings": {"up": {"upstream": upstream.url, "cost_per_call": 0.01, "cost_currency": "USD"},
                            "other": {"upstream": upstream.url + "/other"}},
        "security": {"require_secure_key": True, "secure_key": KEY},
    }
    proxy = gunicorn(config, env={"REDIS_URL": redis_url}, workers=2)
    with requests.Session() as session:
        for _ in range(3):  # 10 misses, then 20 hits
            for i in range(10):
                assert session.get(f"{proxy.url}/up/item/{i}", headers=AS_ADMIN, timeout=10).status_code == 200
        for _ in range(2):  # and one miss, one hit on the other mapping
            session.get(f"{proxy.url}/other/a", headers=AS_ADMIN, timeout=10)
    metrics = settled(proxy.url, hits=21, misses=11)
    up = metrics["cache"]["by_domain"]["up"]
    assert (up["misses"], up["hits"], metrics["cache"]["entries_per_domain"]["up"]) == (10, 20, 10)

    problems: list[str] = []
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            page = context.new_page()
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
            page.goto(f"{proxy.url}/")  # `/` leads to /admin/, which asks for the key
            assert page.url == f"{proxy.url}/admin/" and page.locator("input[type=password]").is_visible()
            problems.clear()  # the sign-in page answers 401, which Chromium reports on the console
            page.fill("input[name=key]", KEY)
            page.click("button[type=submit]")
            page.wait_for_selector("#dashboard")
            assert page.url == f"{proxy.url}/admin/"
            cookie = next(c for c in context.cookies() if c["name"] == "buddy_dashboard")
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and KEY not in cookie["value"]

            def shown(mapping: str, figure: str) -> str:
                return page.locator(f'#panel tr[data-mapping="{mapping}"] [data-figure="{figure}"]').first.inner_text()

            assert (shown("up", "requests"), shown("up", "misses"), shown("up", "hits")) == ("30", "10", "20")
            for name in ("up", "other"):
                mine = metrics["cache"]["by_domain"][name]
                assert shown(name, "requests") == str(mine["requests"])
                assert shown(name, "hits") == str(mine["hits"]) and shown(name, "misses") == str(mine["misses"])
                assert shown(name, "hit_rate") == f"{mine['hit_rate'] * 100:.1f} %"
                assert shown(name, "upstream_calls_avoided") == str(mine["upstream_calls_avoided"])
                assert shown(name, "upstream_calls") == str(metrics["upstream"]["by_domain"][name]["total_requests"])
                assert shown(name, "entries") == str(metrics["cache"]["entries_per_domain"][name])
            assert shown("up", "money_saved") == "0.20 USD" and shown("other", "money_saved") == "–"
            assert page.locator('[data-figure="total-requests"]').inner_text() == "32"
            assert page.locator('[data-figure="hour-hits"]').inner_text() == "21"
            assert KEY not in page.content()

            page.once("dialog", lambda dialog: dialog.accept())
            page.click('#panel tr[data-mapping="up"] button[data-action="clear"]')
            expect(page.locator('#panel tr[data-mapping="up"] [data-figure="entries"]')).to_have_text("0",
                                                                                                      timeout=20_000)
            assert shown("other", "entries") == "1"
            assert "cleared 10 entries of up" in page.locator("#status").inner_text()
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        finally:
            context.close()
    assert problems == []
    after = requests.get(f"{proxy.url}/admin/metrics", headers=AS_ADMIN, timeout=10).json()
    assert after["cache"]["entries_per_domain"] == {"up": 0, "other": 1}
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
