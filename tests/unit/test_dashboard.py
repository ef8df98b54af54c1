"""The dashboard at /admin/ on fakeredis: its figures are /admin/metrics' figures, and its safety rules hold
(login cookie, the action header, no key in any page, no CORS, everything escaped)."""
from __future__ import annotations

import fnmatch
import logging
import re
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from flask import Flask
from flask.testing import FlaskClient

from buddy import create_app, dashboard
from buddy.admin_auth import SESSION_COOKIE, session_token
from buddy.errors import ConfigError
from buddy.redis_keys import KEY_KINDS, RedisKeys
from buddy.settings import validate_config
from buddy.store.metrics import MINUTE_FIELDS, MINUTE_KEEP_SECONDS
from tests.support.upstream_stub import UpstreamStub


@pytest.fixture(autouse=True)
def fresh_views(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each render reads Redis again (the page reuses a view for 2 s; these tests change state in between)."""
    monkeypatch.setattr(dashboard, "VIEW_MAX_AGE", 0.0)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

KEY = "k3y-for-the-dashboard-tests-0123456789"
ACTION = {"X-Buddy-Action": "1"}


@pytest.fixture
def buddy_config(upstream: UpstreamStub) -> dict[str, Any]:
    return {
        "domain_mappings": {
            "up": {"upstream": upstream.url, "max_requests_per_minute": 100, "cost_per_call": 0.25,
                   "cost_currency": "EUR"},
            "other": {"upstream": upstream.url + "/other"},
        },
        "logging": {"enable_console": False},
    }


@pytest.fixture
def keyed(buddy_config: dict[str, Any], fake_redis: fakeredis.FakeRedis) -> Any:
    app = create_app({**buddy_config, "security": {"require_secure_key": True, "secure_key": KEY}},
                     redis_client=fake_redis, environ={})
    yield app
    app.extensions["buddy"].shutdown()


class Figures(HTMLParser):
    """Every element with data-figure: (mapping or "", figure) -> data-value; and the chart's series."""

    def __init__(self) -> None:
        super().__init__()
        self.mapping: list[str] = []
        self.rows: list[str | None] = []
        self.values: dict[tuple[str, str], str | None] = {}
        self.series: dict[str, list[int]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr":
            self.rows.append(a.get("data-mapping"))
        if "data-figure" in a:
            self.values[(self.rows[-1] or "" if self.rows else "", a["data-figure"] or "")] = a.get("data-value")
        if tag == "polyline" and a.get("data-series"):
            self.series[a["data-series"] or ""] = [int(v) for v in (a.get("data-values") or "").split(",")]

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr" and self.rows:
            self.rows.pop()


def figures(html: str) -> Figures:
    parser = Figures()
    parser.feed(html)
    return parser


def workload(client: FlaskClient) -> None:
    for _ in range(3):
        for i in range(4):
            client.get(f"/up/item/{i}")  # 4 misses, then 8 hits
    client.get("/other/a")
    client.get("/other/a")
    client.get("/up/status/503")


def flushed(app: Flask) -> Flask:
    app.extensions["buddy"].service.metrics.flush()
    return app


def number(text: str | None) -> Any:
    assert text is not None
    return None if text == "None" else float(text)


def test_every_figure_on_the_page_is_the_one_admin_metrics_gives(app: Flask, client: FlaskClient) -> None:
    workload(client)
    flushed(app)
    metrics = client.get("/admin/metrics").json
    for html in (client.get("/admin/").get_data(as_text=True), client.get("/admin/panel").get_data(as_text=True)):
        shown = figures(html)
        cache, upstream = metrics["cache"], metrics["upstream"]
        for name in ("up", "other"):
            mine = cache["by_domain"][name]
            for figure in ("requests", "hit_rate", "hits", "misses", "coalesced", "upstream_calls_avoided",
                           "bytes_saved", "seconds_saved", "money_saved", "stale_answers", "background_refreshes"):
                assert number(shown.values[(name, figure)]) == mine[figure], (name, figure)
            assert number(shown.values[(name, "upstream_calls")]) == upstream["by_domain"][name]["total_requests"]
            assert number(shown.values[(name, "entries")]) == cache["entries_per_domain"][name]
            throttling = metrics["throttling"][name]
            for figure in ("penalty_level", "violations"):
                assert number(shown.values[(name, figure)]) == throttling[figure]
            # The 503's pause runs down between the two reads: the page, read later, shows at most as much.
            assert 0 <= number(shown.values[(name, "current_delay_seconds")]) <= throttling["current_delay_seconds"]
        assert number(shown.values[("", "total-requests")]) == sum(d["requests"] for d in cache["by_domain"].values())
        assert number(shown.values[("", "total-hit-rate")]) == cache["hit_rate"]
        assert number(shown.values[("", "total-upstream-calls")]) == upstream["overall"]["total_requests"]
        assert number(shown.values[("", "total-avoided")]) == cache["upstream_calls_avoided"]
        assert number(shown.values[("", "total-entries")]) == cache["total_entries"]
        assert shown.series == {field: metrics["timeline"]["total"][field] for field in MINUTE_FIELDS}
        for field in MINUTE_FIELDS:
            assert number(shown.values[("", f"hour-{field}")]) == sum(metrics["timeline"]["total"][field])
    # ... and the figures are right: 4 misses then 8 hits on "up", plus one 503 miss; 1 miss, 1 hit on "other".
    up = metrics["cache"]["by_domain"]["up"]
    assert (up["requests"], up["hits"], up["misses"], up["upstream_calls_avoided"]) == (13, 8, 5, 8)
    assert up["money_saved"] == 8 * 0.25 and up["cost_currency"] == "EUR"
    assert metrics["cache"]["by_domain"]["other"]["money_saved"] is None
    assert metrics["cache"]["money_saved"] == {"EUR": 2.0}
    assert metrics["timeline"]["total"]["hits"][-1] == 9 and metrics["timeline"]["total"]["misses"][-1] == 6
    assert metrics["timeline"]["total"]["upstream_requests"][-1] == 6
    assert metrics["timeline"]["by_domain"]["up"]["upstream_requests"][-1] == 5


def test_the_last_429_or_503_and_its_pause_are_shown_per_mapping(app: Flask, client: FlaskClient) -> None:
    client.get("/up/status/429?retry_after=7")
    flushed(app)
    throttling = client.get("/admin/metrics").json["throttling"]
    assert throttling["up"]["last_pushed_back"]["status"] == "429"
    assert throttling["up"]["penalty_level"] == 1 and throttling["up"]["penalty_pause_seconds"] == 7.0
    assert throttling["other"]["last_pushed_back"] is None and throttling["other"]["penalty_since"] is None
    html = client.get("/admin/panel").get_data(as_text=True)
    assert "429, " in html and "pause set: 7.0 s" in html
    metrics = app.extensions["buddy"].service.metrics
    metrics.error("other", "503", "upstream 'other' answered 503", retry_after="120")
    metrics.flush()
    assert client.get("/admin/metrics").json["throttling"]["other"]["last_pushed_back"]["retry_after"] == "120"
    assert "Retry-After: 120" in client.get("/admin/panel").get_data(as_text=True)


def test_per_minute_counters_are_declared_bounded_and_expire(app: Flask, client: FlaskClient, fake_redis) -> None:
    workload(client)
    flushed(app)
    keys, kinds = RedisKeys(), {kind.name: kind for kind in KEY_KINDS}
    found = [key.decode() for key in fake_redis.scan_iter(match="buddy:minutes:*")]
    assert sorted(found) == sorted(keys.minute_counts(name, int(time.time() // 60)) for name in ("up", "other"))
    assert kinds["minutes"].expires
    for key in found:
        assert {f.decode() for f in fake_redis.hkeys(key)} <= set(MINUTE_FIELDS)
        assert 0 < fake_redis.ttl(key) <= MINUTE_KEEP_SECONDS + 60


def test_slash_alone_redirects_to_the_dashboard_and_drops_the_query(client: FlaskClient, upstream) -> None:
    for target in ("/", "/?key=something"):
        response = client.get(target)
        assert response.status_code == 302 and response.headers["Location"] == "/admin/"
    assert client.get("/admin").status_code == 200
    assert client.post("/").status_code == 404  # not a page to look at: still the proxy's unknown-domain answer
    assert upstream.count() == 0


def test_without_a_key_the_page_says_anyone_can_use_it(client: FlaskClient) -> None:
    html = client.get("/admin/").get_data(as_text=True)
    assert "anyone who" in html and "can reach this port" in html


def test_the_login_sets_a_strict_http_only_cookie_derived_from_the_key(keyed: Flask, caplog) -> None:
    client = keyed.test_client()
    page = client.get("/admin/")
    assert page.status_code == 401 and 'type="password"' in page.get_data(as_text=True)
    assert "data-figure" not in page.get_data(as_text=True)
    with caplog.at_level(logging.WARNING, logger="buddy.security"):
        wrong = client.post("/admin/login", data={"key": "guess-guess-guess-guess"})
    assert wrong.status_code == 401 and "Set-Cookie" not in wrong.headers
    assert "refused 1 request from 127.0.0.1: missing or wrong access key" in caplog.text  # logged, counted
    right = client.post("/admin/login", data={"key": KEY})
    assert right.status_code == 303 and right.headers["Location"] == "/admin/"
    cookie = right.headers["Set-Cookie"]
    assert f"{SESSION_COOKIE}=" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Path=/admin" in cookie and KEY not in cookie
    value = cookie.split(";")[0].split("=", 1)[1]
    assert re.fullmatch(r"\d+\.[A-Za-z0-9_-]{24}\.[0-9a-f]{64}", value)
    for path in ("/admin/", "/admin/panel", "/admin/metrics", "/admin/health"):
        response = client.get(path)
        assert response.status_code == 200, path
        assert KEY not in response.get_data(as_text=True)
    assert client.get("/up/x").status_code == 401  # the cookie opens the admin routes only, never the proxy


def test_a_key_in_the_address_becomes_a_session_and_leaves_the_address(keyed: Flask) -> None:
    client = keyed.test_client()
    response = client.get(f"/admin/?key={KEY}")
    assert response.status_code == 303 and response.headers["Location"] == "/admin/"
    assert KEY not in response.get_data(as_text=True) and KEY not in response.headers["Set-Cookie"]
    assert client.get("/admin/").status_code == 200
    assert keyed.test_client().get("/admin/?key=wrong-wrong-wrong-wrong").status_code == 401


def test_a_forged_expired_foreign_or_signed_out_cookie_opens_nothing(keyed: Flask) -> None:
    now = int(time.time())
    signed_in = keyed.test_client()
    signed_in.post("/admin/login", data={"key": KEY})
    good = signed_in.get_cookie(SESSION_COOKIE, path="/admin").value
    session = good.split(".")[1]
    assert signed_in.get("/admin/panel").status_code == 200
    tampered = good[:-1] + ("1" if good.endswith("0") else "0")
    signed_in.post("/admin/logout", headers=ACTION)
    for value in (session_token("another-key-of-16-chars", now + 60, session), session_token(KEY, now - 1, session),
                  tampered, f"{now + 60}.", KEY, "",
                  good,  # signed out: closed in Redis, however often the browser (or a thief) sends it again
                  session_token(KEY, now + 60, "a" * 24),  # signed, but no such session was ever opened
                  session_token(KEY, now + 10 * 86400, session)):  # signed, but longer than any session lasts
        client = keyed.test_client()
        client.set_cookie(SESSION_COOKIE, value, path="/admin")
        assert client.get("/admin/panel").status_code == 401, value
        assert client.delete("/admin/cache", headers=ACTION).status_code == 401


def test_browser_actions_need_the_action_header(keyed: Flask, upstream) -> None:
    client = keyed.test_client()
    client.post("/admin/login", data={"key": KEY})
    client.get("/up/a", headers={"X-API-Buddy-Key": KEY})
    refused = client.delete("/admin/cache/up")  # what a cross-site page would send, cookie and all
    assert refused.status_code == 403 and "X-Buddy-Action" in refused.json["message"]
    assert client.post("/admin/offline/on").status_code == 403
    assert client.post("/admin/logout").status_code == 403
    buddy = keyed.extensions["buddy"]
    assert buddy.service.offline.state()[0] is False
    assert client.get("/up/a", headers={"X-API-Buddy-Key": KEY}).headers["X-Cache"] == "HIT"
    assert client.delete("/admin/cache/up", headers=ACTION).json == {"cleared": 1, "by_domain": {"up": 1}}
    assert client.post("/admin/offline/on", headers=ACTION).json == {"offline": True,
                                                                     "source": "switched at run time"}
    assert client.post("/admin/offline/reset", headers=ACTION).json == {"offline": False, "source": "configured"}
    out = client.post("/admin/logout", headers=ACTION)
    assert out.status_code == 204 and f"{SESSION_COOKIE}=;" in out.headers["Set-Cookie"]
    # A script that sends the key itself (curl, the CLI) is no browser: DELETE works as before.
    assert keyed.test_client().delete("/admin/cache", headers={"X-API-Buddy-Key": KEY}).status_code == 200


def test_without_a_key_a_cross_site_form_still_cannot_act(client: FlaskClient, app: Flask) -> None:
    assert client.post("/admin/offline/on", data={"x": "1"}).status_code == 403
    assert app.extensions["buddy"].service.offline.state()[0] is False
    assert client.post("/admin/offline/on", headers=ACTION).json["offline"] is True


def test_no_get_changes_state_and_no_route_grants_cors(app: Flask, client: FlaskClient) -> None:
    client.get("/up/a")
    for path in ("/admin/offline/on", "/admin/cache/up", "/admin/logout", "/admin/login"):
        assert client.get(path).status_code in (404, 405), path
    assert app.extensions["buddy"].service.offline.state()[0] is False
    assert client.get("/up/a").headers["X-Cache"] == "HIT"
    origin = {"Origin": "https://evil.example"}
    preflight = client.options("/admin/cache/up", headers={**origin, "Access-Control-Request-Method": "DELETE",
                                                           "Access-Control-Request-Headers": "x-buddy-action"})
    for response in (preflight, client.get("/admin/metrics", headers=origin), client.get("/admin/", headers=origin)):
        assert not any(name.lower().startswith("access-control-") for name in response.headers.keys())


def test_pages_forbid_framing_inline_script_and_caching(client: FlaskClient) -> None:
    for path in ("/admin/", "/admin/panel"):
        headers = client.get(path).headers
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
        assert headers["X-Frame-Options"] == "DENY" and headers["Cache-Control"] == "no-store"
        assert headers["Referrer-Policy"] == "no-referrer"
    html = client.get("/admin/").get_data(as_text=True)
    assert not re.search(r"<script(?![^>]*\bsrc=)", html)  # no inline script: the CSP would block it anyway
    assert client.get("/admin/assets/dashboard.js").status_code == 200


def test_upstream_text_is_escaped(buddy_config: dict[str, Any], fake_redis, upstream) -> None:
    buddy_config["domain_mappings"]["other"]["upstream"] = upstream.url + "/x<script>alert(2)</script>"
    app = create_app(buddy_config, redis_client=fake_redis, environ={})
    try:
        app.extensions["buddy"].service.metrics.error("up", "502", "<img src=x onerror=alert(1)> & <script>")
        flushed(app)
        html = app.test_client().get("/admin/").get_data(as_text=True)
        assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt; &amp; &lt;script&gt;" in html
        assert "<script>alert(2)" not in html and "&lt;script&gt;alert(2)" in html
    finally:
        app.extensions["buddy"].shutdown()


def test_the_page_still_answers_while_redis_is_down(app: Flask, client: FlaskClient, redis_server_fake) -> None:
    client.get("/up/a")
    flushed(app)
    redis_server_fake.connected = False
    response = client.get("/admin/")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert "Redis unavailable" in html and "degraded" in html


def test_cost_settings_are_validated_by_name() -> None:
    def problems(**spec: Any) -> list[str]:
        try:
            validate_config({"domain_mappings": {"paid": {"upstream": "https://api.example", **spec}}})
        except ConfigError as exc:
            return exc.problems
        return []

    assert problems(cost_per_call=0, cost_currency="USD") == []
    bad_cost = "domain_mappings.paid.cost_per_call: must be 0 or a positive number up to 1e+06"
    assert problems(cost_per_call=-0.5) == problems(cost_per_call="lots") == problems(cost_per_call=1e308) == [bad_cost]
    assert problems(cost_currency=3) == ["domain_mappings.paid.cost_currency: must be a string"]
    assert problems(cost_currency="US dollars")[0].startswith("domain_mappings.paid.cost_currency: must be a short")
    settings = validate_config({"domain_mappings": {"paid": {"upstream": "https://api.example", "cost_per_call": 0.01,
                                                             "cost_currency": "USD"}}})
    assert (settings.domains["paid"].cost_per_call, settings.domains["paid"].cost_currency) == (0.01, "USD")


def test_every_template_and_asset_ships_in_the_wheel() -> None:
    root = Path(__file__).resolve().parents[2]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["buddy"]
    shipped = [p.relative_to(root / "buddy").as_posix() for p in (root / "buddy" / "templates").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts]
    assert {"templates/dashboard/page.html", "templates/assets/dashboard.js"} <= set(shipped)
    for path in shipped:
        assert any(fnmatch.fnmatch(path, glob) and path.count("/") == glob.count("/") for glob in globs), path


@pytest.mark.filterwarnings("ignore:The 'buddy_dashboard' cookie is too large")  # the forged one, on purpose
def test_the_session_cookie_survives_no_tampering_and_the_key_never_stays_in_the_address_bar(
    upstream: UpstreamStub, fake_redis: fakeredis.FakeRedis
) -> None:
    app = create_app({"domain_mappings": {"up": {"upstream": upstream.url}}, "logging": {"enable_console": False},
                      "security": {"require_secure_key": True, "secure_key": "k" * 32}}, redis_client=fake_redis)
    client = app.test_client()
    for forged in ("\u00b2.abc", "9" * 4400 + ".abc", ".", "12.", "-5.x"):
        client.set_cookie(SESSION_COOKIE, forged, path="/admin")
        assert client.get("/admin/health").status_code == 401
    client.post("/admin/login", data={"key": "k" * 32})
    signed_in = client.get("/admin/?key=" + "k" * 32)
    assert signed_in.status_code == 303 and "key" not in signed_in.headers["Location"]


def test_a_page_served_through_the_proxy_cannot_reach_the_admin_routes(client: FlaskClient) -> None:
    """An upstream's HTML shares the dashboard's origin: it is sandboxed (its own, opaque origin)."""
    assert client.get("/up/page?h=Content-Type:text/html").headers["Content-Security-Policy"] == "sandbox"
    assert "Content-Security-Policy" not in client.get("/up/data").headers  # JSON is left alone


def test_a_name_no_attacker_can_control_is_needed_for_every_route_and_admin_hosts_still_counts(
        upstream: UpstreamStub, fake_redis: fakeredis.FakeRedis) -> None:
    """A page rebound to the proxy under its own name is refused before any admin route runs (buddy.hosts);
    a configuration with the older security.admin_hosts still loads, its names accepted."""
    app = create_app({"domain_mappings": {"up": {"upstream": upstream.url}}, "logging": {"enable_console": False},
                      "security": {"admin_hosts": ["devbox.internal"]}}, redis_client=fake_redis)
    client, action = app.test_client(), {"X-Buddy-Action": "1"}
    rebound = client.post("/admin/offline/on", headers={**action, "Origin": "http://rebind.example:8080",
                                                        "Host": "rebind.example:8080"})
    assert rebound.status_code == 421 and rebound.json["setting"] == "server.allowed_hosts"
    for host in ("127.0.0.1:8080", "[::1]:8080", "localhost:8080", "devbox.internal:8080"):
        assert client.post("/admin/offline/off", headers={**action, "Origin": f"http://{host}", "Host": host}
                           ).status_code == 200
    assert client.delete("/admin/cache", headers={"Host": "devbox-by-another-name"}).status_code == 421
    assert app.extensions["buddy"].service.offline.state() == (False, "switched at run time")


def test_many_open_tabs_share_one_view_per_process(client: FlaskClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dashboard, "VIEW_MAX_AGE", 60.0)
    censuses = []
    cache = client.application.extensions["buddy"].service.cache
    real = cache._take_census
    monkeypatch.setattr(cache, "_take_census", lambda: censuses.append(1) or real())
    for _ in range(5):
        assert client.get("/admin/panel").status_code == 200
    assert len(censuses) == 1
    client.delete("/admin/cache/up")  # an action drops the view
    client.get("/admin/panel")
    assert len(censuses) == 2
