"""The settings reference in Markdown, made from the declarations: `api-buddy check-config --reference` prints
it, and docs/configuration.md holds each part between two markers (tests/integration/test_docs.py keeps them the
same), so a setting is documented where it is declared."""
from __future__ import annotations

from typing import Iterator

from buddy.settings.declare import declarations
from buddy.settings.load import SECTIONS
from buddy.settings.mappings import MappingSettings


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _rows(prefix: str, section: type) -> Iterator[str]:
    for each in declarations(section):
        env = f"; environment: `{each.env}`" if each.env else ""
        key = f"`{prefix}.{each.name}{each.kind.key_suffix}`"
        yield f"| {key} | {_cell(each.shown_default())} | {_cell(each.help)}{env} |"


def settings_table() -> str:
    """Every setting: its key, default and meaning, the mappings' first, then each section's in order."""
    lines = ["| key | default | meaning |", "|---|---|---|", *_rows("domain_mappings.<name>", MappingSettings)]
    for name, section in SECTIONS.items():
        lines += _rows(name, section)
    return "\n".join(lines) + "\n"


def environment_table() -> str:
    """The environment variables that set a setting, over the config file."""
    lines = ["| variable | sets |", "|---|---|"]
    for name, section in SECTIONS.items():
        for each in declarations(section):
            if each.env:
                values = f" ({each.kind.env_values})" if each.kind.env_values else ""
                lines.append(f"| `{each.env}` | `{name}.{each.name}`{values} |")
    return "\n".join(lines) + "\n"


# Each part as docs/configuration.md holds it: under its heading, between `<!-- begin: NAME ... -->` and
# `<!-- end: NAME -->`.
PARTS = {"settings": ("Every setting", settings_table), "environment": ("Environment variables", environment_table)}


def reference() -> str:
    """The whole reference, each part under its heading."""
    return "\n".join(f"## {heading}\n\n{make()}" for heading, make in PARTS.values())
