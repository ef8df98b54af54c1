"""Reading what a message says about caching: Cache-Control parsed once, strictly, and the fields around it.

One parser for requests and responses alike (RFC 9111 5.2). werkzeug splits the list and the field lists; this
module first checks the grammar and fails closed: a directive that is not `token[=token|quoted-string]` makes the
whole field unreadable (an answer whose privacy cannot be read is not shared), and a delta-seconds directive whose
value is quoted, negative, not digits or repeated has no value (a freshness that cannot be read is no freshness).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from werkzeug.http import parse_date, parse_list_header, parse_set_header

_DIRECTIVE = re.compile(r"""([!#$%&'*+.^_`|~0-9A-Za-z-]+)(?:=([!#$%&'*+.^_`|~0-9A-Za-z-]+|"(?:[^"\\]|\\.)*"))?""")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_DIGITS = re.compile(r"[0-9]+")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
DELTA_SECONDS = frozenset({"max-age", "s-maxage", "min-fresh", "max-stale", "stale-while-revalidate", "stale-if-error"})
LONGEST = 2**31  # RFC 9111 1.2.2: a delta-seconds too large to represent is 2^31
INVALID = -1  # what `seconds()` holds for a directive present with an unreadable value


@dataclass(frozen=True)
class CacheControl:
    """One Cache-Control field (all its lines), read once. `readable` is False when any directive breaks the
    grammar; then nothing else here is filled in, and callers fail closed."""

    readable: bool = True
    names: frozenset[str] = frozenset()
    values: Mapping[str, float] = field(default_factory=dict)  # delta-seconds directives: seconds, or INVALID
    fields: Mapping[str, frozenset[str]] = field(default_factory=dict)  # private="..." / no-cache="...": names

    def has(self, name: str) -> bool:
        return name in self.names

    def seconds(self, name: str) -> float | None:
        """The directive's delta-seconds (a bare max-stale: infinite); None when absent; INVALID when present but
        unreadable."""
        return self.values.get(name) if name in self.names else None


UNREADABLE = CacheControl(readable=False)


def cache_control(value: str | None) -> CacheControl:
    """Parse a Cache-Control field value (lines already joined with ', '); directive names compare case-insensitively
    (RFC 9111 5.2). None (a value with control characters, see `field_value`) is unreadable."""
    if value is None:
        return UNREADABLE
    names: set[str] = set()
    values: dict[str, float] = {}
    fields: dict[str, frozenset[str]] = {}
    for item in parse_list_header(value) if value.strip() else []:
        found = _DIRECTIVE.fullmatch(item.strip())
        if not found:
            return UNREADABLE
        name, argument = found.group(1).lower(), found.group(2)
        if name in DELTA_SECONDS:
            if name in names:  # repeated: either value may be the meant one, so neither is (RFC 9111 4.2.1)
                values[name] = INVALID
            elif argument is None:
                values[name] = math.inf if name == "max-stale" else INVALID
            elif _DIGITS.fullmatch(argument):
                values[name] = min(int(argument), LONGEST) if len(argument) <= 12 else LONGEST
            else:
                values[name] = INVALID  # quoted ("60", '60'), negative, fractional: not delta-seconds
        elif argument is not None and name in ("private", "no-cache"):
            listed = [f.lower() for f in parse_set_header(argument.strip('"'))]
            if not listed or not all(_TOKEN.fullmatch(f) and f != "*" for f in listed):
                return UNREADABLE
            fields[name] = fields.get(name, frozenset()) | frozenset(listed)
            continue  # qualified (private="Set-Cookie"): not the bare directive
        names.add(name)
    return CacheControl(True, frozenset(names), values, fields)


def field_value(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    """Every value of a header joined with ', ' ('' when absent); None when a value has control characters: a
    field that cannot be read is not one to trust an answer's privacy or freshness to."""
    lower = name.lower()
    values = [value for key, value in headers if key.lower() == lower]
    if any(_CONTROL.search(value) for value in values):
        return None
    return ", ".join(values)


def first_value(headers: Iterable[tuple[str, str]], name: str) -> str:
    """The first value of a header (of a list-valued one, its first member; RFC 9111 5.1 for Age), '' when absent."""
    lower = name.lower()
    for key, value in headers:
        if key.lower() == lower:
            return value.split(",", 1)[0].strip()
    return ""


def age_value(headers: Iterable[tuple[str, str]]) -> int:
    """The Age an upstream sent: its first value in seconds; 0 when absent or not delta-seconds (ignored, 5.1)."""
    value = first_value(headers, "Age")
    if not _DIGITS.fullmatch(value):
        return 0
    return min(int(value), LONGEST) if len(value) <= 12 else LONGEST


def http_time(value: str) -> float | None:
    """An HTTP-date as Unix time; None for anything else (an invalid Expires, a date out of range)."""
    try:
        when = parse_date(value.strip()) if value.strip() else None
        return None if when is None else when.timestamp()
    except (ValueError, OverflowError):
        return None


def retry_after_seconds(value: str, now: float) -> float | None:
    """An upstream's Retry-After in seconds from `now` (RFC 9110 10.2.3: ASCII delta-seconds or an
    HTTP-date); None when absent or anything else, so that the caller backs off as if none was sent."""
    value = value.strip()
    if not value:
        return None
    if _DIGITS.fullmatch(value):
        return float(int(value)) if len(value) <= 12 else 1e12  # int() refuses 4,300 digits and more
    when = http_time(value)
    return None if when is None else max(0.0, when - now)
