"""One `domain_mappings.<name>` table: its settings declared once (MappingSettings), and resolved against the
proxy-wide sections into what every request reads (DomainSettings: each default filled in, the upstream URL
taken apart, the rate limit and the coalesce timeout worked out)."""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from marshmallow import ValidationError, validate

from buddy.fingerprint import CREDENTIAL_HEADERS
from buddy.settings.declare import (
    BOOLEAN,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    POSITIVE_NUMBER,
    REQUIRED,
    STRING,
    STRINGS,
    number,
    setting,
    shown,
)
from buddy.settings.sections import CacheSettings, ServerSettings, ThrottlingSettings

RESERVED_NAMES = frozenset({"admin", "metrics"})
DOMAIN_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
VARY_HEADERS = ("Accept", "Accept-Language")  # a mapping's vary_headers unless it names its own


def _check_upstream(value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError("must be an http:// or https:// URL with a host")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValidationError("must not carry credentials, a query or a fragment")
    try:
        _ = parts.port  # raises for a port out of range
    except ValueError as exc:
        raise ValidationError("has an invalid port") from exc


def _falls_back(setting: str) -> str:
    return f"`{setting}`"


@dataclass(frozen=True)
class MappingSettings:
    """One mapping as configured; an unset value (None) falls back to the proxy-wide one named in its docs."""

    upstream: str = setting(STRING, REQUIRED, "`http(s)://host[:port][/base/path]`; no credentials, query or "
                            "fragment", check=_check_upstream)
    ttl_seconds: int | None = setting(POSITIVE_INT, None, "how long 2xx responses are kept, seconds",
                                      default_doc=_falls_back("cache.default_ttl_seconds"))
    negative_ttl_seconds: int | None = setting(POSITIVE_INT, None, "how long 404/410 responses are kept, seconds",
                                               default_doc=_falls_back("cache.negative_ttl_seconds"))
    vary_headers: tuple[str, ...] | None = setting(STRINGS, None, "request headers whose values are part of the "
                                                   "cache key", default_doc=f"`{shown(VARY_HEADERS)}`")
    share_across_credentials: bool = setting(BOOLEAN, False, "one cache entry for all callers, whatever credentials "
                                             "they send")
    respect_upstream_cache_control: bool = setting(
        BOOLEAN, True, "`false`: store and share answers whatever their `private`, `no-store` and `Vary` say (only "
        "for upstreams whose answers never depend on who asks)")
    ttl_from_upstream: bool = setting(BOOLEAN, False, "`true`: standards mode, an RFC 9111 shared cache: keep answers "
                                      "for the freshness the upstream gives them (`s-maxage`, `max-age`), at most "
                                      "`ttl_seconds` (see [caching.md](caching.md))")
    stale_if_error_seconds: int | None = setting(
        NON_NEGATIVE_INT, None, "how long past its TTL an entry may answer for an upstream that fails; see "
        "[stale answers](requests.md#stale-answers)", default_doc=_falls_back("cache.stale_if_error_seconds"))
    stale_while_revalidate_seconds: int | None = setting(
        NON_NEGATIVE_INT, None, "how long past its TTL an entry is answered at once while one background refresh "
        "runs", default_doc=_falls_back("cache.stale_while_revalidate_seconds"))
    credential_headers: tuple[str, ...] | None = setting(
        STRINGS, None, "request headers whose values partition the cache (add `Cookie` for an API that "
        "authenticates by cookie)", default_doc=", ".join(f"`{name}`" for name in CREDENTIAL_HEADERS))
    credential_params: tuple[str, ...] | None = setting(
        STRINGS, None, "query parameters that carry an upstream credential, besides the usual ones: an export "
        "leaves out every entry whose query has one (see [operations](operations.md))", default_doc="none")
    connect_timeout: float | None = setting(POSITIVE_NUMBER, None, "seconds to connect upstream (else `504`)",
                                            default_doc=_falls_back("server.connect_timeout"))
    read_timeout: float | None = setting(POSITIVE_NUMBER, None, "seconds to wait for each read from upstream (else "
                                         "`504`)", default_doc=_falls_back("server.request_timeout"))
    total_timeout: float | None = setting(POSITIVE_NUMBER, None, "seconds for a whole upstream call, however slowly "
                                          "it trickles (else `504`, nothing stored)",
                                          default_doc=_falls_back("server.total_timeout"))
    max_requests_per_second: int | None = setting(POSITIVE_INT, None, "upstream calls allowed per second, for all "
                                                  "workers together")
    max_requests_per_minute: int | None = setting(POSITIVE_INT, None, "upstream calls allowed per minute, for all "
                                                  "workers together")
    rate_limit_per_credential: bool = setting(
        BOOLEAN, False, "`true`: each set of upstream credentials (an API key) gets the mapping's limits for itself, "
        "for upstreams that count each key's requests")
    cost_per_call: float | None = setting(
        number(positive=False, at_most=1_000_000), None,
        "what one upstream call costs (0 to 1,000,000), in `cost_currency`; the dashboard shows calls avoided × "
        "cost as money saved")
    cost_currency: str | None = setting(
        STRING, None, "what `cost_per_call` is counted in (`USD`, 1 to 8 characters)", check=validate.Regexp(
            r"^\S{1,8}$", error="must be a short currency name such as USD or EUR (1 to 8 characters, no spaces)"))


@dataclass(frozen=True)
class DomainSettings:
    """One upstream mapping, with every default already resolved."""

    name: str
    upstream: str
    scheme: str
    netloc: str
    base_path: str
    upstream_id: str  # scheme://host:port/base-path, default port made explicit: part of every cache key
    ttl_seconds: int
    negative_ttl_seconds: int
    vary_headers: tuple[str, ...]
    share_across_credentials: bool
    respect_upstream_cache_control: bool
    ttl_from_upstream: bool
    stale_if_error: int  # seconds past its TTL an entry may answer for an upstream that fails
    stale_while_revalidate: int  # seconds past its TTL an entry answers at once while one refresh runs
    credential_headers: frozenset[str]
    connect_timeout: float
    read_timeout: float
    total_timeout: float  # a whole upstream call: connect, headers and body
    coalesce_timeout: float  # how long a request waits for an identical one that fetches
    max_requests_per_second: int | None
    max_requests_per_minute: int | None
    max_requests_per_hour: int
    rate_limit_per_credential: bool = False  # the limits apply to each credential partition, not to the mapping
    cost_per_call: float | None = None  # what one upstream call costs, in cost_currency (dashboard estimate)
    cost_currency: str | None = None
    # Query parameters that carry an upstream credential, besides the default list (buddy.archive.credentials):
    # an export leaves out every entry whose query has one.
    credential_params: frozenset[str] = frozenset()

    @property
    def grace(self) -> int:
        """How long past its TTL Redis keeps an entry: the longer of the two stale windows."""
        return max(self.stale_if_error, self.stale_while_revalidate)


LEADER_MARGIN_SECONDS = 2.0


def leader_budget(max_delay: float, total_timeout: float) -> float:
    """The longest a live leader may legitimately take: wait for its rate-limit slot, then one upstream call."""
    return max_delay + total_timeout + LEADER_MARGIN_SECONDS


def _upstream_id(parts: SplitResult) -> str:
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}:{port}{parts.path.rstrip('/')}"


