"""Configuration: marshmallow schemas, load order (defaults, file, env, overrides), frozen settings."""
from __future__ import annotations

import copy
import ipaddress
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import SplitResult, urlsplit

from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from buddy.errors import ConfigError
from buddy.fingerprint import CREDENTIAL_HEADERS
from buddy.store.redis_url import parse_redis_url

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RESERVED_NAMES = frozenset({"admin", "metrics"})
DOMAIN_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"

EXAMPLE_MAPPINGS: dict[str, dict[str, Any]] = {
    "conceptnet": {"upstream": "https://api.conceptnet.io"},
    "dbpedia": {"upstream": "https://lookup.dbpedia.org"},
    "wikidata": {"upstream": "https://www.wikidata.org"},
    "wikidata-sparql": {"upstream": "https://query.wikidata.org"},
}


def _positive_int(**kwargs: Any) -> fields.Integer:
    message = "must be a positive integer"
    return fields.Integer(
        strict=True,
        validate=validate.Range(min=1, error=message),
        error_messages={"invalid": message, "null": message},
        **kwargs,
    )


def _non_negative_int(**kwargs: Any) -> fields.Integer:
    message = "must be 0 or a positive integer"
    return fields.Integer(
        strict=True,
        validate=validate.Range(min=0, error=message),
        error_messages={"invalid": message, "null": message},
        **kwargs,
    )


def _positive_number(**kwargs: Any) -> fields.Float:
    message = "must be a positive number"
    return fields.Float(
        validate=validate.Range(min=0, min_inclusive=False, error=message),
        error_messages={"invalid": message, "null": message},
        **kwargs,
    )


def _non_negative_number(at_most: float | None = None, **kwargs: Any) -> fields.Float:
    message = "must be 0 or a positive number" + ("" if at_most is None else f" up to {at_most:g}")
    return fields.Float(
        validate=validate.Range(min=0, max=at_most, error=message),
        error_messages={"invalid": message, "null": message, "special": message},
        **kwargs,
    )


def _boolean(**kwargs: Any) -> fields.Boolean:
    return fields.Boolean(
        truthy={True}, falsy={False}, error_messages={"invalid": "must be true or false"}, **kwargs
    )


def _string(**kwargs: Any) -> fields.String:
    return fields.String(error_messages={"invalid": "must be a string"}, **kwargs)


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


def _check_host(value: str) -> None:
    if value == "*" or re.fullmatch(r"[A-Za-z0-9._-]+", value):
        return
    bare = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    try:
        ipaddress.IPv6Address(bare)
    except ValueError:
        raise ValidationError(f"{value!r} is not a host name: write a name or address without scheme or port "
                              "(box.example.org, 10.0.0.5, ::1), or \"*\" for any") from None


class _Section(Schema):
    class Meta:
        # Unknown keys are errors: a typo must never be silently ignored.
        unknown = "raise"


class DomainSchema(_Section):
    upstream = _string(required=True, validate=_check_upstream)
    ttl_seconds = _positive_int(load_default=None, allow_none=True)
    negative_ttl_seconds = _positive_int(load_default=None, allow_none=True)
    vary_headers = fields.List(_string(), load_default=None, allow_none=True)
    share_across_credentials = _boolean(load_default=False)
    respect_upstream_cache_control = _boolean(load_default=True)
    ttl_from_upstream = _boolean(load_default=False)  # the upstream's s-maxage/max-age, at most ttl_seconds
    stale_if_error_seconds = _non_negative_int(load_default=None, allow_none=True)
    stale_while_revalidate_seconds = _non_negative_int(load_default=None, allow_none=True)
    credential_headers = fields.List(_string(), load_default=None, allow_none=True)
    credential_params = fields.List(_string(), load_default=None, allow_none=True)  # (besides buddy.archive's list)
    connect_timeout = _positive_number(load_default=None, allow_none=True)
    read_timeout = _positive_number(load_default=None, allow_none=True)
    total_timeout = _positive_number(load_default=None, allow_none=True)
    max_requests_per_second = _positive_int(load_default=None, allow_none=True)
    max_requests_per_minute = _positive_int(load_default=None, allow_none=True)
    # Each set of upstream credentials (a key of a search or LLM API) gets the limits above for itself.
    rate_limit_per_credential = _boolean(load_default=False)
    # What one upstream call costs, for the dashboard's estimate of money saved (calls avoided x cost).
    cost_per_call = _non_negative_number(load_default=None, allow_none=True, at_most=1_000_000)
    cost_currency = _string(load_default=None, allow_none=True, validate=validate.Regexp(
        r"^\S{1,8}$", error="must be a short currency name such as USD or EUR (1 to 8 characters, no spaces)"))


