"""register_error_handlers: every error a client can get is JSON, and no traceback ever reaches one."""
from __future__ import annotations

import logging

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from buddy.access import LockedOut, Unauthorized
from buddy.errors import BadProxyRequest, ClientGone, StoreUnavailable

log = logging.getLogger("buddy")


def _json(status: int, **body: object) -> Response:
    response = jsonify(body)
    response.status_code = status
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(Unauthorized)
    def unauthorized(exc: Unauthorized) -> Response:
        response = _json(401, error="unauthorized",
                         message="missing or wrong access key: send it as the X-API-Buddy-Key header, "
                                 "Authorization: Bearer <key>, ?key=<key> or a /<key>/<domain>/ path prefix")
        response.headers["WWW-Authenticate"] = 'Bearer realm="reference-api-buddy"'
        return response

    @app.errorhandler(LockedOut)
    def locked_out(exc: LockedOut) -> Response:
        response = _json(429, error="too many wrong access keys", client=exc.address, retry_after=exc.retry_after,
                         message=f"too many wrong access keys came from {exc.address}: its requests are refused, "
                                 f"the right key's too, for {exc.retry_after} s more (Retry-After). Each wrong key "
                                 "after that doubles the wait; a minute without one starts afresh")
        response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.errorhandler(StoreUnavailable)
    def store_unavailable(exc: StoreUnavailable) -> Response:
        # Only reached when the access key itself must come from Redis: fail closed.
        return _json(503, error="access key unavailable",
                     message="the access key is kept in Redis, which cannot be reached; try again shortly")

    @app.errorhandler(ClientGone)
    def client_gone(exc: ClientGone) -> Response:
        response = _json(499, error="client closed request", domain=exc.domain, message=str(exc))
        response.status = "499 Client Closed Request"  # nginx's code; nobody is there to read it
        return response

    @app.errorhandler(BadProxyRequest)
    def bad_request(exc: BadProxyRequest) -> Response:
        return _json(400, error="bad request", message=str(exc))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        response = _json(exc.code or 500, error=(exc.name or "error").lower(), message=exc.description)
        for name, value in exc.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value
        return response

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        log.exception("unexpected error while handling a request")
        return _json(500, error="internal error", message="the proxy failed to handle this request; see its log")
