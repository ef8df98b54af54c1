"""The proxy blueprint: flask.request -> ProxyRequest -> service -> flask.Response, nothing more."""
from __future__ import annotations

import re
import select
import socket
from dataclasses import replace
from typing import Any, Callable, Mapping
from urllib.parse import quote, unquote

from flask import Blueprint, Request, Response, current_app, jsonify, request, url_for
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge

from buddy import parking, policy
from buddy.access import Target
from buddy.errors import BadProxyRequest
from buddy.forwarding import forwardable_request_headers, safe_path, safe_query, upstream_path
from buddy.messages import ProxyRequest, ProxyResult
from buddy.service import Looked, ProxyService
from buddy.settings import DomainSettings, ServerSettings

bp = Blueprint("proxy", __name__)
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def raw_target(environ: dict[str, Any]) -> bytes:
    """The request path exactly as the client sent it (gunicorn's RAW_URI), before any decoding."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw is None:
        raw = quote(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""), safe="/%")
    if not raw.startswith("/"):
        raise BadProxyRequest("absolute-form and authority-form request targets are not accepted")
    return raw.split("?", 1)[0].split("#", 1)[0].encode("latin-1")


def has_body(environ: Mapping[str, Any]) -> bool:
    """Does the request carry a body that the view reads, and keys on? Any Transfer-Encoding (chunked, or one the
    server let through: read_body decides), or a Content-Length other than 0. The one answer the view and the
    hit path both act on: the hit path answers only a request without a body, as the view would key it."""
    return "HTTP_TRANSFER_ENCODING" in environ or environ.get("CONTENT_LENGTH") not in (None, "", "0")


def read_body(req: Request, server: ServerSettings) -> bytes:
    """The whole request body, refused with 413 past `server.max_request_body`, also when it arrives chunked.

    A body that does not arrive whole is a 400. `server.body_timeout` bounds the whole body, however slowly
    it trickles: under `gunicorn wsgi:app` the worker (buddy.worker) ends every read of a request at one
    deadline, body_timeout after its head was read, and a read past it fails here. Under another worker
    class each read at least gives up after body_timeout.
    """
    if not has_body(req.environ):
        return b""  # most GETs: nothing to read, nothing to wait for
    codings = [c.strip().lower() for c in req.environ.get("HTTP_TRANSFER_ENCODING", "").split(",") if c.strip()]
    if codings and codings != ["chunked"]:
        # gunicorn removes the chunking but leaves gzip (or deflate) on: sent on, the body would be wrong, keyed so.
        raise BadRequest(f"a request body in Transfer-Encoding '{', '.join(codings)}' is not accepted: send it "
                         "chunked or with a Content-Length, and say how its content is coded in Content-Encoding")
    chunked = codings == ["chunked"]
    if req.content_length is None and not chunked:
        return b""  # no framing to read a body by
    late = f"the request body did not arrive whole (server.body_timeout: {server.body_timeout:g} s)"
    sock = req.environ.get("gunicorn.socket")
    if sock is not None:
        sock.settimeout(server.body_timeout)  # the floor for other workers; buddy's worker reads by deadline
    if req.content_length is not None:
        try:
            return req.get_data(cache=False)  # werkzeug answers 413 when Content-Length is over the limit
        except BadRequest as exc:  # werkzeug's ClientDisconnected: fewer bytes than announced, in time
            raise BadRequest(late) from exc
    if not req.environ.get("wsgi.input_terminated"):
        return b""  # a server that cannot frame a chunked body for us: read nothing rather than too much
    limit = server.max_request_body
    try:
        body = req.environ["wsgi.input"].read(limit + 1)
    except TimeoutError as exc:
        raise BadRequest(late) from exc
    except Exception as exc:  # a socket error, or the server's own parse error (gunicorn: a bad chunk size)
        raise BadRequest(f"the request body could not be read: {type(exc).__name__}") from exc
    if len(body) > limit:
        raise RequestEntityTooLarge()
    return body


MAPPED = "buddy.mapped"  # environ: (ProxyRequest, Looked | None) from the hit path, for a request it did not answer
ACTIVE_CONTENT = frozenset({"text/html", "application/xhtml+xml", "image/svg+xml", "text/xml", "application/xml"})
NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def namespace_of(header: str | None) -> str:
    """The cache partition the client names in X-Buddy-Namespace ('' for none); a bad name is a 400."""
    value = (header or "").strip()
    if value and not NAMESPACE.fullmatch(value):
        raise BadProxyRequest(
            "X-Buddy-Namespace must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return value


def hung_up(sock: socket.socket | None) -> Callable[[], bool]:
    """A check that the client has closed its connection: readable, with nothing to read (bytes of a
    pipelined request count as still there). Without a socket to look at, never."""
    if sock is None:
        return lambda: False

    def check() -> bool:
        try:
            poller = select.poll()  # not select.select: it refuses descriptors past 1023, a busy worker's lot
            poller.register(sock, select.POLLIN)
            return bool(poller.poll(0)) and sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except (OSError, ValueError):
            return True  # reset, or already closed

    return check


@bp.route("/", methods=METHODS, provide_automatic_options=False, defaults={"_": ""})
@bp.route("/<path:_>", methods=METHODS, provide_automatic_options=False)
def proxy(_: str) -> Response:
    buddy = current_app.extensions["buddy"]
    service: ProxyService = buddy.service
    req: Request = request._get_current_object()  # type: ignore[attr-defined]  # one context lookup, not one per attribute
    environ = req.environ
    client_gone = hung_up(environ.get("gunicorn.socket") or environ.get("werkzeug.socket"))
    mapped = environ.get(MAPPED)
    if mapped is not None:  # the hit path mapped it, and looked it up: not a fresh hit
        proxy_request, looked = mapped
        return answer(service, replace(proxy_request, client_gone=client_gone), looked)
    if req.method in ("GET", "HEAD") and raw_target(environ) == b"/":  # no mapping named: the dashboard
        return Response(status=302, headers={"Location": url_for("dashboard.page")})
    target = buddy.access.admit(
        route(environ, list(req.headers.items())), service.settings.domains.keys(), req.remote_addr or "unknown"
    )
    domain = service.settings.domains.get(target.first)
    if domain is None:
        # With access keys on, the name is not echoed: it may be a key typed twice or mistyped.
        name = "(not shown)" if buddy.access.required else target.first
        response = jsonify(
            error="unknown domain",
            domain=name,
            message=f"'{name}' is not a configured domain; use /<domain>/<path>",
            configured=sorted(service.settings.domains),
        )
        response.status_code = 404
        return response
    again = parking.resumed_body()  # a parked request run again: its body was read the first time
    body = read_body(req, service.settings.server) if again is None else again
    proxy_request = mapped_request(domain, req.method, target, body, req.headers.get("X-Buddy-Namespace"),
                                   client_gone=client_gone)
    return answer(service, proxy_request)


def answer(service: ProxyService, proxy_request: ProxyRequest, looked: Looked | None = None) -> Response:
    result = service.handle(proxy_request, looked)
    body = result.stream if result.stream is not None else result.body
    status = f"{result.status} {result.reason}" if result.reason else result.status
    response = Response(body, status=status, headers=response_headers(result), direct_passthrough=True)
    if not any(name.lower() == "content-type" for name, _ in result.headers):
        del response.headers["Content-Type"]  # never invent a type the upstream did not send
    return response


def route(environ: dict[str, Any], headers: list[tuple[str, str]]) -> Target:
    """The request's routing parts: the first path segment (a mapping, or a key), the rest, query and headers."""
    first, slash, rest = raw_target(environ)[1:].partition(b"/")
    raw_first = first.decode("latin-1")
    return Target(
        first=unquote(raw_first),
        raw_first=raw_first,
        rest=rest if slash else None,
        query=environ.get("QUERY_STRING", ""),
        headers=headers,
    )