class ServerSchema(_Section):
    host = _string(load_default="127.0.0.1")
    port = fields.Integer(
        strict=True,
        load_default=8080,
        validate=validate.Range(min=1, max=65535, error="must be a port number (1-65535)"),
        error_messages={"invalid": "must be a port number (1-65535)"},
    )
    request_timeout = _positive_number(load_default=30.0)
    connect_timeout = _positive_number(load_default=10.0)
    max_request_body = _positive_int(load_default=10 * 1024 * 1024)
    body_timeout = _positive_number(load_default=30.0)  # for the whole request body, not for each read
    header_timeout = _positive_number(load_default=10.0)  # for the request line and headers, like nginx's
    send_timeout = _positive_number(load_default=60.0)  # a client that takes nothing of its answer for this long
    send_buffer = _non_negative_int(load_default=128 * 1024 * 1024)  # bytes one worker holds for slow readers
    total_timeout = _positive_number(load_default=120.0)  # for a whole upstream call, however it trickles
    # Host names the proxy answers through besides its own (loopback, IP addresses, server.host, the machine's
    # names); "*" for any, behind a reverse proxy that checks Host itself (see buddy.hosts).
    allowed_hosts = fields.List(_string(validate=_check_host), load_default=list)


class SecuritySchema(_Section):
    require_secure_key = _boolean(load_default=False)
    secure_key = _string(
        load_default=None, allow_none=True, validate=validate.Length(min=16, error="must be at least 16 characters")
    )
    log_security_events = _boolean(load_default=True)
    # Wrong keys in a row from one client address before it must wait (0: never); the waits double, up to:
    max_key_failures = _non_negative_int(load_default=10)
    key_lockout_max_seconds = _positive_number(load_default=60.0)
    # The older, narrower form of server.allowed_hosts (names for the dashboard's buttons): still read, as
    # names added to server.allowed_hosts, so that a configuration that listed them keeps working.
    admin_hosts = fields.List(_string(), load_default=list)


class CacheSchema(_Section):
    default_ttl_seconds = _positive_int(load_default=86400)
    negative_ttl_seconds = _positive_int(load_default=300)
    max_cache_response_size = _positive_int(load_default=10 * 1024 * 1024)
    # Unset: a coalesced request waits as long as its leader may legitimately take (see leader_budget).
    coalesce_timeout_seconds = _positive_number(load_default=None, allow_none=True)
    max_relay_size = _positive_int(load_default=64 * 1024 * 1024)
    # How long an expired entry is kept: served when the upstream fails, or while one background refresh runs.
    stale_if_error_seconds = _non_negative_int(load_default=7 * 86400)
    stale_while_revalidate_seconds = _non_negative_int(load_default=0)
    # Each worker keeps its hottest fresh entries in memory too (L1), up to this many bytes; 0 turns it off.
    l1_max_bytes = _non_negative_int(load_default=32 * 1024 * 1024)
    offline = _boolean(load_default=False)  # nothing reaches any upstream (also BUDDY_OFFLINE=1, `buddy offline on`)
    # Accepted so that seed configurations keep loading; the cache now lives in Redis.
    database_path = _string(load_default=None, allow_none=True)
    max_cache_entries = _positive_int(load_default=None, allow_none=True)


class ThrottlingSchema(_Section):
    default_requests_per_hour = _positive_int(load_default=1000)
    progressive_max_delay = _positive_number(load_default=300.0)
    max_upstream_pause = _positive_number(load_default=3600.0)  # the longest Retry-After any upstream can impose
    domain_limits = fields.Dict(keys=fields.String(), values=_positive_int(), load_default=dict)


