"""Configuration: defaults, files, environment, and one clear message per bad field."""
from __future__ import annotations

import json

import pytest

from buddy.errors import ConfigError
from buddy.settings import EXAMPLE_MAPPINGS, load_settings, validate_config


def problems(config: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    return info.value.problems


def test_no_config_serves_the_example_mappings_with_defaults() -> None:
    settings = load_settings(environ={})
    assert set(settings.domains) == set(EXAMPLE_MAPPINGS)
    wikidata = settings.domains["wikidata"]
    assert (wikidata.scheme, wikidata.netloc, wikidata.base_path) == ("https", "www.wikidata.org", "")
    assert wikidata.ttl_seconds == 86400
    assert wikidata.vary_headers == ("accept", "accept-language")
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 8080)
    assert settings.redis.prefix == "buddy:"


def test_every_bad_field_is_named_by_its_path() -> None:
    found = problems({
        "domain_mappings": {
            "wikidata": {"upstream": "https://www.wikidata.org", "ttl_seconds": -5},
            "bad": {"upstream": "ftp://example.org"},
        },
        "server": {"port": "eighty"},
        "cache": {"default_ttl_seconds": 0},
    })
    assert "domain_mappings.wikidata.ttl_seconds: must be a positive integer" in found
    assert "domain_mappings.bad.upstream: must be an http:// or https:// URL with a host" in found
    assert "server.port: must be a port number (1-65535)" in found
    assert "cache.default_ttl_seconds: must be a positive integer" in found
    assert len(found) == 4


def test_unknown_keys_are_errors_not_silently_ignored() -> None:
    found = problems({"cache": {"default_ttl_secs": 10}, "serverr": {}, "domain_mappings": {
        "a": {"upstream": "https://a.example", "tll_seconds": 3}}})
    assert found == [
        "cache.default_ttl_secs: unknown key",
        "domain_mappings.a.tll_seconds: unknown key",
        "serverr: unknown key",
    ]


@pytest.mark.parametrize("name", ["admin", "metrics", "Admin"])
def test_reserved_names_are_refused(name: str) -> None:
    found = problems({"domain_mappings": {name: {"upstream": "https://a.example"}}})
    assert found == [f"domain_mappings.{name}: '{name}' is reserved for the proxy's own routes"]


def test_domain_names_must_be_url_safe() -> None:
    found = problems({"domain_mappings": {"a b": {"upstream": "https://a.example"}}})
    assert found == ["domain_mappings.a b: is not a valid name (letters, digits, '.', '_', '-')"]


def test_upstream_must_not_carry_credentials_or_query() -> None:
    found = problems({"domain_mappings": {"a": {"upstream": "https://user:pw@a.example/x?y=1"}}})
    assert found == ["domain_mappings.a.upstream: must not carry credentials, a query or a fragment"]


def test_missing_upstream_and_wrong_types() -> None:
    found = problems({"domain_mappings": {"a": {}}, "security": {"require_secure_key": "yes"}, "redis": {"url": "http://x"}})
    assert found == [
        "domain_mappings.a.upstream: is required",
        "redis.url: must start with redis://, rediss:// or unix:// (one server), redis+cluster:// or "
        "rediss+cluster:// (a Redis Cluster), redis+sentinel:// or rediss+sentinel:// (Sentinel)",
        "security.require_secure_key: must be true or false",
    ]


def test_a_bad_redis_url_is_named_alongside_the_sections_other_bad_settings() -> None:
    found = problems({"redis": {"url": "http://x", "socket_timeout": 0}})
    assert [line.split(":")[0] for line in found] == ["redis.socket_timeout", "redis.url"]


def test_every_whole_number_setting_says_what_it_takes_whatever_the_wrong_value() -> None:
    assert problems({"server": {"port": None}, "logging": {"backup_count": "five"}}) == [
        "logging.backup_count: must be 0 or a positive integer",
        "server.port: must be a port number (1-65535)",
    ]


def test_per_domain_values_fall_back_to_section_defaults() -> None:
    settings = validate_config({
        "domain_mappings": {
            "a": {"upstream": "https://a.example/api/", "ttl_seconds": 60, "vary_headers": ["Accept"]},
            "b": {"upstream": "http://127.0.0.1:9000"},
        },
        "cache": {"default_ttl_seconds": 7, "negative_ttl_seconds": 3},
        "server": {"request_timeout": 12},
        "throttling": {"domain_limits": {"a": 50}, "default_requests_per_hour": 99},
    })
    a, b = settings.domains["a"], settings.domains["b"]
    assert (a.base_path, a.ttl_seconds, a.negative_ttl_seconds, a.vary_headers) == ("/api", 60, 3, ("accept",))
    assert (b.netloc, b.ttl_seconds, b.read_timeout) == ("127.0.0.1:9000", 7, 12)
    assert (a.max_requests_per_hour, b.max_requests_per_hour) == (50, 99)


