"""How a setting is declared once (gunicorn's habit): its type, default, check, one line of help and the
environment variable that may set it, as a field of a frozen section dataclass. The marshmallow schema that
validates a section, the environment overrides and the docs' reference are all read from these declarations.

    @dataclass(frozen=True)
    class CacheSettings:
        default_ttl_seconds: int = setting(POSITIVE_INT, 86400, "TTL of 2xx responses")

mypy sees `settings.cache.default_ttl_seconds` as an int, and a misspelt one as an error.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, ClassVar, Iterator, Mapping, NoReturn, Sequence

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

Check = Callable[[Any], Any]  # a marshmallow validator: raises ValidationError for a bad value


def _same(value: Any) -> Any:
    return value


def switch(text: str) -> bool | str:
    """An environment variable's 1/true/yes/on or 0/false/no/off; anything else is left for validation to refuse
    by the variable's name."""
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    return text


@dataclass(frozen=True)
class Kind:
    """A type of setting: its marshmallow field, the checks and messages every setting of the type shares, how an
    environment variable's text becomes a value to validate, and how a validated value becomes the attribute
    (a list becomes a tuple: sections are frozen)."""

    field: Callable[..., fields.Field]
    checks: tuple[Check, ...] = ()
    messages: Mapping[str, str] = dataclasses.field(default_factory=dict)
    from_env: Callable[[str], Any] = str
    env_values: str = ""  # what the environment variable takes, for the docs, when it is not the plain value
    to_attribute: Callable[[Any], Any] = _same
    key_suffix: str = ""  # a table of named values is documented as `name.<name>`

    def make(self, extra: Sequence[Check], **options: Any) -> fields.Field:
        return self.field(validate=[*self.checks, *extra], error_messages=dict(self.messages), **options)


def integer(minimum: int, message: str, maximum: int | None = None) -> Kind:
    """Whole numbers from `minimum` (to `maximum`), never a string or a float; `message` for anything else."""
    return Kind(partial(fields.Integer, strict=True), (validate.Range(min=minimum, max=maximum, error=message),),
                {"invalid": message, "null": message})


def number(*, positive: bool, at_most: float | None = None) -> Kind:
    """Numbers (an integer is one too): above 0 when `positive`, else from 0; up to `at_most`."""
    message = ("must be a positive number" if positive else "must be 0 or a positive number") + (
        "" if at_most is None else f" up to {at_most:g}")
    check = validate.Range(min=0, max=at_most, min_inclusive=not positive, error=message)
    said_for = ("invalid", "null") if positive else ("invalid", "null", "special")
    return Kind(fields.Float, (check,), {key: message for key in said_for})


def _tuple(value: Any) -> Any:
    return None if value is None else tuple(value)


POSITIVE_INT = integer(1, "must be a positive integer")
NON_NEGATIVE_INT = integer(0, "must be 0 or a positive integer")
PORT = integer(1, "must be a port number (1-65535)", maximum=65535)
POSITIVE_NUMBER = number(positive=True)
BOOLEAN = Kind(partial(fields.Boolean, truthy={True}, falsy={False}), messages={"invalid": "must be true or false"},
               from_env=switch, env_values="`1`/`true`/`yes`/`on` or `0`/`false`/`no`/`off`")
STRING = Kind(fields.String, messages={"invalid": "must be a string"})


def strings(*each: Check) -> Kind:
    """A list of strings, each passing the checks `each`; the section holds it as a tuple."""
    return Kind(lambda **options: fields.List(STRING.make(each), **options), to_attribute=_tuple)


STRINGS = strings()
COUNTS = Kind(lambda **options: fields.Dict(keys=fields.String(), values=POSITIVE_INT.make(()), **options),
              key_suffix=".<name>")


class Required:
    """The default of a setting that has none: it must be given."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = Required()
SETTING = "buddy.setting"  # the key of a declaration in its dataclass field's metadata


@dataclass(frozen=True)
class Setting:
    """One setting as declared; `name` is its field's, given when the section is read."""

    kind: Kind
    default: Any
    help: str
    checks: tuple[Check, ...] = ()
    env: str | None = None
    default_doc: str | None = None  # the default as the docs say it, when the value alone would not tell
    name: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def schema_field(self) -> fields.Field:
        """The marshmallow field that validates this setting (an unset optional one loads as its default)."""
        if self.required:
            return self.kind.make(self.checks, required=True)
        default = self.default
        fresh = (lambda: copy.deepcopy(default)) if isinstance(default, (dict, list)) else default
        return self.kind.make(self.checks, load_default=fresh, allow_none=default is None)

    def shown_default(self) -> str:
        """The default as the reference shows it."""
        if self.default_doc is not None:
            return self.default_doc
        if self.required:
            return "(required)"
        if self.default is None or self.default == {}:
            return "none"
        return f"`{shown(self.default)}`"


def shown(value: Any) -> str:
    """A value as a config file would spell it (TOML and JSON agree on these)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (int, str)):
        return str(value)
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def setting(kind: Kind, default: Any, help: str, *, check: Check | Sequence[Check] = (), env: str | None = None,
            default_doc: str | None = None) -> Any:
    """Declare a setting, as the default of a section dataclass's field: `kind` says what values it takes (the
    field's annotation is what the section holds), `check` what else a value must satisfy, `help` what it does,
    in one line of Markdown; `env` names the environment variable that sets it over the config file."""
    checks = tuple(check) if isinstance(check, Sequence) else (check,)
    declared = Setting(kind, default, help, checks, env, default_doc)
    metadata = {SETTING: declared}
    if declared.required:
        return field(metadata=metadata)
    if isinstance(default, (dict, list)):
        return field(default_factory=partial(copy.deepcopy, default), metadata=metadata)
    return field(default=default, metadata=metadata)


def declarations(section: type) -> Iterator[Setting]:
    """The settings a section declares, in order, each with its name."""
    for each in dataclasses.fields(section):
        declared = each.metadata.get(SETTING)
        if declared is not None:
            yield dataclasses.replace(declared, name=each.name)


class SectionSchema(Schema):
    """A section's schema: unknown keys are errors (a typo is never silently ignored), and the section's own
    checks across its settings run once each setting is valid."""

    class Meta:
        unknown = RAISE

    section_checks: ClassVar[tuple[Callable[[dict[str, Any]], None], ...]] = ()

    @validates_schema
    def _check_section(self, data: dict[str, Any], **_: Any) -> None:
        for check in self.section_checks:
            check(data)


def schema_for(section: type) -> type[SectionSchema]:
    """The marshmallow schema of a section, derived from its declarations."""
    attributes: dict[str, Any] = {each.name: each.schema_field() for each in declarations(section)}
    attributes["section_checks"] = getattr(section, "section_checks", ())
    return type(f"{section.__name__}Schema", (SectionSchema,), attributes)


def build(section: type[Any], loaded: Mapping[str, Any]) -> Any:
    """The section from what its schema loaded."""
    return section(**{each.name: each.kind.to_attribute(loaded[each.name]) for each in declarations(section)})


def refuse(message: str, name: str) -> NoReturn:
    """A section check's way to name the setting that is wrong."""
    raise ValidationError(message, name) from None
