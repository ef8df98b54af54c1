"""The two values that cross the service boundary: a mapped client request and the result it gets."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterator

from buddy.settings import DomainSettings


@dataclass(frozen=True)
class ProxyRequest:
    """A client request already mapped to its domain, with a safe upstream path and query."""

    domain: DomainSettings
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes

    @cached_property
    def _by_name(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for key, value in self.headers:
            found.setdefault(key.lower(), value)
        return found

    def header(self, name: str) -> str:
        """The first value of a header, '' when absent (names compare case-insensitively)."""
        return self._by_name.get(name.lower(), "")


@dataclass
class ProxyResult:
    """What the client gets: status, headers and either a whole body or a closable stream of chunks."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes | None = None
    stream: Iterator[bytes] | None = None
    cache: str = "MISS"
    extra: list[tuple[str, str]] = field(default_factory=list)
    fetch_ms: int = 0  # how long the upstream took to produce this answer

    def all_headers(self) -> list[tuple[str, str]]:
        return [*self.headers, ("X-Cache", self.cache), *self.extra]

    def close_stream(self) -> None:
        close = getattr(self.stream, "close", None)
        if close is not None:
            close()