def test_domain_limits_must_name_a_configured_domain() -> None:
    found = problems({"domain_mappings": {"a": {"upstream": "https://a.example"}},
                      "throttling": {"domain_limits": {"b": 5}}})
    assert found == ["throttling.domain_limits.b: names no configured domain"]


def test_file_then_environment_then_overrides(tmp_path) -> None:
    path = tmp_path / "buddy.toml"
    path.write_text('[domain_mappings.x]\nupstream = "https://x.example"\nttl_seconds = 5\n'
                    '[redis]\nurl = "redis://file:6379/0"\n[server]\nport = 9001\n')
    env = {"BUDDY_CONFIG": str(path), "REDIS_URL": "redis://env:6379/1", "BUDDY_SECURE_KEY": "k" * 32}
    settings = load_settings({"server": {"port": 9002}}, environ=env)
    assert settings.domains["x"].ttl_seconds == 5
    assert settings.redis.url == "redis://env:6379/1"
    assert settings.security.secure_key == "k" * 32
    assert settings.server.port == 9002


def test_json_file_and_its_errors(tmp_path) -> None:
    path = tmp_path / "buddy.json"
    path.write_text(json.dumps({"domain_mappings": {"wikidata": {"upstream": "https://www.wikidata.org",
                                                                "ttl_seconds": "a day"}}}))
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"BUDDY_CONFIG": str(path)})
    assert info.value.problems == ["domain_mappings.wikidata.ttl_seconds: must be a positive integer"]
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_settings(environ={"BUDDY_CONFIG": str(path)})
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(environ={"BUDDY_CONFIG": str(tmp_path / "missing.json")})


def test_followers_wait_as_long_as_their_leader_may_take_unless_told_otherwise() -> None:
    mapping = {"w": {"upstream": "https://w.example.org", "connect_timeout": 5, "total_timeout": 20}}
    derived = validate_config({"domain_mappings": mapping, "throttling": {"progressive_max_delay": 100}})
    assert derived.domains["w"].coalesce_timeout == 100 + 20 + 2
    explicit = validate_config({"domain_mappings": mapping, "cache": {"coalesce_timeout_seconds": 200},
                                "throttling": {"progressive_max_delay": 100}})
    assert explicit.domains["w"].coalesce_timeout == 200


def test_a_coalesce_timeout_shorter_than_a_leaders_budget_is_refused_naming_both_settings() -> None:
    (line,) = problems({
        "domain_mappings": {"w": {"upstream": "https://w.example.org"}},
        "cache": {"coalesce_timeout_seconds": 60},
        "throttling": {"progressive_max_delay": 300},
    })
    assert line.startswith("cache.coalesce_timeout_seconds: 60 s is shorter than a fetch for 'w'")
    assert "throttling.progressive_max_delay 300 s" in line and "at least 422" in line


def test_upstream_cache_control_and_pause_settings() -> None:
    settings = validate_config({"domain_mappings": {"w": {"upstream": "https://w.example.org"}}})
    assert settings.domains["w"].respect_upstream_cache_control is True
    assert settings.throttling.max_upstream_pause == 3600
    assert problems({"domain_mappings": {"w": {"upstream": "https://w.example.org",
                                                "respect_upstream_cache_control": "no"}},
                     "throttling": {"max_upstream_pause": 0}}) == [
        "domain_mappings.w.respect_upstream_cache_control: must be true or false",
        "throttling.max_upstream_pause: must be a positive number",
    ]


def test_with_nothing_configured_each_setting_is_its_documented_default_of_its_declared_type() -> None:
    """What `check-config --reference` (and docs/configuration.md) shows as a default is what the proxy runs
    with, and of the type the section declares, which is what mypy checks every reader against."""
    import types
    import typing

    from buddy.settings import SECTIONS
    from buddy.settings.declare import declarations

    UNIONS = (typing.Union, types.UnionType)
    settings = load_settings(environ={})
    checked = 0
    for name, section in SECTIONS.items():
        loaded, hints = getattr(settings, name), typing.get_type_hints(section)
        for each in declarations(section):
            value = getattr(loaded, each.name)
            assert value == each.kind.to_attribute(each.default), f"{name}.{each.name}"  # the reference's default
            declared = hints[each.name]  # int, str | None, tuple[str, ...], Mapping[str, int]...
            arms = typing.get_args(declared) if typing.get_origin(declared) in UNIONS else (declared,)
            expected = tuple(typing.get_origin(arm) or arm for arm in arms if arm is not type(None))
            assert value is None or isinstance(value, expected), f"{name}.{each.name}: {value!r} is not {expected}"
            checked += 1
    assert checked > 40
