"""Operations over HTTP: health, JSON metrics, Prometheus text, and clearing the cache."""
from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST

from buddy.access import Target
from buddy.prometheus import exposition
from buddy.views import NAMESPACE

bp = Blueprint("admin", __name__)


@bp.before_request
def require_key() -> None:
    """The admin routes need the access key whenever the proxy does (header, bearer or ?key=)."""
    buddy = current_app.extensions["buddy"]
    target = Target("admin", None, request.environ.get("QUERY_STRING", ""), list(request.headers.items()))
    buddy.access.admit(target, set(), request.remote_addr or "unknown")


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
    return jsonify(cleared=sum(cleared.values()), by_domain=cleared)


@bp.route("/admin", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
@bp.route("/admin/<path:_>", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def not_an_admin_route(_: str = "") -> Response:
    response = jsonify(error="not found", message="admin routes: GET /admin/health, GET /admin/metrics, "
                       "GET /metrics, DELETE /admin/cache[/<domain>][?namespace=NAME]")
    response.status_code = 404
    return response
