"""The hit path: a thin WSGI layer in front of the Flask app that answers fresh cache hits itself.

First of all, for every request (proxy, admin, metrics, dashboard), the Host check (buddy.hosts): a request
for a name that is not the proxy's own is refused here, before anything else looks at it.

A GET or HEAD without a body (`views.has_body`, the view's own test) for a mapping goes through the same steps
as in the proxy view, with the same functions: the access check, the mapping, the cache key, the lookup (L1,
then Redis) and the client's Cache-Control. When the answer is a fresh hit, it is sent from here, with exactly
the headers the view would send (`views.response_headers`). Anything else, a miss, a stale entry, an unknown
mapping, a wrong key, a bad path, Redis unreachable, is handed to the Flask app unchanged, which answers it in
full (and says why, when it refuses). Skipping Flask's request context, routing and Response objects is most
of what a hit costs.

An error of the hit path's own (a bug: anything but the refusals and the Redis outage the view answers for
itself) hands the request on too, so that the client still gets its answer, only more slowly. Such a bug could
send every hit the slow way unseen: each hand-over is counted (`hit_path_failures`, per mapping, in
/admin/metrics and /metrics), and the first of each kind (its exception and where it was raised) is logged
with its traceback at ERROR, once per process; the others at DEBUG.
"""
from __future__ import annotations

import logging
import threading
import traceback
from typing import Any, Callable, Iterable
from urllib.parse import unquote

from flask import Flask
from werkzeug.datastructures import EnvironHeaders
from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.urls import iri_to_uri

from buddy import parking, policy
from buddy.access import Unauthorized
from buddy.counters import Counters
from buddy.errors import BadProxyRequest, StoreUnavailable
from buddy.messages import ProxyRequest
from buddy.redis_keys import EntryId
from buddy.views import MAPPED, has_body, mapped_request, raw_target, response_headers, route

log = logging.getLogger("buddy.fastpath")
REWRITTEN = {"location": "Location", "content-location": "Content-Location"}  # werkzeug rewrites these (below)
# What route() and read_body() read of a request besides its HTTP_* headers (the body: none, on this path).
RAW = ("RAW_URI", "REQUEST_URI", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "CONTENT_TYPE", "CONTENT_LENGTH")
MAPPED_BUDGET = 8 * 1024 * 1024  # bytes of remembered requests per worker; then all forgotten at once (a flood)
MAPPED_SIZE = 4096  # a request with more bytes of header names and values and target is mapped every time
MAPPED_OVERHEAD = 2048  # what a remembered request takes beyond its bytes (measured: about 2 KB for a small GET)
# Raised on the hit path for requests the view answers itself, as it means to: a refusal (a bad path or namespace,
# 400; a missing key, 401) or Redis out of reach (BYPASS; the access key, 503). Handed on quietly, never counted.
HANDED_ON = (BadProxyRequest, Unauthorized, HTTPException, StoreUnavailable)
StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict, StartResponse], Iterable[bytes]]


