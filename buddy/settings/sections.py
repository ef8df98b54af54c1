"""The proxy-wide sections of the config (`server`, `security`, `cache`, `throttling`, `logging`, `redis`): each
setting declared once, with its type, default, check and help (buddy.settings.declare says how). Adding a
setting is adding one declaration; the schema, `api-buddy check-config --reference` and
docs/configuration.md follow from it."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from marshmallow import ValidationError, validate

from buddy.settings.declare import (
    BOOLEAN,
    COUNTS,
    NON_NEGATIVE_INT,
    PORT,
    POSITIVE_INT,
    POSITIVE_NUMBER,
    STRING,
    STRINGS,
    refuse,
    setting,
    strings,
)
from buddy.store.redis_url import parse_redis_url

MIB = 1024 * 1024


def _check_host(value: str) -> None:
    if value == "*" or re.fullmatch(r"[A-Za-z0-9._-]+", value):
        return
    bare = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    try:
        ipaddress.IPv6Address(bare)
    except ValueError:
        raise ValidationError(f"{value!r} is not a host name: write a name or address without scheme or port "
                              "(box.example.org, 10.0.0.5, ::1), or \"*\" for any") from None


@dataclass(frozen=True)
class ServerSettings:
    """Where the proxy listens, what it accepts from clients, and the default upstream timeouts."""

    host: str = setting(STRING, "127.0.0.1", "address the proxy listens on (`api-buddy --host` and `gunicorn -b` "
                        "override it)")
    port: int = setting(PORT, 8080, "port the proxy listens on (`api-buddy --port` and `gunicorn -b` override it)")
    request_timeout: float = setting(POSITIVE_NUMBER, 30.0, "default upstream read timeout, seconds")
    connect_timeout: float = setting(POSITIVE_NUMBER, 10.0, "default upstream connect timeout, seconds")
    max_request_body: int = setting(POSITIVE_INT, 10 * MIB, "largest request body accepted, bytes (else `413`)")
    body_timeout: float = setting(POSITIVE_NUMBER, 30.0, "seconds for the whole request body after its headers, "
                                  "however slowly it trickles (else `400`)")
    header_timeout: float = setting(POSITIVE_NUMBER, 10.0, "seconds for a request's line and headers, from when the "
                                    "connection is accepted (or, on a kept-alive one, from the next request's first "
                                    "byte); else the connection is closed, like nginx's `client_header_timeout`")
    send_timeout: float = setting(POSITIVE_NUMBER, 60.0, "a client that takes nothing of its answer for this many "
                                  "seconds is closed, like nginx's `send_timeout`")
    send_buffer: int = setting(NON_NEGATIVE_INT, 128 * MIB, "bytes of answers one worker holds for clients that "
                               "read slowly, so that they hold no thread; an answer past it holds its thread until "
                               "its client has read it (each distinct body counts once, however many clients it "
                               "goes to)")
    total_timeout: float = setting(POSITIVE_NUMBER, 120.0, "default deadline for a whole upstream call (headers and "
                                   "body), seconds")
    # See buddy.hosts: a name not listed could be an attacker's, rebound to this proxy (DNS rebinding).
    allowed_hosts: tuple[str, ...] = setting(
        strings(_check_host), (), "host names the proxy answers as, besides its own (`localhost`, `127.0.0.1`, "
        "`::1`, any IP address, `server.host` and the addresses it binds, the machine's host name and FQDN): a "
        "request for any other `Host` gets `421` before anything else "
        "([why](operations.md#a-shared-box-what-one-user-can-and-cannot-do-to-another)). Names or addresses "
        "without scheme or port; `\"*\"` answers any name, for a proxy behind a reverse proxy that checks `Host` "
        "itself")


@dataclass(frozen=True)
class SecuritySettings:
    """Who may use the proxy."""

    require_secure_key: bool = setting(BOOLEAN, False, "every request (admin ones too) needs the access key")
    secure_key: str | None = setting(STRING, None, "the access key, at least 16 characters",
                                     check=validate.Length(min=16, error="must be at least 16 characters"),
                                     env="BUDDY_SECURE_KEY", default_doc="none (generated)")
    log_security_events: bool = setting(BOOLEAN, True, "log refused requests: one line per client address and "
                                        "minute, with a count (the address only, never a key), and once each "
                                        "refused `Host` name")
    max_key_failures: int = setting(NON_NEGATIVE_INT, 10, "wrong keys in a row from one client address (each within "
                                    "a minute of the last) before its requests are refused for a while (`429`, "
                                    "`Retry-After`); `0`: never ([how](operations.md#wrong-keys))")
    key_lockout_max_seconds: float = setting(POSITIVE_NUMBER, 60.0, "the longest such wait: the first is 1 s, each "
                                             "further wrong key after one doubles it")
    # Names added to server.allowed_hosts, so that a configuration that listed them keeps working.
    admin_hosts: tuple[str, ...] = setting(STRINGS, (), "the older, narrower form of `server.allowed_hosts`: still "
                                           "read, its names accepted like those (the start-up log says to move them)")


@dataclass(frozen=True)
class CacheSettings:
    """What is kept, for how long, and how requests for the same thing wait for each other."""

    default_ttl_seconds: int = setting(POSITIVE_INT, 86400, "TTL of 2xx responses, seconds")
    negative_ttl_seconds: int = setting(POSITIVE_INT, 300, "TTL of 404/410 responses, seconds")
    max_cache_response_size: int = setting(POSITIVE_INT, 10 * MIB, "larger responses stream through uncached")
    coalesce_timeout_seconds: float | None = setting(
        POSITIVE_NUMBER, None, "longest a request waits for an identical one in flight (then `504`); unset: as long "
        "as that one may take, see [coalescing](requests.md#coalescing)", default_doc="unset")
    max_relay_size: int = setting(POSITIVE_INT, 64 * MIB, "most bytes of an over-size body relayed through Redis "
                                  "to waiting requests")
    stale_if_error_seconds: int = setting(NON_NEGATIVE_INT, 7 * 86400, "how long past its TTL an entry is kept to "
                                          "answer for an upstream that fails")
    stale_while_revalidate_seconds: int = setting(NON_NEGATIVE_INT, 0, "how long past its TTL an entry is answered "
                                                  "at once while one background refresh runs")
    l1_max_bytes: int = setting(NON_NEGATIVE_INT, 32 * MIB, "each worker keeps its hottest fresh entries in memory "
                                "too, up to this many bytes (`0`: off); see "
                                "[internals](internals.md#the-hit-path-and-each-workers-memory)")
    offline: bool = setting(BOOLEAN, False, "send nothing upstream (also `api-buddy offline on` at run time)",
                            env="BUDDY_OFFLINE")
    # Accepted so that seed configurations keep loading; the cache now lives in Redis.
    database_path: str | None = setting(STRING, None, "accepted and ignored, so that older configuration files keep "
                                        "loading: the cache lives in Redis")
    max_cache_entries: int | None = setting(POSITIVE_INT, None, "accepted and ignored, so that older configuration "
                                            "files keep loading: the cache is bounded by `redis.maxmemory`")


@dataclass(frozen=True)
class ThrottlingSettings:
    """How often each upstream is called, and how long a request may be held for its turn."""

    default_requests_per_hour: int = setting(POSITIVE_INT, 1000, "upstream calls per hour for a mapping without its "
                                             "own limit")
    progressive_max_delay: float = setting(POSITIVE_NUMBER, 300.0, "longest a request is held for a slot (seconds); "
                                           "further off means `429` at once")
    max_upstream_pause: float = setting(POSITIVE_NUMBER, 3600.0, "longest pause (seconds) an upstream's "
                                        "`Retry-After` can impose on its mapping")
    domain_limits: Mapping[str, int] = setting(COUNTS, {}, "upstream calls per hour for that mapping; must name a "
                                               "configured one")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True)
class LoggingSettings:
    """The seed's logging section; it applies to gunicorn's error log too."""

    level: str = setting(STRING, "INFO", "`DEBUG`, `INFO`, `WARNING`, `ERROR` or `CRITICAL`; the whole `logging` "
                         "section applies to gunicorn's error log too",
                         check=validate.OneOf(LOG_LEVELS, error=f"must be one of {', '.join(LOG_LEVELS)}"))
    parent_logger: str | None = setting(STRING, None, "name of your program's logger to hand records to instead "
                                        "(for `CachingProxy`)")
    format: str = setting(STRING, "%(asctime)s - %(name)s - %(levelname)s - %(message)s", "log line layout")
    date_format: str = setting(STRING, "%Y-%m-%d %H:%M:%S", "how a log line's time is written")
    enable_console: bool = setting(BOOLEAN, True, "log to stderr")
    enable_file: bool = setting(BOOLEAN, False, "log to a rotating file, `file_path`")
    file_path: str | None = setting(STRING, None, "the log file (with `enable_file`)")
    max_file_size: int = setting(POSITIVE_INT, 10 * MIB, "bytes before the log file is rotated")
    backup_count: int = setting(NON_NEGATIVE_INT, 5, "rotated log files kept")


def _redis_url(url: str) -> None:
    """One server (redis://, rediss://, unix://), a Redis Cluster (redis+cluster://host:port,...) or a Sentinel
    service (redis+sentinel://host:port,.../name); the message says what is wrong (see buddy.store.connect)."""
    if url:
        try:
            parse_redis_url(url)
        except ValueError as exc:
            raise ValidationError(str(exc)) from None


def _prefix_on_a_cluster(section: dict[str, Any]) -> None:
    """On a Redis Cluster the prefix must not hold a hash tag."""
    url, prefix = section.get("url"), section.get("prefix") or ""
    if url and parse_redis_url(url).kind == "cluster" and ("{" in prefix or "}" in prefix):
        refuse("must not contain '{' or '}' on a Redis Cluster: it would be every key's hash tag and put the whole "
               "cache in one slot, on one node", "prefix")


@dataclass(frozen=True)
class RedisSettings:
    """The Redis that holds every piece of shared state: an external one, or the built-in one's folder and cap."""

    section_checks: ClassVar = (_prefix_on_a_cluster,)

    url: str | None = setting(STRING, None, "a Redis to use instead of the built-in one; see "
                              "[Redis URLs](#redis-urls)", check=_redis_url, env="REDIS_URL")
    prefix: str = setting(STRING, "buddy:", "prefix of every key (at most 64 characters), so several proxies can "
                          "share one Redis", check=validate.Length(max=64, error="must be at most 64 characters"))
    data_dir: str | None = setting(STRING, None, "folder of the built-in Redis", env="BUDDY_DATA_DIR",
                                   default_doc="see [where the data lives](running.md#where-the-data-lives)")
    maxmemory: str = setting(STRING, "1gb", "memory cap of the built-in Redis (least recently used entries go "
                             "first); see [when Redis is full](running.md#when-redis-is-full)",
                             check=validate.Regexp(r"^\d+(b|kb|mb|gb)?$", flags=re.I,
                                                   error="must be a size such as 512mb or 2gb"))
    socket_timeout: float = setting(POSITIVE_NUMBER, 5.0, "seconds a connection to Redis may take to set up, and a "
                                    "blocking read may wait (a coalesced request waiting for the next piece of a "
                                    "relayed body); ordinary commands give up sooner (`redis.command_timeout`), see "
                                    "[a Redis that is down or hung](running.md#a-redis-that-is-down-or-hung)")
    command_timeout: float = setting(POSITIVE_NUMBER, 0.5, "seconds an ordinary command (and the outage probe) may "
                                     "take before Redis counts as down for it (at most `redis.socket_timeout`): what "
                                     "a hung Redis costs a worker")