class LoggingSchema(_Section):
    level = _string(
        load_default="INFO",
        validate=validate.OneOf(
            ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
            error="must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
        ),
    )
    parent_logger = _string(load_default=None, allow_none=True)
    format = _string(load_default="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    date_format = _string(load_default="%Y-%m-%d %H:%M:%S")
    enable_console = _boolean(load_default=True)
    enable_file = _boolean(load_default=False)
    file_path = _string(load_default=None, allow_none=True)
    max_file_size = _positive_int(load_default=10 * 1024 * 1024)
    backup_count = fields.Integer(
        strict=True, load_default=5, validate=validate.Range(min=0, error="must be 0 or more")
    )


class RedisSchema(_Section):
    url = _string(load_default=None, allow_none=True)
    prefix = _string(load_default="buddy:", validate=validate.Length(max=64, error="must be at most 64 characters"))
    data_dir = _string(load_default=None, allow_none=True)
    maxmemory = _string(
        load_default="1gb",
        validate=validate.Regexp(r"^\d+(b|kb|mb|gb)?$", flags=re.I, error="must be a size such as 512mb or 2gb"),
    )
    socket_timeout = _positive_number(load_default=5.0)
    # Ordinary commands and the outage probe give up sooner (at most socket_timeout): a hung Redis costs that.
    command_timeout = _positive_number(load_default=0.5)

    @validates_schema
    def _check_url(self, data: dict[str, Any], **_: Any) -> None:
        """One server (redis://, rediss://, unix://), a Redis Cluster (redis+cluster://host:port,...) or a Sentinel
        service (redis+sentinel://host:port,.../name); the message says what is wrong (see buddy.store.connect)."""
        url = data.get("url")
        if url:
            try:
                target = parse_redis_url(url)
            except ValueError as exc:
                raise ValidationError(str(exc), "url") from None
            prefix = data.get("prefix") or ""
            if target.kind == "cluster" and ("{" in prefix or "}" in prefix):
                raise ValidationError("must not contain '{' or '}' on a Redis Cluster: it would be every key's hash "
                                      "tag and put the whole cache in one slot, on one node", "prefix")


class ConfigSchema(_Section):
    domain_mappings = fields.Dict(
        keys=fields.String(
            validate=validate.Regexp(DOMAIN_NAME, error="is not a valid name (letters, digits, '.', '_', '-')")
        ),
        values=fields.Nested(DomainSchema),
        required=True,
        validate=validate.Length(min=1, error="must map at least one domain"),
    )
    server = fields.Nested(ServerSchema)
    security = fields.Nested(SecuritySchema)
    cache = fields.Nested(CacheSchema)
    throttling = fields.Nested(ThrottlingSchema)
    logging = fields.Nested(LoggingSchema)
    redis = fields.Nested(RedisSchema)

    @validates_schema(skip_on_field_errors=False)
    def _check_names(self, data: dict[str, Any], **_: Any) -> None:
        errors: dict[str, Any] = {}
        for name in (data.get("domain_mappings") or {}):
            if name.lower() in RESERVED_NAMES:
                errors[name] = [f"'{name}' is reserved for the proxy's own routes"]
        limits = (data.get("throttling") or {}).get("domain_limits") or {}
        mapped = data.get("domain_mappings") or {}
        unknown = {n: ["names no configured domain"] for n in limits if n not in mapped}
        if errors:
            raise ValidationError({"domain_mappings": errors})
        if unknown:
            raise ValidationError({"throttling": {"domain_limits": unknown}})


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


@dataclass(frozen=True)
class Settings:
    """The validated configuration; `raw` keeps the section dictionaries for the CLI and sub-parts."""

    domains: Mapping[str, DomainSettings]
    server: Mapping[str, Any]
    security: Mapping[str, Any]
    cache: Mapping[str, Any]
    throttling: Mapping[str, Any]
    logging: Mapping[str, Any]
    redis: Mapping[str, Any]

    @property
    def data_dir(self) -> Path:
        return Path(self.redis["data_dir"] or default_data_dir()).expanduser()


def default_data_dir() -> Path:
    """Where the embedded Redis keeps its files unless `redis.data_dir` or BUDDY_DATA_DIR says otherwise."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "reference-api-buddy"


def _flatten(messages: Any, path: str = "") -> list[str]:
    if isinstance(messages, dict):
        lines: list[str] = []
        for key, value in messages.items():
            if key == "value":  # marshmallow nests Dict value errors one level deeper
                lines += _flatten(value, path)
            elif key == "key":
                lines += _flatten(value, path)
            elif key == "_schema":
                lines += _flatten(value, path)
            else:
                lines += _flatten(value, f"{path}.{key}" if path else str(key))
        return lines
    if isinstance(messages, list):
        lines = []
        for item in messages:
            lines += _flatten(item, path) if isinstance(item, (dict, list)) else [_line(path, item)]
        return lines
    return [_line(path, messages)]


def _line(path: str, message: Any) -> str:
    text = str(message)
    if text == "Unknown field.":
        text = "unknown key"
    elif text == "Missing data for required field.":
        text = "is required"
    elif text in ("Invalid input type.", "Not a valid mapping type."):
        text = "must be a table/object"
    elif text == "Not a valid list.":
        text = "must be a list"
    return f"{path or '<config>'}: {text}"


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Merge override into base, section by section; domain_mappings is replaced, not merged."""
    result = copy.deepcopy(dict(base))
    for key, value in override.items():
        if key != "domain_mappings" and isinstance(result.get(key), dict) and isinstance(value, Mapping):
            result[key] = deep_merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


CONFIG_FORMATS = {".json": "JSON", ".toml": "TOML"}  # a file with no extension is read as JSON
ENVIRONMENT_VARIABLES = {  # variable -> (section, key) it sets, over the config file
    "REDIS_URL": ("redis", "url"),
    "BUDDY_DATA_DIR": ("redis", "data_dir"),
    "BUDDY_SECURE_KEY": ("security", "secure_key"),
    "BUDDY_OFFLINE": ("cache", "offline"),
}


def read_config_file(path: str | os.PathLike[str], source: str = "BUDDY_CONFIG") -> dict[str, Any]:
    """Read a JSON (.json, or no extension) or TOML (.toml) configuration file; a problem is named by `source`,
    where the path came from (the variable, or `--config`)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix and suffix not in CONFIG_FORMATS:
        raise ConfigError([f"{source}: {path}: '{path.suffix}' files are not supported; "
                           "the config file must be JSON (.json) or TOML (.toml)"])
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read {path}: {exc.strerror}"]) from exc
    kind = CONFIG_FORMATS.get(suffix, "JSON")
    try:
        data = tomllib.loads(text.decode()) if kind == "TOML" else json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{source}: {path} is not valid {kind}: {exc}"]) from exc
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: {path} must hold an object/table at the top level"])
    return data


def _switch(value: str) -> bool | str:
    """BUDDY_OFFLINE=1/true/yes/on or 0/false/no/off; anything else is left for validation to refuse by name."""
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    return value


def environment_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """The few settings people set per machine."""
    overrides: dict[str, Any] = {}
    for variable, (section, key) in ENVIRONMENT_VARIABLES.items():
        value = environ.get(variable)
        if value:
            overrides.setdefault(section, {})[key] = _switch(value) if key == "offline" else value
    return overrides


def load_settings(overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Defaults, then the BUDDY_CONFIG file, then environment, then `overrides`; raise ConfigError listing every
    bad field, by its environment variable when that is where the value came from."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    if environ.get("BUDDY_CONFIG"):
        raw = read_config_file(environ["BUDDY_CONFIG"])
    from_environment = environment_overrides(environ)
    raw = deep_merge(raw, from_environment)
    if overrides:
        raw = deep_merge(raw, overrides)
    try:
        return validate_config(raw)
    except ConfigError as exc:
        names = {
            f"{section}.{key}: ": f"{variable}: " for variable, (section, key) in ENVIRONMENT_VARIABLES.items()
            if key in from_environment.get(section, {}) and key not in ((overrides or {}).get(section) or {})
        }
        raise ConfigError([_named_by_variable(problem, names) for problem in exc.problems]) from None


def _named_by_variable(problem: str, names: Mapping[str, str]) -> str:
    for path, variable in names.items():
        if problem.startswith(path):
            return variable + problem[len(path):]
    return problem


def validate_config(raw: Mapping[str, Any]) -> Settings:
    """Validate one configuration dictionary in the seed's shape."""
    if not isinstance(raw, Mapping):
        raise ConfigError(["<config>: must be a dictionary"])
    raw = dict(raw)
    if raw.get("domain_mappings") is None:
        raw["domain_mappings"] = EXAMPLE_MAPPINGS
    for section in ("server", "security", "cache", "throttling", "logging", "redis"):
        raw.setdefault(section, {})  # so each section's own defaults apply
    try:
        data = ConfigSchema().load(raw)
    except ValidationError as exc:
        raise ConfigError(sorted(set(_flatten(exc.messages)))) from None
    return _build(data)


LEADER_MARGIN_SECONDS = 2.0


def leader_budget(max_delay: float, total_timeout: float) -> float:
    """The longest a live leader may legitimately take: wait for its rate-limit slot, then one upstream call."""
    return max_delay + total_timeout + LEADER_MARGIN_SECONDS


def _upstream_id(parts: SplitResult) -> str:
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}:{port}{parts.path.rstrip('/')}"


