"""The dashboard at /admin/: one server-rendered page (Jinja, autoescaped), a fragment its script re-fetches every
few seconds, and the login that turns the access key into a session cookie. Every figure comes from
MonitoringManager.get_all(), the same dictionary /admin/metrics answers."""
from __future__ import annotations

import threading
import time
import weakref
from typing import Any
from urllib.parse import unquote_plus

from flask import Blueprint, Response, current_app, make_response, redirect, render_template, request, url_for
from werkzeug.wrappers import Response as BaseResponse

from buddy import admin_auth
from buddy.access import LockedOut, Target, Unauthorized
from buddy.counters import COLUMNS, PER_MINUTE, Section, Unit
from buddy.errors import StoreUnavailable

bp = Blueprint("dashboard", __name__, static_folder="templates/assets", static_url_path="/admin/assets")
REFRESH_SECONDS = 5
RECENT_ERRORS_SHOWN = 10
CHART = {"width": 640, "height": 170, "left": 40, "right": 10, "top": 10, "bottom": 22}
PALETTE = ("#2e7d32", "#c62828", "#1565c0", "#6a1b9a", "#ef6c00", "#00838f")
# The chart's lines: every per-minute counter, as (field, label, colour).
SERIES = tuple((c.field, c.label, PALETTE[i % len(PALETTE)]) for i, c in enumerate(PER_MINUTE))
# Every page says where its parts may come from: this origin only, no inline script, no framing.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


