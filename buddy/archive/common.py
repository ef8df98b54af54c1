"""What export and import share: the WARC headers of our own, limits, durations, the tally of outcomes, and the
commands' common options."""
from __future__ import annotations

import contextlib
import re
from collections import Counter
from typing import Any, Callable, Iterable

import click

from buddy.content import DECODABLE
from buddy.errors import StoreUnavailable
from buddy.settings import DomainSettings
from buddy.views import NAMESPACE

OWN = "WARC-Buddy-"  # the prefix of the WARC headers this package writes and reads
CHUNK = 64 * 1024
LINE_LIMIT = 64 * 1024  # one header or status line, as http.client allows it (its _MAXLINE)
MAX_MESSAGES = 5  # per reason: the rest are counted in the summary only
# What the proxy asks an upstream for (UpstreamClient.send): an export records it, and an import refuses an answer
# in another coding that its recorded request asked for, since the proxy would never have been sent it.
ASKED_ENCODINGS = "gzip, deflate"
_DURATION = re.compile(r"([0-9]+)\s*(s|m|h|d|w)?")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> int:
    """`90`, `90s`, `15m`, `2h`, `7d`, `1w` -> seconds; ValueError for anything else."""
    found = _DURATION.fullmatch(text.strip().lower())
    if not found:
        raise ValueError(f"{text!r} is not a duration such as 90s, 15m, 2h, 7d or 1w")
    return int(found.group(1)) * _UNITS[found.group(2) or "s"]


class Duration(click.ParamType):
    name = "DURATION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            return value if isinstance(value, int) else parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class Tally:
    """What happened to each entry or record: counts by outcome, and a few messages per reason."""

    def __init__(self, echo: Callable[[str], None] = lambda line: None) -> None:
        self.done = 0
        self.skipped: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.about: dict[str, set[str]] = {}  # reason -> what caused it (names, shown after it in the summary)
        self.echo = echo

    def skip(self, reason: str, detail: str = "", error: bool = False, about: Iterable[str] = ()) -> None:
        """Count a skipped entry or record; an error is also told as it happens (where, what), MAX_MESSAGES per
        reason, so that a damaged file shows where it is damaged. `about`: the names that caused it."""
        counts = self.errors if error else self.skipped
        counts[reason] += 1
        if about:
            self.about.setdefault(reason, set()).update(about)
        if error and detail and counts[reason] <= MAX_MESSAGES:
            self.echo(f"error: {printable(detail)}: {reason}")

    def lines(self) -> list[str]:
        out = [f"  {n} {reason}{self._about(reason)}" for reason, n in self.skipped.most_common()]
        return out + [f"  {n} {reason}{self._about(reason)} (error)" for reason, n in self.errors.most_common()]

    def _about(self, reason: str) -> str:
        names = self.about.get(reason)
        return f": {', '.join(sorted(printable(name) for name in names))}" if names else ""


def printable(text: str) -> str:
    """One line of printable ASCII: a damaged or hostile record must not write escape sequences to a terminal."""
    return " ".join("".join(c if c.isascii() and c.isprintable() else " " for c in text).split())


def first_line(exc: BaseException) -> str:
    """An exception's message on one line, printable, at most 120 characters (warcio quotes binary data)."""
    if str(exc).startswith("Invalid WARC record"):
        return "no WARC record starts here"  # warcio's message goes on with the bytes it found: binary noise
    text = printable(str(exc))
    return (text[:117] + "...") if len(text) > 120 else text or type(exc).__name__


def namespace_option(value: str | None) -> str | None:
    if value is not None and not NAMESPACE.fullmatch(value):
        raise click.BadParameter("1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return value


def redis_down(exc: StoreUnavailable) -> click.ClickException:
    return click.ClickException(f"Redis is unavailable: {exc}")


def upstream_location(domain: DomainSettings, name: str, location: str) -> str:
    """A Location stored for clients of mapping `name` (upstream.rewrite_location's `/<name>/...`) as the upstream
    sent it: an URL of `domain`'s upstream. Any other is left as it is."""
    mapped = f"/{name}"
    if location == mapped or location.startswith((mapped + "/", mapped + "?")):
        return f"{domain.scheme}://{domain.netloc}{domain.base_path}{location[len(mapped):]}"
    return location


def unasked_codings(value: str, sent: list[tuple[str, str]]) -> list[str]:
    """The content codings of an answer (besides gzip and deflate, which the proxy decodes) that its recorded request
    asked for: an upstream sends them to a client that accepts them, never to the proxy (ASKED_ENCODINGS). One
    the request did not accept the upstream sends anyway, and so to the proxy too."""
    codings = [c.strip().lower() for c in value.split(",") if c.strip()]
    asked = [v for n, v in sent if n.lower() == "accept-encoding"]
    accepted = _accepted_codings(", ".join(asked)) if asked else None  # none sent: any coding is acceptable
    return [c for c in codings if c not in DECODABLE and c != "identity" and (
        accepted is None or accepted.get(c, accepted.get("*", 0.0)) > 0)]


def _accepted_codings(value: str) -> dict[str, float]:
    """Accept-Encoding as {coding: q}; a q that is not a number counts as 1 (accepted)."""
    out: dict[str, float] = {}
    for item in value.split(","):
        name, *params = (part.strip() for part in item.split(";"))
        weight = 1.0
        for param in params:
            key, _, number = param.partition("=")
            if key.strip().lower() == "q":
                with contextlib.suppress(ValueError):
                    weight = float(number.strip())
        if name:
            out[name.lower()] = weight
    return out