def _coalesce_problems(data: dict[str, Any]) -> list[str]:
    """An explicit coalesce timeout shorter than some leader's budget would 504 requests whose leader is
    still legitimately at work (waiting for a slot, then reading): refuse it, naming both settings."""
    explicit = data["cache"]["coalesce_timeout_seconds"]
    if explicit is None:
        return []
    max_delay, server = data["throttling"]["progressive_max_delay"], data["server"]
    problems = []
    for name, spec in data["domain_mappings"].items():
        total = spec["total_timeout"] or server["total_timeout"]
        needed = leader_budget(max_delay, total)
        if explicit < needed:
            problems.append(
                f"cache.coalesce_timeout_seconds: {explicit:g} s is shorter than a fetch for '{name}' may take "
                f"(throttling.progressive_max_delay {max_delay:g} s + total_timeout {total:g} s + "
                f"{LEADER_MARGIN_SECONDS:g} s): requests waiting on it would give up while it still works; set it "
                f"to at least {needed:g}, lower throttling.progressive_max_delay or the total_timeout, "
                "or leave it unset"
            )
    return problems


def _or_default(value: int | None, default: int) -> int:
    return default if value is None else value  # 0 is a value here, not "unset"


def _build(data: dict[str, Any]) -> Settings:
    cache, server, throttling = data["cache"], data["server"], data["throttling"]
    problems = _coalesce_problems(data)
    if problems:
        raise ConfigError(problems)
    domains: dict[str, DomainSettings] = {}
    for name, spec in data["domain_mappings"].items():
        parts = urlsplit(spec["upstream"])
        vary = spec["vary_headers"] if spec["vary_headers"] is not None else ["Accept", "Accept-Language"]
        connect = spec["connect_timeout"] or server["connect_timeout"]
        read = spec["read_timeout"] or server["request_timeout"]
        total = spec["total_timeout"] or server["total_timeout"]
        domains[name] = DomainSettings(
            name=name,
            upstream=spec["upstream"].rstrip("/"),
            scheme=parts.scheme,
            netloc=parts.netloc.lower(),
            base_path=parts.path.rstrip("/"),
            upstream_id=_upstream_id(parts),
            ttl_seconds=spec["ttl_seconds"] or cache["default_ttl_seconds"],
            negative_ttl_seconds=spec["negative_ttl_seconds"] or cache["negative_ttl_seconds"],
            vary_headers=tuple(sorted({h.lower() for h in vary})),
            share_across_credentials=spec["share_across_credentials"],
            respect_upstream_cache_control=spec["respect_upstream_cache_control"],
            ttl_from_upstream=spec["ttl_from_upstream"],
            stale_if_error=_or_default(spec["stale_if_error_seconds"], cache["stale_if_error_seconds"]),
            stale_while_revalidate=_or_default(
                spec["stale_while_revalidate_seconds"], cache["stale_while_revalidate_seconds"]
            ),
            credential_headers=frozenset(sorted({h.lower() for h in (
                spec["credential_headers"] if spec["credential_headers"] is not None else CREDENTIAL_HEADERS
            )})),
            connect_timeout=connect,
            read_timeout=read,
            total_timeout=total,
            coalesce_timeout=cache["coalesce_timeout_seconds"]
            or leader_budget(throttling["progressive_max_delay"], total),
            max_requests_per_second=spec["max_requests_per_second"],
            max_requests_per_minute=spec["max_requests_per_minute"],
            max_requests_per_hour=throttling["domain_limits"].get(name, throttling["default_requests_per_hour"]),
            rate_limit_per_credential=spec["rate_limit_per_credential"],
            cost_per_call=spec["cost_per_call"],
            cost_currency=spec["cost_currency"],
            credential_params=frozenset(p.lower() for p in spec["credential_params"] or ()),
        )
    return Settings(
        domains=domains,
        server=server,
        security=data["security"],
        cache=cache,
        throttling=throttling,
        logging=data["logging"],
        redis=data["redis"],
    )
