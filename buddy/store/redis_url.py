"""What a `redis.url` names, checked before anything connects, so that a typo is a config error that says what
is wrong; and the URL as it may be shown (no password).

    redis://[user:password@]host:port/db, rediss://..., unix:///path?db=N   one server (redis-py's from_url)
    redis+cluster://[user:password@]host:port[,host:port...]                a Redis Cluster, found from seed nodes
    redis+sentinel://[user:password@]host:port[,host:port...]/service      the primary that Sentinel names `service`
    rediss+cluster://, rediss+sentinel://                                    the same over TLS
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote

from redis.connection import parse_url

SINGLE_SCHEMES = ("redis", "rediss", "unix")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
SCHEMES = SINGLE_SCHEMES + CLUSTER_SCHEMES + SENTINEL_SCHEMES
DEFAULT_PORTS = {"cluster": 6379, "sentinel": 26379}
EXAMPLES = {
    "cluster": "redis+cluster://10.0.0.1:6379,10.0.0.2:6379",
    "sentinel": "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379,10.0.0.3:26379/mymaster",
}
TLS_OPTIONS = ("ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")  # when the sentinels want credentials of their own
CERT_REQS = ("required", "optional", "none")
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(?::(\d{1,5}))?$")


@dataclass(frozen=True)
class RedisTarget:
    """What a `redis.url` names: its kind, its hosts (seed nodes, sentinels), and how to talk to them."""

    kind: str  # "single", "cluster" or "sentinel"
    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    service: str = ""
    username: str | None = None
    password: str | None = None
    tls: bool = False
    db: int = 0
    options: dict[str, str] = field(default_factory=dict)


def parse_redis_url(url: str) -> RedisTarget:
    """The target of a `redis.url`; ValueError saying exactly what is wrong (never quoting the password)."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        close = difflib.get_close_matches(scheme, SCHEMES, n=1, cutoff=0.6) if sep else []
        hint = f" (did you mean {close[0]}://?)" if close else ""
        raise ValueError("must start with redis://, rediss:// or unix:// (one server), redis+cluster:// or rediss+"
                         f"cluster:// (a Redis Cluster), redis+sentinel:// or rediss+sentinel:// (Sentinel){hint}")
    if scheme in SINGLE_SCHEMES:
        return _single(url, scheme, rest)
    kind = "cluster" if scheme in CLUSTER_SCHEMES else "sentinel"
    if "#" in rest:
        raise ValueError("must not have a fragment ('#'); percent-encode a '#' in the password as %23")
    rest, _, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    if "@" in path or "@" in query:  # not quoted: a '/' or '?' in the password cut the user part short
        raise ValueError("the user:password part must percent-encode '/', '?' and '#' (as %2F, %3F and %23)")
    userinfo, at, hosts = authority.rpartition("@")
    if not at:
        userinfo, hosts = "", authority
    username, password = _credentials(userinfo) if at else (None, None)
    nodes = tuple(_host_port(item, DEFAULT_PORTS[kind], scheme) for item in hosts.split(",")) if hosts else ()
    if not nodes:
        raise ValueError(f"{scheme}:// needs at least one host:port, e.g. {_example(kind, scheme)}")
    service, db = "", 0
    segments = [unquote(s) for s in path.split("/")] if slash and path else []
    if kind == "cluster":
        if segments and segments != ["0"]:
            raise ValueError(f"a Redis Cluster has only database 0; remove '/{path}' from the URL")
    else:
        if not segments or not segments[0]:
            raise ValueError(f"{scheme}:// needs the Sentinel service name as its path, e.g. {_example(kind, scheme)}")
        if len(segments) > 2 or (len(segments) == 2 and not segments[1].isdigit()):
            raise ValueError(f"the path must be /service_name or /service_name/db (db a number), not '/{path}'")
        service, db = segments[0], int(segments[1]) if len(segments) == 2 else 0
    options = _options(query, kind, scheme)
    return RedisTarget(kind, url, nodes, service, username, password, scheme.startswith("rediss"), db, options)


def _single(url: str, scheme: str, rest: str) -> RedisTarget:
    authority = rest.split("/", 1)[0].split("?", 1)[0].rpartition("@")[2]
    if scheme != "unix" and "," in authority:
        raise ValueError(f"names several hosts: use {'rediss' if scheme == 'rediss' else 'redis'}+cluster:// for a "
                         f"Redis Cluster, or redis+sentinel://host:port,.../service_name for Sentinel")
    try:
        parsed = parse_url(url)
    except ValueError as exc:
        raise ValueError(f"is not a valid Redis URL: {exc}") from None
    if scheme != "unix" and not parsed.get("host"):
        raise ValueError(f"{scheme}:// needs a host, e.g. {scheme}://127.0.0.1:6379/0")
    return RedisTarget("single", url, db=int(parsed.get("db") or 0))


def _credentials(userinfo: str) -> tuple[str | None, str | None]:
    user, _, password = userinfo.partition(":")  # user@host names a user only, as in redis-py's redis:// URLs
    return unquote(user) or None, unquote(password) or None


def _host_port(item: str, default_port: int, scheme: str) -> tuple[str, int]:
    item = item.strip()
    if not item:
        raise ValueError(f"the hosts of {scheme}:// have an empty entry (two commas in a row, or one at an end)")
    match = _HOST.match(item)
    if not match:
        host, colon, port = item.rpartition(":")
        if colon and host and not host.endswith(":") and not port.isdigit():
            raise ValueError(f"'{item}': the port must be a number from 1 to 65535, not '{port}'")
        raise ValueError(f"'{item}' is not host:port (IPv6 addresses go in brackets: [::1]:6379)")
    host, port = match.group(1).strip("[]"), match.group(2)
    number = int(port) if port else default_port
    if not 1 <= number <= 65535:
        raise ValueError(f"'{item}': the port must be a number from 1 to 65535, not {port}")
    return host, number


def _options(query: str, kind: str, scheme: str) -> dict[str, str]:
    known = TLS_OPTIONS + (SENTINEL_OPTIONS if kind == "sentinel" else ())
    options: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in known:
            raise ValueError(f"unknown option '{name}' in {scheme}:// (known: {', '.join(known)})")
        if name in TLS_OPTIONS and not scheme.startswith("rediss"):
            raise ValueError(f"option '{name}' is for TLS: start the URL with {scheme.replace('redis', 'rediss', 1)}://")
        if name == "ssl_cert_reqs" and value not in CERT_REQS:
            raise ValueError(f"ssl_cert_reqs must be one of {', '.join(CERT_REQS)}, not '{value}'")
        if name == "ssl_check_hostname" and value.lower() not in ("true", "false"):
            raise ValueError(f"ssl_check_hostname must be true or false, not '{value}'")
        options[name] = value
    return options


def _example(kind: str, scheme: str) -> str:
    return EXAMPLES[kind].replace("redis+", scheme.split("+")[0] + "+", 1)



def redacted(url: str) -> str:
    """`url` fit to show: a password in the user part, or in a ?password= or ?sentinel_password= option, is ***."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    rest, question, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    userinfo, at, hosts = authority.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        authority = f"{user}:***@{hosts}" if colon else f"{user}@{hosts}"
    if query:
        pairs = []
        for pair in query.split("&"):
            name, equals, value = pair.partition("=")
            pairs.append(f"{name}=***" if equals and name.lower() in ("password", "sentinel_password") else pair)
        query = "&".join(pairs)
    return f"{scheme}://{authority}{slash}{path}{question}{query}"