class HitPath:
    """`app.wsgi_app = HitPath(app, app.wsgi_app)`: fresh hits answered here, everything else by `app`."""

    def __init__(self, app: Flask, wrapped: WSGIApp) -> None:
        self.app = app
        self.wrapped = wrapped
        self.hosts = app.extensions["buddy"].hosts
        self._mapped: dict[tuple, tuple[ProxyRequest, EntryId]] = {}  # a request's bytes -> what they map to
        self._mapped_bytes = 0  # about what _mapped holds
        self._failed: set[tuple[str, str, int]] = set()  # kinds of failure logged at ERROR (as many as places in code)
        self._failed_lock = threading.Lock()

    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD")
        refused = self.hosts.refusal(environ)
        if refused is not None:
            status, headers, body = refused
            start_response(status, headers)
            return [b"" if method == "HEAD" else body]
        if (method == "GET" or method == "HEAD") and not has_body(environ) and not parking.resuming():
            try:
                answer = self.hit(environ, method)
            except HANDED_ON:  # the app refuses it again, or answers it without Redis, and says why
                answer = None
            except Exception as exc:  # a bug here: the app answers this request in full; counted, told once
                self.failed(environ, exc)
                answer = None
            if answer is not None:
                status, headers, body = answer
                start_response(status, headers)
                return [body]
        return self.wrapped(environ, start_response)

    def hit(self, environ: dict, method: str) -> tuple[str, list[tuple[str, str]], bytes] | None:
        """(status, headers, body) of a fresh hit, or None to let the app answer."""
        buddy = self.app.extensions["buddy"]
        service = buddy.service
        if buddy.access.required and buddy.access.failures.locked(environ.get("REMOTE_ADDR")):
            return None  # locked out: a remembered request must not let the right key in; the view refuses it
        # The same bytes (method, target, every header) map to the same request, and were admitted the same way
        # (under the same access key): a hot request is mapped once per worker, then looked up by its bytes.
        sent = [(k, v) for k, v in environ.items() if k[:5] == "HTTP_"]
        raw = [environ.get(name) for name in RAW]
        seen = (method, *raw, *sent, buddy.access.key() if buddy.access.required else None)
        known = self._mapped.get(seen)
        if known is None:
            known = self.map(buddy, environ, method)
            if known is None:
                return None
            size = sum(len(k) + len(v) for k, v in sent) + sum(len(part) for part in raw if part)
            if size <= MAPPED_SIZE:
                held = 4 * size + MAPPED_OVERHEAD  # its bytes are kept about four times over, in Python objects
                if self._mapped_bytes + held > MAPPED_BUDGET:
                    self._mapped.clear()
                    self._mapped_bytes = 0
                self._mapped[seen] = known
                self._mapped_bytes += held
        request, primary = known
        result, looked = service.fresh_hit(request, primary)
        if result is None:
            environ[MAPPED] = (request, looked)  # the view goes on from here: no second look-up
            return None
        headers = as_werkzeug_sends(response_headers(result))
        if result.status in (204, 304):
            body = b""  # no content, and no Content-Length to say so (RFC 9110 8.6), as werkzeug sends them
        else:
            body = result.body or b""
            headers.append(("Content-Length", str(len(body))))
        status = f"{result.status} {result.reason or HTTP_STATUS_CODES.get(result.status, 'UNKNOWN').upper()}"
        return status, headers, b"" if method == "HEAD" else body

    def failed(self, environ: dict, exc: Exception) -> None:
        """An error of the hit path's own: counted for the mapping the request names, logged at ERROR (with its
        traceback) the first time this process meets its kind (its type and the line that raised it)."""
        where = traceback.extract_tb(exc.__traceback__)[-1]
        kind = (f"{type(exc).__module__}.{type(exc).__qualname__}", where.filename, where.lineno or 0)
        with self._failed_lock:
            first = kind not in self._failed
            self._failed.add(kind)
        if first:
            log.error("the hit path failed (%s at %s:%s) and handed the request to the proxy view, which answers "
                      "it in full, more slowly; requests like it will go the same way, counted as "
                      "hit_path_failures and logged here once: this is a bug", kind[0], where.filename,
                      where.lineno, exc_info=exc)
        else:
            log.debug("the hit path failed again (%s at %s:%s)", kind[0], where.filename, where.lineno)
        try:
            service = self.app.extensions["buddy"].service
            name = mapping_named(environ, service.settings.domains)
            if name is not None:
                service.metrics.count(name, Counters.HIT_PATH_FAILURES)
        except Exception:  # counting must not turn a slow answer into none
            log.debug("could not count a failure of the hit path", exc_info=True)

    @staticmethod
    def map(buddy: Any, environ: dict, method: str) -> tuple[ProxyRequest, EntryId] | None:
        """As the view maps a request (access key, mapping, safe path and query, namespace), and its cache entry;
        None for anything the hit path leaves to the view (refused, unknown mapping, uncacheable)."""
        domains = buddy.service.settings.domains
        if raw_target(environ) == b"/":
            return None  # the dashboard's redirect
        target = buddy.access.admit(route(environ, list(EnvironHeaders(environ).items())), domains.keys(),
                                    environ.get("REMOTE_ADDR") or "unknown", quiet=True)
        if target is None:
            return None  # refused: the app refuses it again, and logs it once
        domain = domains.get(target.first)
        if domain is None:
            return None
        request = mapped_request(domain, method, target, b"", environ.get("HTTP_X_BUDDY_NAMESPACE"))
        if not policy.cacheable_request(request):
            return None
        return request, policy.entry_for(request)


def as_werkzeug_sends(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The headers as werkzeug sends them from the view (Response.get_wsgi_headers): Location and Content-Location
    once each, named so, where the first one was, with the last one's value, an IRI made a URI."""
    last = {name.lower(): value for name, value in headers if name.lower() in REWRITTEN}
    if not last:
        return headers
    sent = []
    for name, value in headers:
        lower = name.lower()
        if lower not in REWRITTEN:
            sent.append((name, value))
        elif lower in last:
            sent.append((REWRITTEN[lower], iri_to_uri(last.pop(lower))))
    return sent


def mapping_named(environ: dict, domains: Any) -> str | None:
    """The configured mapping a request's path names, as its first segment or after an access key in the path; read
    from the raw path alone, so that it holds whatever part of the hit path failed."""
    for segment in raw_target(environ)[1:].split(b"/", 2)[:2]:
        name = unquote(segment.decode("latin-1"))
        if name in domains:
            return name
    return None
