"""Access control: find the proxy's key wherever the client put it, compare in constant time, and remove it.

The key is accepted from `X-API-Buddy-Key`, `Authorization: Bearer <key>`, `?key=<key>` and a path prefix
`/<key>/<domain>/...`. Whatever matches is taken out before anything else sees the request; a bearer token
or `key=` parameter that is not the proxy key belongs to the upstream and is left exactly as it was.
"""
from __future__ import annotations

import hmac
import ipaddress
import math
import re
from dataclasses import dataclass, replace
from typing import Callable, Collection, overload
from urllib.parse import unquote, unquote_plus

from buddy.errors import BadProxyRequest
from buddy.redaction import spellings
from buddy.store.key_failures import KeyFailures, address_of

KEY_HEADER = "x-api-buddy-key"
_BEARER = re.compile(r"bearer[ \t]+", re.IGNORECASE)


class Unauthorized(Exception):
    """No valid access key: 401, before any cache, throttle or upstream work."""


class LockedOut(Unauthorized):
    """Too many wrong keys from the client's address: 429 with Retry-After, the right key too, until it ends."""

    def __init__(self, retry_after: float, address: str) -> None:
        super().__init__(f"too many wrong access keys from {address}")
        self.retry_after = max(1, math.ceil(retry_after))
        self.address = address


@dataclass(frozen=True)
class Target:
    """A request's routing parts: first path segment, the rest (None when there is no slash), query, headers."""

    first: str
    rest: bytes | None
    query: str
    headers: list[tuple[str, str]]
    raw_first: str = ""  # the first segment as sent, before percent-decoding
    key_prefix: str = ""  # the key as the client spelled it in a path prefix, when it did
    key_param: str = ""  # ... and in a `key=` query parameter


def same(candidate: str, key: str) -> bool:
    """Constant-time comparison (the time does not depend on how much of the candidate is right)."""
    return hmac.compare_digest(candidate.encode("utf-8", "surrogateescape"), key.encode("utf-8", "surrogateescape"))


def spelled(raw: str, key: str) -> bool:
    """Is `raw`, as it stands in the request line, the key or one of its plain percent-encodings?

    Only these spellings are accepted, so that the log filter, which masks exactly these, covers every
    form in which an accepted key can have been written (an arbitrary %-encoding would slip past it).
    """
    return any([same(raw, form) for form in spellings(key)])  # a list: compare against every form, always


def strip_key(target: Target, key: str, domains: Collection[str]) -> tuple[Target, bool]:
    """Remove every occurrence of the proxy key; True if at least one was found."""
    found = False
    if target.first not in domains and target.rest is not None and spelled(target.raw_first or target.first, key):
        first, slash, rest = target.rest.partition(b"/")
        raw = first.decode("latin-1")
        prefix = target.raw_first or target.first
        target = replace(target, first=unquote(raw), raw_first=raw, rest=rest if slash else None, key_prefix=prefix)
        found = True
    headers = []
    for name, value in target.headers:
        lower = name.lower()
        if lower == KEY_HEADER:
            found = same(value.strip(), key) or found
            continue  # never forwarded, right or wrong
        bearer = _BEARER.match(value) if lower == "authorization" else None
        if bearer and same(value[bearer.end():].strip(), key):
            found = True
            continue
        headers.append((name, value))
    items, param = [], ""
    for item in target.query.split("&") if target.query else []:
        name, _, value = item.partition("=")
        if unquote_plus(name) == "key" and spelled(value, key):
            found, param = True, value
            continue
        items.append(item)
    return replace(target, headers=headers, query="&".join(items), key_param=param), found


def offers_a_key(target: Target, domains: Collection[str]) -> bool:
    """Does the request offer something that could be the key (a guess), rather than none at all? A key header
    with a value, a bearer token, a `key=` item, or a first path segment that names no mapping."""
    if target.rest is not None and target.first and target.first not in domains:
        return True
    for name, value in target.headers:
        lower = name.lower()
        if (lower == KEY_HEADER and value.strip()) or (lower == "authorization" and _BEARER.match(value)):
            return True
    return any(unquote_plus(item.partition("=")[0]) == "key" for item in target.query.split("&") if item)


def still_carries(target: Target, key: str) -> bool:
    """Is some spelling of the key left in what would go upstream (`?a=1;key=K`, `Bearer<TAB>K` twice...)?"""
    forms = spellings(key)
    rest = target.rest.decode("latin-1") if target.rest else ""
    places = [target.query, rest, *(value for _, value in target.headers)]
    return any(form in place for form in forms for place in places)


class AccessControl:
    """Checks requests when `security.require_secure_key` is on; otherwise only drops X-API-Buddy-Key.

    Refusals are counted per client address (`failures`): wrong keys slow the address down, and the log gets
    one line per address and minute, with the count."""

    def __init__(self, required: bool, key: Callable[[], str], log_events: bool = True,
                 failures: KeyFailures | None = None) -> None:
        self.required = required
        self.key = key
        self.log_events = log_events
        self.failures = failures or KeyFailures(10, 60.0, log_events=log_events)

    @overload
    def admit(self, target: Target, domains: Collection[str], client: str) -> Target: ...
    @overload
    def admit(self, target: Target, domains: Collection[str], client: str, quiet: bool) -> Target | None: ...

    def admit(self, target: Target, domains: Collection[str], client: str, quiet: bool = False) -> Target | None:
        """The target with the key taken out; Unauthorized without a valid key, LockedOut (untried) while the
        client's address is locked out (`quiet`: None, and nothing counted or logged)."""
        if not self.required:
            if not any(n.lower() == KEY_HEADER for n, _ in target.headers):
                return target
            return replace(target, headers=[(n, v) for n, v in target.headers if n.lower() != KEY_HEADER])
        wait = self.failures.locked(client)
        if wait:
            if quiet:
                return None
            self.failures.refused(client)
            raise LockedOut(wait, address_of(client))
        key = self.key()
        stripped, found = strip_key(target, key, domains)
        if not found:
            if quiet:
                return None
            if not offers_a_key(target, domains):
                self.failures.refused(client)  # no guess: counted for the log, never towards a lock-out
            else:
                wait = self.failures.wrong(client)
                if wait:
                    raise LockedOut(wait, address_of(client))
            raise Unauthorized()
        if still_carries(stripped, key):
            raise BadProxyRequest(
                "the access key also appears where it would reach the upstream (another header, a query item "
                "the proxy does not read as key=); send it once, in one of the accepted places"
            )
        return stripped


def exposure_warning(binds: list[str], require_key: bool) -> str | None:
    """A warning when the proxy listens beyond loopback with no access key required, else None."""
    if require_key:
        return None
    exposed = [bind for bind in binds if not _loopback(bind)]
    if not exposed:
        return None
    return (
        f"!!! reference-api-buddy listens on {', '.join(exposed)} without an access key: anyone who can reach "
        "it can spend your upstream quotas and read your cache. Set security.require_secure_key = true "
        "(and BUDDY_SECURE_KEY), or bind to 127.0.0.1. !!!"
    )


def _loopback(bind: str) -> bool:
    if bind.startswith(("unix:", "fd://")):
        return True
    host = bind.rsplit(":", 1)[0] if not bind.endswith("]") else bind
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable from elsewhere
