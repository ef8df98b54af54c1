"""Configuration: every setting declared once (declare, sections, mappings), loaded in order (defaults, file,
environment, overrides) into frozen, typed settings (load), and documented from the same declarations
(reference: `api-buddy check-config --reference`, the lists in docs/configuration.md)."""
from __future__ import annotations

from buddy.settings.load import (
    CONFIG_FORMATS,
    ENVIRONMENT_VARIABLES,
    EXAMPLE_MAPPINGS,
    SECTIONS,
    Settings,
    deep_merge,
    default_data_dir,
    environment_overrides,
    load_settings,
    read_config_file,
    tomllib,
    validate_config,
)
from buddy.settings.mappings import LEADER_MARGIN_SECONDS, DomainSettings, MappingSettings, leader_budget
from buddy.settings.sections import (
    CacheSettings,
    LoggingSettings,
    RedisSettings,
    SecuritySettings,
    ServerSettings,
    ThrottlingSettings,
)

__all__ = [
    "CONFIG_FORMATS", "ENVIRONMENT_VARIABLES", "EXAMPLE_MAPPINGS", "LEADER_MARGIN_SECONDS", "SECTIONS",
    "CacheSettings", "DomainSettings", "LoggingSettings", "MappingSettings", "RedisSettings", "SecuritySettings",
    "ServerSettings", "Settings", "ThrottlingSettings", "default_data_dir", "deep_merge", "environment_overrides",
    "leader_budget", "load_settings", "read_config_file", "tomllib", "validate_config",
]
