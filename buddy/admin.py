"""Operations over HTTP: health, JSON metrics, Prometheus text, clearing the cache, the offline switch (who may
use them: buddy.admin_auth)."""
from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST

from buddy import dashboard
from buddy.admin_auth import authorize, deliberate
from buddy.errors import StoreUnavailable
from buddy.prometheus import exposition
from buddy.views import NAMESPACE

bp = Blueprint("admin", __name__)
OFFLINE_STATES = ("on", "off", "reset")


@bp.before_request
def require_key() -> None:
    """The admin routes need the access key whenever the proxy does (header, bearer, ?key= or the dashboard's
    cookie), and browser actions need ACTION_HEADER."""
    deliberate(authorize())


@bp.get("/admin/health")
def health() -> Response:
    report = current_app.extensions["buddy"].monitoring.health()
    response = jsonify(report)
    response.status_code = 200 if report["status"] == "ok" else 503
    return response


@bp.get("/admin/metrics")
def metrics() -> Response:
    return jsonify(current_app.extensions["buddy"].monitoring.get_all())


@bp.get("/metrics")
def prometheus() -> Response:
    return Response(exposition(current_app.extensions["buddy"].monitoring), content_type=CONTENT_TYPE_LATEST)


@bp.delete("/admin/cache")
@bp.delete("/admin/cache/<domain>")
def clear(domain: str | None = None) -> Response:
    buddy = current_app.extensions["buddy"]
    if domain is not None and domain not in buddy.settings.domains:
        response = jsonify(error="unknown domain", domain=domain, configured=sorted(buddy.settings.domains))
        response.status_code = 404
        return response
    namespace = request.args.get("namespace")
    if namespace is not None and not NAMESPACE.fullmatch(namespace):
        response = jsonify(error="bad namespace", message="namespace: 1 to 64 letters, digits, '.', '_' or '-'")
        response.status_code = 400
        return response
    domains = [domain] if domain else list(buddy.settings.domains)
    cleared = {name: buddy.service.cache.clear(name, namespace=namespace) for name in domains}
    _changed()
    return jsonify(cleared=sum(cleared.values()), by_domain=cleared)


def _changed() -> None:
    dashboard.forget_view()  # the next page shows what the action did


@bp.post("/admin/offline/<state>")
def offline(state: str) -> Response:
    """The run-time offline switch, as `buddy offline on|off|reset`: every worker and host follows within 1 s."""
    if state not in OFFLINE_STATES:
        response = jsonify(error="not found", message="POST /admin/offline/on, /off or /reset")
        response.status_code = 404
        return response
    switch = current_app.extensions["buddy"].service.offline
    try:
        if state == "reset":
            switch.reset()
        else:
            switch.set(state == "on")
        on, source = switch.state()
        _changed()
    except StoreUnavailable:
        response = jsonify(error="redis unavailable", message="the switch lives in Redis, which cannot be reached")
        response.status_code = 503
        return response
    return jsonify(offline=on, source=source)


@bp.route("/admin/<path:_>", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def not_an_admin_route(_: str = "") -> Response:
    response = jsonify(error="not found", message="admin routes: GET /admin/ (the dashboard), GET /admin/health, "
                       "GET /admin/metrics, GET /metrics, DELETE /admin/cache[/<domain>][?namespace=NAME], "
                       "POST /admin/offline/on|off|reset")
    response.status_code = 404
    return response
