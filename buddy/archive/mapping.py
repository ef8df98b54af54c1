"""Which mapping a recorded URL belongs to, for `buddy import`: `--map` rules, then the mapping named in the record,
then the one whose upstream holds the URL."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, cast
from urllib.parse import urlsplit

from buddy.settings import DomainSettings


@dataclass(frozen=True)
class HostMap:
    """`--map OLD=NAME`: records of OLD (`host`, `host:port`, or `scheme://host[:port][/base]`) belong to NAME."""

    name: str
    host: str
    scheme: str | None = None
    port: int | None = None
    base: str | None = None  # given: the recorded path below it goes below the mapping's base path

    @classmethod
    def parse(cls, text: str) -> HostMap:
        old, sep, name = text.rpartition("=")
        if not sep or not old or not name:
            raise ValueError(f"{text!r}: expected OLD-HOST=NAME")
        parts = urlsplit(old if "://" in old else f"//{old}")
        if not parts.hostname:
            raise ValueError(f"{text!r}: no host in {old!r}")
        base = parts.path.rstrip("/") if "://" in old else None
        port = parts.port if parts.port or "://" not in old else (443 if parts.scheme == "https" else 80)
        return cls(name, parts.hostname.lower(), parts.scheme or None, port, base)

    def matches(self, scheme: str, host: str, port: int, path: str) -> bool:
        return (host == self.host and (self.scheme is None or scheme == self.scheme)
                and (self.port is None or port == self.port)
                and (self.base is None or _below(path, self.base) is not False))


def origin(url: str) -> tuple[str, str, int, str, str]:
    """(scheme, host, port, path, query) of an absolute URL, the port filled in from the scheme."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, (parts.hostname or "").lower(), port, parts.path or "/", parts.query


def _below(path: str, base: str) -> str | None | bool:
    """The part of `path` below `base` as views.py would split it (None: the base itself), or False: not below."""
    if base and path == base:
        return None
    if path.startswith(base + "/"):
        return path[len(base) + 1:]
    return False


def resolve(domains: dict[str, DomainSettings], url: str, recorded: str,
            maps: Iterable[HostMap]) -> tuple[DomainSettings, str | None] | None:
    """The mapping a recorded URL belongs to, and its path below the mapping's base path as a client would write
    it after `/<name>/` (None: the base itself); None when no mapping holds it. `--map` first, then the mapping
    named in the record (our exports), then the one whose upstream holds the URL (the longest base path)."""
    scheme, host, port, path, _ = origin(url)
    for rule in maps:
        if rule.matches(scheme, host, port, path):
            domain = domains[rule.name]
            rest = _below(path, domain.base_path if rule.base is None else rule.base)
            return None if rest is False else (domain, cast("str | None", rest))
    candidates = sorted(domains.values(), key=lambda d: (d.name != recorded, -len(d.base_path)))
    for domain in candidates:
        up_scheme, up_host, up_port, _, _ = origin(domain.upstream_id)
        rest = _below(path, domain.base_path)
        if (scheme, host, port) == (up_scheme, up_host, up_port) and rest is not False:
            return domain, cast("str | None", rest)
    return None