def _or_default(value: int | None, default: int) -> int:
    return default if value is None else value  # 0 is a value here, not "unset"


def coalesce_problem(name: str, spec: MappingSettings, cache: CacheSettings, server: ServerSettings,
                     throttling: ThrottlingSettings) -> str | None:
    """An explicit coalesce timeout shorter than this mapping's leader budget would 504 requests whose leader is
    still legitimately at work (waiting for a slot, then reading): the problem, naming both settings."""
    explicit = cache.coalesce_timeout_seconds
    if explicit is None:
        return None
    max_delay = throttling.progressive_max_delay
    total = spec.total_timeout or server.total_timeout
    needed = leader_budget(max_delay, total)
    if explicit >= needed:
        return None
    return (f"cache.coalesce_timeout_seconds: {explicit:g} s is shorter than a fetch for '{name}' may take "
            f"(throttling.progressive_max_delay {max_delay:g} s + total_timeout {total:g} s + "
            f"{LEADER_MARGIN_SECONDS:g} s): requests waiting on it would give up while it still works; set it "
            f"to at least {needed:g}, lower throttling.progressive_max_delay or the total_timeout, or leave it unset")


def resolve(name: str, spec: MappingSettings, cache: CacheSettings, server: ServerSettings,
            throttling: ThrottlingSettings) -> DomainSettings:
    """The mapping as requests read it: each unset value from its proxy-wide default."""
    parts = urlsplit(spec.upstream)
    vary = spec.vary_headers if spec.vary_headers is not None else VARY_HEADERS
    credentials = spec.credential_headers if spec.credential_headers is not None else CREDENTIAL_HEADERS
    total = spec.total_timeout or server.total_timeout
    return DomainSettings(
        name=name,
        upstream=spec.upstream.rstrip("/"),
        scheme=parts.scheme,
        netloc=parts.netloc.lower(),
        base_path=parts.path.rstrip("/"),
        upstream_id=_upstream_id(parts),
        ttl_seconds=spec.ttl_seconds or cache.default_ttl_seconds,
        negative_ttl_seconds=spec.negative_ttl_seconds or cache.negative_ttl_seconds,
        vary_headers=tuple(sorted({h.lower() for h in vary})),
        share_across_credentials=spec.share_across_credentials,
        respect_upstream_cache_control=spec.respect_upstream_cache_control,
        ttl_from_upstream=spec.ttl_from_upstream,
        stale_if_error=_or_default(spec.stale_if_error_seconds, cache.stale_if_error_seconds),
        stale_while_revalidate=_or_default(spec.stale_while_revalidate_seconds, cache.stale_while_revalidate_seconds),
        credential_headers=frozenset(sorted({h.lower() for h in credentials})),
        connect_timeout=spec.connect_timeout or server.connect_timeout,
        read_timeout=spec.read_timeout or server.request_timeout,
        total_timeout=total,
        coalesce_timeout=cache.coalesce_timeout_seconds or leader_budget(throttling.progressive_max_delay, total),
        max_requests_per_second=spec.max_requests_per_second,
        max_requests_per_minute=spec.max_requests_per_minute,
        max_requests_per_hour=throttling.domain_limits.get(name, throttling.default_requests_per_hour),
        rate_limit_per_credential=spec.rate_limit_per_credential,
        cost_per_call=spec.cost_per_call,
        cost_currency=spec.cost_currency,
        credential_params=frozenset(p.lower() for p in spec.credential_params or ()),
    )
