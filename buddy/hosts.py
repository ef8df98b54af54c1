"""The Host check: the proxy answers only through its own names, in every mode, before any other work.

A web page can have a browser send requests to the proxy under a name of the page's own (DNS rebinding: the
name resolves first to the attacker's server, then to 127.0.0.1), and read the answers, since to the browser
they come from the page's own origin. Such a request names the attacker's host in `Host`: refused here (421,
with a JSON body naming the setting), before the hit path, the access key, the cache, an upstream or an admin
route sees it.

Accepted: the loopback names (localhost, 127.0.0.1, ::1); any IP address (a browser sends one only when the
page's own address is that IP, which no DNS answer can change); the configured `server.host` and the
addresses gunicorn binds; the machine's host name and FQDN; and `server.allowed_hosts` (the older
`security.admin_hosts` too). `"*"` there accepts any Host, for a proxy behind a reverse proxy that checks it.
A request without Host is accepted in HTTP/1.0 (no browser sends one) and refused in HTTP/1.1 (RFC 9112 3.2).
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import socket
import threading
from functools import lru_cache
from typing import Any, Callable, Iterable

from buddy.settings import Settings

log = logging.getLogger("buddy.security")
ANY = "*"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
BINDS_VARIABLE = "BUDDY_BINDS"  # the gunicorn master's bind addresses, for its workers
SETTING = "server.allowed_hosts"
_HOST = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9._-]+))(?::[0-9]*)?")
_REMEMBERED = 1024  # Host values whose verdict a process keeps (a flood of made-up names cannot grow it)
StartResponse = Callable[..., Any]


def host_name(value: str) -> str | None:
    """The name in a Host value, lower-cased, without port, brackets or a trailing dot; None when it is not
    a host (`a b`, `x@y`, `[zone%id]`): such a value is refused like an unknown name."""
    value = value.strip(" \t")
    found = _HOST.fullmatch(value)
    if found is None:
        try:
            return str(ipaddress.IPv6Address(value))  # an IPv6 address without brackets (and so without port)
        except ValueError:
            return None
    if found["v6"] is not None:
        try:
            return str(ipaddress.IPv6Address(found["v6"]))
        except ValueError:
            return None
    name = found["name"].lower().rstrip(".")
    return name or None


def is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def bind_host(bind: str) -> str | None:
    """The host of a gunicorn bind address (`127.0.0.1:8080`, `[::1]:8080`, `box.lan`), None for a socket."""
    if bind.startswith(("unix:", "fd://")):
        return None
    return host_name(bind)


@lru_cache(maxsize=1)
def machine_names() -> tuple[str, ...]:
    """This machine's host name and fully qualified name (asked once per process: the FQDN may need DNS)."""
    names = []
    for ask in (socket.gethostname, socket.getfqdn):
        try:
            name = host_name(ask())
        except OSError:
            continue
        if name:
            names.append(name)
    return tuple(dict.fromkeys(names))


def accepted_names(settings: Settings, binds: Iterable[str] = ()) -> frozenset[str]:
    """Every name a Host may carry (IP addresses besides, always); contains ANY when every name is accepted."""
    names = set(LOOPBACK_NAMES) | set(machine_names())
    for where in (str(settings.server.host), *binds):
        name = bind_host(where)
        if name:
            names.add(name)
    for entry in settings.server.allowed_hosts:
        names.add(ANY if entry == ANY else (host_name(entry) or entry.lower()))
    for entry in settings.security.admin_hosts:  # its older, narrower form: names only, never ANY
        name = host_name(entry)
        if name:
            names.add(name)
    return frozenset(names)


def gunicorn_binds() -> list[str]:
    """The addresses the gunicorn master binds (it tells its workers through the environment), or none."""
    return [bind for bind in os.environ.get(BINDS_VARIABLE, "").split(",") if bind]


def describe(settings: Settings, binds: Iterable[str] = ()) -> str:
    """The start-up line: which Host names the proxy answers."""
    names = accepted_names(settings, binds)
    if ANY in names:
        line = (f"accepts any Host ({SETTING} has \"*\"): whatever is in front of the proxy must check Host, or "
                "any web page its users visit can use the proxy (DNS rebinding)")
    else:
        listed = ", ".join(sorted(names, key=lambda name: (is_address(name), name)))
        line = f"accepts Host: {listed} and any IP address (more names: {SETTING})"
    if settings.security.admin_hosts:
        line += f"; security.admin_hosts is read as part of {SETTING}: move its names there"
    return line


class HostCheck:
    """Which Host values this process answers; the names are worked out on first use, then each value's
    verdict is remembered."""

    def __init__(self, settings: Settings, binds: Callable[[], Iterable[str]] = gunicorn_binds,
                 log_events: bool = True) -> None:
        self.settings = settings
        self.binds = binds
        self.log_events = log_events
        self._names: frozenset[str] | None = None
        self._verdicts: dict[str, bool] = {}
        self._logged: set[str] = set()
        self._lock = threading.Lock()

    @property
    def names(self) -> frozenset[str]:
        if self._names is None:
            self._names = accepted_names(self.settings, self.binds())
        return self._names

    def allows(self, value: str) -> bool:
        verdict = self._verdicts.get(value)
        if verdict is None:
            names = self.names
            name = host_name(value)
            verdict = ANY in names or (name is not None and (name in names or is_address(name)))
            if len(self._verdicts) < _REMEMBERED:
                self._verdicts[value] = verdict
        return verdict

    def refusal(self, environ: dict) -> tuple[str, list[tuple[str, str]], bytes] | None:
        """(status, headers, body) refusing this request, or None when its Host is one of the proxy's own."""
        host = environ.get("HTTP_HOST")
        if host is None:
            if environ.get("SERVER_PROTOCOL", "HTTP/1.1") == "HTTP/1.0":
                return None
            return answer("400 BAD REQUEST", error="bad request",
                          message="an HTTP/1.1 request must carry a Host header (RFC 9112, section 3.2)")
        if self.allows(host):
            return None
        shown = host[:100]
        self._note(shown)
        return answer(
            "421 MISDIRECTED REQUEST", error="misdirected request", host=shown, setting=SETTING,
            message=f"this proxy does not answer as {shown!r}: it answers only through its own host names (its "
                    "start-up log lists them), so that no web page can use it through a name of its own (DNS "
                    f"rebinding). To use it through this name, add the name to {SETTING}",
        )

    def _note(self, host: str) -> None:
        """One log line per refused name and process (a page that keeps trying is one line, not thousands)."""
        if not self.log_events or host in self._logged:
            return
        with self._lock:
            if host in self._logged or len(self._logged) >= _REMEMBERED:
                return
            self._logged.add(host)
        log.warning("refused requests for Host %r (not one of the proxy's names; add it to %s if it is one; "
                    "further ones for it are not logged)", host, SETTING)


def answer(status: str, **body: str) -> tuple[str, list[tuple[str, str]], bytes]:
    data = json.dumps(body).encode() + b"\n"
    return status, [("Content-Type", "application/json"), ("Content-Length", str(len(data))),
                    ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")], data