@bp.after_request
def harden(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    if request.endpoint != "dashboard.static":
        response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/admin/")
def page() -> BaseResponse:
    """The dashboard; with access keys on and no session, the login form. A key given as ?key= becomes a session
    and the browser is sent on to the bare URL, so that the key stays in no address bar or Referer."""
    buddy = current_app.extensions["buddy"]
    try:
        how = admin_auth.authorize()
    except LockedOut as exc:
        return locked_page(exc)
    except Unauthorized:
        return login_page("wrong key" if _key_in_query() else None)
    if how in ("key", "cookie") and _key_in_query():  # signed in or not, the key leaves the address bar
        return admin_auth.start_session(redirect(url_for(".page"), 303), buddy.access.key())
    return make_response(render_template(
        "dashboard/page.html", view=build_view(), refresh_seconds=REFRESH_SECONDS, open=how == "open",
        signed_in=how == "cookie",
    ))


@bp.get("/admin/panel")
def panel() -> Response:
    """The live part of the page, re-fetched by the page's script."""
    admin_auth.authorize()
    return make_response(render_template("dashboard/panel.html", view=build_view()))


@bp.post("/admin/login")
def login() -> BaseResponse:
    buddy = current_app.extensions["buddy"]
    if not buddy.access.required:
        return redirect(url_for(".page"), 303)
    target = Target("admin", None, "", [("X-API-Buddy-Key", request.form.get("key", ""))])
    try:
        buddy.access.admit(target, set(), request.remote_addr or "unknown")  # counted when refused
    except LockedOut as exc:
        return locked_page(exc)
    except Unauthorized:
        return login_page("wrong key")
    return admin_auth.start_session(redirect(url_for(".page"), 303), buddy.access.key())


@bp.post("/admin/logout")
def logout() -> Response:
    admin_auth.deliberate("cookie")
    try:
        admin_auth.end_session()
    except StoreUnavailable:
        pass  # the session ends with its TTL; the cookie goes now
    response = make_response("", 204)
    response.delete_cookie(admin_auth.SESSION_COOKIE, path="/admin", httponly=True, samesite="Strict")
    return response


def login_page(error: str | None) -> Response:
    return make_response(render_template("dashboard/login.html", error=error), 401)


def locked_page(exc: LockedOut) -> Response:
    """The login form, refused for now: too many wrong keys came from this address."""
    response = make_response(render_template(
        "dashboard/login.html", error=f"Too many wrong keys from {exc.address}: try again in {exc.retry_after} s."
    ), 429)
    response.headers["Retry-After"] = str(exc.retry_after)
    return response


def _key_in_query() -> bool:
    """Does the query hold a `key=` item (as access.strip_key reads it)?"""
    query = request.environ.get("QUERY_STRING", "")
    return any(unquote_plus(item.partition("=")[0]) == "key" for item in query.split("&"))


_VIEW_LOCK = threading.Lock()
_VIEWS: "weakref.WeakKeyDictionary[Any, tuple[float, dict[str, Any]]]" = weakref.WeakKeyDictionary()
VIEW_MAX_AGE = 2.0  # seconds one process reuses a view: many open tabs cost one census, not one each


def build_view() -> dict[str, Any]:
    """The view, built at most once per VIEW_MAX_AGE per process (the threads that wait share it); an action
    taken through this process (clear, offline) drops it."""
    buddy = current_app.extensions["buddy"]
    with _VIEW_LOCK:
        kept = _VIEWS.get(buddy)
        if kept is not None and time.monotonic() - kept[0] < VIEW_MAX_AGE:
            return kept[1]
        view = _build_view()
        _VIEWS[buddy] = (time.monotonic(), view)
        return view


def forget_view() -> None:
    with _VIEW_LOCK:
        _VIEWS.pop(current_app.extensions["buddy"], None)


def _build_view() -> dict[str, Any]:
    """Everything the templates show: /admin/metrics' numbers, arranged per mapping, plus chart geometry."""
    buddy = current_app.extensions["buddy"]
    metrics = buddy.monitoring.get_all()
    cache, upstream, throttling = metrics["cache"], metrics["upstream"], metrics["throttling"]
    errors = [section["error"] for section in metrics.values() if "error" in section]
    mappings = []
    for name, domain in buddy.settings.domains.items():
        mappings.append({
            "name": name,
            "upstream": domain.upstream,
            "cache": cache.get("by_domain", {}).get(name),
            "figures": counter_figures(metrics, name),
            "entries": cache.get("entries_per_domain", {}).get(name),
            "size_bytes": cache.get("cache_size_per_domain", {}).get(name),
            "upstream_calls": upstream.get("by_domain", {}).get(name, {}).get("total_requests"),
            "throttling": throttle_view(throttling.get(name)),
        })
    health = buddy.monitoring.health()
    try:
        offline, offline_source = buddy.service.offline.state()
    except StoreUnavailable:
        offline, offline_source = health["offline"], "last known"
    proxy = metrics["proxy_health"]
    return {
        "now": time.time(),
        "errors": errors,
        "mappings": mappings,
        "columns": COLUMNS,
        "cache": cache,
        "upstream_calls": upstream.get("overall", {}).get("total_requests"),
        "requests": sum(m["cache"]["requests"] for m in mappings if m["cache"]),
        "chart": chart_view(metrics["timeline"]) if "error" not in metrics["timeline"] else None,
        "health": health,
        "database": metrics["database"],
        "embedded": buddy.embedded is not None,
        "proxy": proxy,
        "recent_errors": proxy.get("recent_errors", [])[:RECENT_ERRORS_SHOWN],
        "offline": offline,
        "offline_source": offline_source,
    }


def counter_figures(metrics: dict[str, Any], name: str) -> dict[str, Any]:
    """The counters of the table's COLUMNS for one mapping, by field, as /admin/metrics shows them (None where
    its section could not be read)."""
    per_mapping = {
        Section.CACHE: metrics["cache"].get("by_domain", {}).get(name) or {},
        Section.UPSTREAM: metrics["upstream"].get("by_domain", {}).get(name) or {},
        Section.THROTTLING: metrics["throttling"].get(name) or {},
    }
    return {c.field: per_mapping[c.section].get(c.name) for column in COLUMNS for c in column.counters}


def throttle_view(stats: dict[str, Any] | None) -> dict[str, Any] | None:
    """One mapping's windows as bars (use against limit, for each configured limit) and its penalty."""
    if stats is None:
        return None
    bars = []
    for limit_name, use_name, label in (("per_second", "last_second", "second"),
                                        ("per_minute", "last_minute", "minute"), ("per_hour", "last_hour", "hour")):
        limit, used = stats["limits"][limit_name], stats["window_use"][use_name]
        if limit:
            share = min(1.0, used / limit)
            bars.append({"label": label, "used": used, "limit": limit, "percent": round(share * 100, 1),
                         "level": "high" if share >= 0.9 else "mid" if share >= 0.7 else "low"})
    return {**stats, "bars": bars}


def chart_view(timeline: dict[str, Any]) -> dict[str, Any]:
    """Polylines for hits, misses and upstream calls per minute (all mappings), scaled into CHART's box."""
    width, height = CHART["width"], CHART["height"]
    left, right, top, bottom = CHART["left"], CHART["right"], CHART["top"], CHART["bottom"]
    totals = timeline["total"]
    peak = max([1, *(v for field, _, _ in SERIES for v in totals[field])])
    scale = nice_ceiling(peak)
    count = len(timeline["minute_starts"])
    step = (width - left - right) / max(1, count - 1)
    plot = height - top - bottom
    series = []
    for field, label, colour in SERIES:
        values = totals[field]
        points = " ".join(f"{left + i * step:.1f},{top + plot * (1 - v / scale):.1f}" for i, v in enumerate(values))
        series.append({"field": field, "label": label, "colour": colour, "points": points, "values": values,
                       "total": sum(values)})
    half = scale / 2
    return {**CHART, "scale": scale, "series": series, "minutes": count, "baseline": top + plot,
            "middle": top + plot / 2, "middle_label": f"{half:g}", "right_edge": width - right}


def nice_ceiling(value: float) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... that is at least value: a y-axis top that reads well."""
    magnitude = 1
    while True:
        for factor in (1, 2, 5):
            if factor * magnitude >= value:
                return factor * magnitude
        magnitude *= 10


FIGURE = (int, float)  # a figure to format; anything else (None, missing while Redis is away) shows as a dash


@bp.app_template_filter("count")
def count_filter(value: Any) -> str:
    return f"{value:,}" if isinstance(value, FIGURE) else "–"


@bp.app_template_filter("percent")
def percent_filter(value: Any) -> str:
    return f"{value * 100:.1f} %" if isinstance(value, FIGURE) else "–"


@bp.app_template_filter("size")
def size_filter(value: Any) -> str:
    if not isinstance(value, FIGURE):
        return "–"
    amount, unit = float(value), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if amount < 1024 or unit == "TiB":
            break
        amount /= 1024
    return f"{int(amount)} B" if unit == "B" else f"{amount:.1f} {unit}"


@bp.app_template_filter("duration")
def duration_filter(seconds: Any) -> str:
    if not isinstance(seconds, FIGURE):
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, hours, days = int(seconds // 60), int(seconds // 3600), int(seconds // 86400)
    if seconds < 3600:
        return f"{minutes} min {int(seconds % 60)} s"
    if seconds < 86400:
        return f"{hours} h {minutes % 60} min"
    return f"{days} d {hours % 24} h"


@bp.app_template_filter("figure")
def figure_filter(value: Any, unit: Unit) -> str:
    """A counter's figure as its unit reads: bytes as a size, (milli)seconds as a duration, else a count."""
    return {Unit.BYTES: size_filter, Unit.MS: duration_filter}.get(unit, count_filter)(value)


@bp.app_template_filter("money")
def money_filter(amount: Any, currency: str | None = None) -> str:
    if not isinstance(amount, FIGURE):
        return "–"
    text = f"{amount:,.2f}" if amount == 0 or amount >= 0.01 else f"{amount:.4f}"
    return f"{text} {currency}" if currency else text


@bp.app_template_filter("ago")
def ago_filter(when: Any, now: float) -> str:
    return f"{duration_filter(max(0.0, now - when))} ago" if isinstance(when, FIGURE) else "–"
