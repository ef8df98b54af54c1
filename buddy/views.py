"""The proxy blueprint: flask.request -> ProxyRequest -> service -> flask.Response, nothing more."""
from __future__ import annotations

from urllib.parse import quote, unquote

from flask import Blueprint, Response, current_app, jsonify, request

from buddy.errors import BadProxyRequest
from buddy.messages import ProxyRequest
from buddy.service import ProxyService
from buddy.upstream import safe_path, safe_query, upstream_path

bp = Blueprint("proxy", __name__)
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def raw_target() -> bytes:
    """The request path exactly as the client sent it (gunicorn's RAW_URI), before any decoding."""
    environ = request.environ
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw is None:
        raw = quote(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""), safe="/%")
    if not raw.startswith("/"):
        raise BadProxyRequest("absolute-form and authority-form request targets are not accepted")
    return raw.split("?", 1)[0].split("#", 1)[0].encode("latin-1")


@bp.route("/", methods=METHODS, provide_automatic_options=False, defaults={"_": ""})
@bp.route("/<path:_>", methods=METHODS, provide_automatic_options=False)
def proxy(_: str) -> Response:
    service: ProxyService = current_app.extensions["buddy"].service
    target = raw_target()
    first, slash, rest = target[1:].partition(b"/")
    name = unquote(first.decode("latin-1"))
    domain = service.settings.domains.get(name)
    if domain is None:
        response = jsonify(
            error="unknown domain",
            domain=name,
            message=f"'{name}' is not a configured domain; use /<domain>/<path>",
            configured=sorted(service.settings.domains),
        )
        response.status_code = 404
        return response
    path = upstream_path(domain, safe_path(rest) if slash else None)
    proxy_request = ProxyRequest(
        domain=domain,
        method=request.method,
        path=path,
        query=safe_query(request.environ.get("QUERY_STRING", "").encode("latin-1")),
        headers=list(request.headers.items()),
        body=request.get_data(cache=False),
    )
    result = service.handle(proxy_request)
    body = result.stream if result.stream is not None else result.body
    status = f"{result.status} {result.reason}" if result.reason else result.status
    response = Response(body, status=status, headers=result.all_headers(), direct_passthrough=True)
    if not any(name.lower() == "content-type" for name, _ in result.headers):
        del response.headers["Content-Type"]  # never invent a type the upstream did not send
    return response
