"""Who may use the admin routes and the dashboard: the access key as for the proxy, or a dashboard session (a
signed cookie, open in Redis until it expires or its browser signs out); and the header every browser action needs."""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time

from flask import current_app, request
from werkzeug.exceptions import Forbidden
from werkzeug.wrappers import Response as BaseResponse

from buddy.access import Target
from buddy.errors import StoreUnavailable

SESSION_COOKIE = "buddy_dashboard"
SESSION_SECONDS = 12 * 3600
ACTION_HEADER = "X-Buddy-Action"  # a cross-origin form or no-cors fetch cannot send it; same-origin JS can
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
_EXPIRY = re.compile(r"[0-9]{1,12}")  # ASCII digits only: "²".isdigit() is True, int("²") is not
_SESSION = re.compile(r"[A-Za-z0-9_-]{24}")  # secrets.token_urlsafe(18)


def session_token(key: str, expires: int, session: str) -> str:
    """What the dashboard cookie holds: an expiry, a session id, and an HMAC of both under the access key (never
    the key). The session also lives in Redis until it expires or its browser signs out."""
    label = f"reference-api-buddy dashboard session {session} until {expires}".encode()
    digest = hmac.new(key.encode("utf-8", "surrogateescape"), label, hashlib.sha256).hexdigest()
    return f"{expires}.{session}.{digest}"


def session_valid(value: str, key: str, now: float) -> str | None:
    """The session id of a cookie value the current key signed, not yet expired (compared in constant time);
    None otherwise. Whether the session is still open is Redis's to say (see `session_open`)."""
    expires, _, rest = value.partition(".")
    session = rest.partition(".")[0]
    if not _EXPIRY.fullmatch(expires) or not _SESSION.fullmatch(session):
        return None
    if not now < int(expires) <= now + SESSION_SECONDS:
        return None
    signed = session_token(key, int(expires), session)
    return session if hmac.compare_digest(signed.encode(), value.encode("utf-8", "surrogateescape")) else None


def session_open(session: str) -> bool:
    """Has this session not been closed (signed out, or expired in Redis)? No when Redis cannot say."""
    buddy = current_app.extensions["buddy"]
    key = buddy.service.keys.session(session)
    try:
        return bool(buddy.service.cache.guard.run(lambda: buddy.redis.exists(key)))
    except StoreUnavailable:
        return False


def start_session(response: BaseResponse, key: str) -> BaseResponse:
    """Sign the browser in: a session in Redis, and an HttpOnly, SameSite=Strict cookie for the admin routes."""
    buddy = current_app.extensions["buddy"]
    expires, session = int(time.time()) + SESSION_SECONDS, secrets.token_urlsafe(18)
    name = buddy.service.keys.session(session)
    buddy.service.cache.guard.run(lambda: buddy.redis.set(name, b"1", ex=SESSION_SECONDS))
    response.set_cookie(SESSION_COOKIE, session_token(key, expires, session), max_age=SESSION_SECONDS,
                        path="/admin", secure=request.is_secure, httponly=True, samesite="Strict")
    return response


def end_session() -> None:
    """Sign out: the session is closed in Redis, so its cookie opens nothing even if it is replayed."""
    buddy = current_app.extensions["buddy"]
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie or not buddy.access.required:
        return
    session = session_valid(cookie, buddy.access.key(), time.time())
    if session is not None:
        name = buddy.service.keys.session(session)
        buddy.service.cache.guard.run(lambda: buddy.redis.delete(name))


def authorize() -> str:
    """How this request may use the admin routes: "open" (no key required), "cookie" (a dashboard session) or
    "key" (the key itself, as for the proxy); raises Unauthorized (401) otherwise, logged like any refusal."""
    buddy = current_app.extensions["buddy"]
    if buddy.access.required:
        cookie = request.cookies.get(SESSION_COOKIE)
        session = session_valid(cookie, buddy.access.key(), time.time()) if cookie else None
        if session is not None and session_open(session):
            return "cookie"
    target = Target("admin", None, request.environ.get("QUERY_STRING", ""), list(request.headers.items()))
    buddy.access.admit(target, set(), request.remote_addr or "unknown")
    return "key" if buddy.access.required else "open"


def deliberate(how: str) -> None:
    """CSRF: a state change through the browser's cookie, and any POST (which a cross-site form can send), must
    carry ACTION_HEADER; DELETE never leaves a browser cross-origin without a CORS preflight, which is never
    granted here. (DNS rebinding, a page "same-origin" with the proxy through a name of its own, never gets
    this far: buddy.hosts refuses any Host that is not one of the proxy's names, for every route.)"""
    if request.method in SAFE_METHODS:
        return
    if (how == "cookie" or request.method == "POST") and request.headers.get(ACTION_HEADER) != "1":
        raise Forbidden(f"admin actions from a browser need the header {ACTION_HEADER}: 1")