def mapped_request(
    domain: DomainSettings, method: str, target: Target, body: bytes, namespace: str | None,
    client_gone: Callable[[], bool] = lambda: False,
) -> ProxyRequest:
    """The request as the service sees it: a safe upstream path and query, what is forwarded, the client's own
    conditions (answered by the proxy, never forwarded), the namespace."""
    forwarded, asked = policy.conditions(method, forwardable_request_headers(target.headers))
    return ProxyRequest(
        domain=domain,
        method=method,
        path=upstream_path(domain, None if target.rest is None else safe_path(target.rest)),
        query=safe_query(target.query.encode("latin-1")),
        headers=target.headers,
        body=body,
        forwarded=forwarded,
        key_prefix=target.key_prefix,
        key_param=target.key_param,
        namespace=namespace_of(namespace),
        conditions=asked,
        client_gone=client_gone,
    )


def response_headers(result: ProxyResult) -> list[tuple[str, str]]:
    """The answer's headers as the client gets them (X-Cache, Age...), sandboxed when it is active content."""
    headers = result.all_headers()
    types = [value.split(";", 1)[0].strip().lower() for name, value in result.headers if name.lower() == "content-type"]
    if not types or ACTIVE_CONTENT.intersection(types):
        # A page an upstream serves through the proxy shares the dashboard's origin: sandboxed, its scripts
        # run in an origin of their own and cannot use the admin routes (API clients never look at this).
        headers.append(("Content-Security-Policy", "sandbox"))
    return headers
