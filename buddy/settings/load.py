"""Loading the config: defaults, then the file (BUDDY_CONFIG), then the environment variables the declarations
name, then the program's overrides; validated by the schema derived from the declarations, one message per bad
field, named by its path (or by the variable it came from)."""
from __future__ import annotations

import copy
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from buddy.errors import ConfigError
from buddy.settings.declare import build, declarations, schema_for
from buddy.settings.mappings import (
    DOMAIN_NAME,
    RESERVED_NAMES,
    DomainSettings,
    MappingSettings,
    coalesce_problem,
    resolve,
)
from buddy.settings.sections import (
    CacheSettings,
    LoggingSettings,
    RedisSettings,
    SecuritySettings,
    ServerSettings,
    ThrottlingSettings,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EXAMPLE_MAPPINGS: dict[str, dict[str, Any]] = {
    "conceptnet": {"upstream": "https://api.conceptnet.io"},
    "dbpedia": {"upstream": "https://lookup.dbpedia.org"},
    "wikidata": {"upstream": "https://www.wikidata.org"},
    "wikidata-sparql": {"upstream": "https://query.wikidata.org"},
}


@dataclass(frozen=True)
class Settings:
    """The validated configuration: the mappings resolved, and one typed section each."""

    domains: Mapping[str, DomainSettings]
    server: ServerSettings
    security: SecuritySettings
    cache: CacheSettings
    throttling: ThrottlingSettings
    logging: LoggingSettings
    redis: RedisSettings

    @property
    def data_dir(self) -> Path:
        return Path(self.redis.data_dir or default_data_dir()).expanduser()


# The proxy-wide sections, as the config file names them, in the order the docs list them.
SECTIONS: dict[str, type[Any]] = {
    "server": ServerSettings,
    "security": SecuritySettings,
    "cache": CacheSettings,
    "throttling": ThrottlingSettings,
    "logging": LoggingSettings,
    "redis": RedisSettings,
}
# variable -> (section, setting) it sets, over the config file
ENVIRONMENT_VARIABLES = {each.env: (name, each.name) for name, section in SECTIONS.items()
                         for each in declarations(section) if each.env}


def default_data_dir() -> Path:
    """Where the embedded Redis keeps its files unless `redis.data_dir` or BUDDY_DATA_DIR says otherwise."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "reference-api-buddy"


class _WholeConfig(Schema):
    """What holds across sections: no mapping takes a reserved name, and domain_limits names only mappings."""

    class Meta:
        unknown = RAISE  # a misspelt section is an error too

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


# The whole file's schema: `domain_mappings`, then each section's, derived from its declarations.
ConfigSchema = _WholeConfig.from_dict({
    "domain_mappings": fields.Dict(
        keys=fields.String(
            validate=validate.Regexp(DOMAIN_NAME, error="is not a valid name (letters, digits, '.', '_', '-')")
        ),
        values=fields.Nested(schema_for(MappingSettings)),
        required=True,
        validate=validate.Length(min=1, error="must map at least one domain"),
    ),
    **{name: fields.Nested(schema_for(section)) for name, section in SECTIONS.items()},
}, name="ConfigSchema")


def _flatten(messages: Any, path: str = "") -> list[str]:
    if isinstance(messages, dict):
        lines: list[str] = []
        for key, value in messages.items():
            if key in ("value", "key", "_schema"):  # marshmallow nests Dict value errors one level deeper
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


def environment_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """The settings whose declarations name an environment variable, from those that are set."""
    overrides: dict[str, Any] = {}
    for name, section in SECTIONS.items():
        for each in declarations(section):
            value = environ.get(each.env) if each.env else None
            if value:
                overrides.setdefault(name, {})[each.name] = each.kind.from_env(value)
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
    for section in SECTIONS:
        raw.setdefault(section, {})  # so each section's own defaults apply
    try:
        data = ConfigSchema().load(raw)
    except ValidationError as exc:
        raise ConfigError(sorted(set(_flatten(exc.messages)))) from None
    sections = {name: build(section, data[name]) for name, section in SECTIONS.items()}
    cache, server, throttling = sections["cache"], sections["server"], sections["throttling"]
    mappings = {name: build(MappingSettings, spec) for name, spec in data["domain_mappings"].items()}
    problems = [problem for name, spec in mappings.items()
                if (problem := coalesce_problem(name, spec, cache, server, throttling))]
    if problems:
        raise ConfigError(problems)
    domains = {name: resolve(name, spec, cache, server, throttling) for name, spec in mappings.items()}
    return Settings(domains=domains, **sections)
