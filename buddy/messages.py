"""The two values that cross the service boundary: a mapped client request and the one response type of the flow."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Iterable

from buddy.settings import DomainSettings


@dataclass(frozen=True)
class ProxyRequest:
    """A client request already mapped to its domain, with a safe upstream path and query.

    `headers` are the client's (access key already removed); `forwarded` is exactly what the upstream is
    sent (hop-by-hop headers and those named in Connection dropped), and so what the cache key is made of.
    `key_prefix`/`key_param` say how the client spelled the access key in the path or query, if it did:
    a redirect inside the mapping keeps them, so following it needs no other key. `client_gone` says
    whether the client has hung up (checked while the request sleeps for a rate-limit slot).
    """

    domain: DomainSettings
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    forwarded: dict[str, str]
    key_prefix: str = ""
    key_param: str = ""
    namespace: str = ""  # X-Buddy-Namespace: a partition of the cache; never sent upstream
    # A GET's or HEAD's If-None-Match and If-Modified-Since: answered by the proxy, never sent upstream.
    conditions: tuple[tuple[str, str], ...] = ()
    client_gone: Callable[[], bool] = field(default=lambda: False, compare=False)

    @cached_property
    def by_name(self) -> dict[str, str]:
        """What the upstream is sent, by lower-case header name (the first of repeated ones)."""
        return {name.lower(): value for name, value in reversed(self.forwarded.items())}

    def header(self, name: str) -> str:
        """The value of a header as the upstream gets it, '' when absent (names compare case-insensitively)."""
        return self.by_name.get(name.lower(), "")


@dataclass(frozen=True)
class StoredRequest:
    """What a stored entry was fetched with and keyed on, kept beside it (for export, and to explain a key).

    `headers` are the keyed request headers as the upstream got them (the mapping's vary headers and those
    the answer's Vary named), never a credential; `credentials` is the digest of the credential headers
    the key was partitioned by ('' for none), never their values. A body over STORED_BODY_LIMIT is not kept
    (`body_kept` False): such an entry can be served but not exported.
    """

    method: str
    url: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    body_kept: bool = True
    content_type: str = ""
    credentials: str = ""
    namespace: str = ""


STORED_BODY_LIMIT = 1024 * 1024


@dataclass(frozen=True)
class StoredRules:
    """What a stored answer may be used for once it is stale, and how old it was when received: worked out when it
    is stored, from the headers as the upstream sent them (buddy.policy.storage), and kept with it.

    `initial_age` is RFC 9111 4.2.3's corrected initial age (its Age, Date and the time the fetch took): a hit's
    Age header is it plus the time since. `no_stale`: never answer with it once stale (must-revalidate,
    proxy-revalidate, s-maxage, no-cache). `while_revalidate`, `if_error`: the stale windows the upstream itself
    allows (stale-while-revalidate, stale-if-error; standards mode), None when it names none.
    """

    initial_age: float = 0.0
    no_stale: bool = False
    while_revalidate: float | None = None
    if_error: float | None = None


@dataclass
class ProxyResult:
    """Every answer in the flow: an upstream's, a stored entry, a leader's shared copy, or one the proxy makes.

    `body` holds a whole body; `stream` an over-size one, read once. `stored_at` and `fetch_ms` say when the
    upstream produced it and how long that took (what a hit saves). `vary` names the request headers,
    beyond the mapping's own vary_headers, that the upstream's `Vary` chose this answer by; `variant` is
    the digest of the entry it was stored under for them (see policy.variant_digest). `upstream_headers`
    keeps a fresh upstream answer's headers as they came, before any was dropped for the client (a
    `Connection: Cache-Control` or a control character must not hide `private` from the policy).
    A stored entry is fresh for `fresh_for` seconds after `stored_at`, then stale: Redis keeps it for a
    grace period longer (stale-if-error, stale-while-revalidate), and `rules` say what it may be used for then.
    """

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes | None = None
    stream: Iterable[bytes] | None = None  # a BodyStream, a relay: iterated once, closed if it has close()
    cache: str = "MISS"
    extra: list[tuple[str, str]] = field(default_factory=list)
    fetch_ms: int = 0
    stored_at: float = 0.0
    vary: tuple[str, ...] = ()
    variant: str = ""
    upstream_headers: list[tuple[str, str]] | None = None  # as the upstream sent them; read by policy only
    fresh_for: float | None = None  # a stored entry's freshness (s) from stored_at; None: fresh while kept
    request: StoredRequest | None = None  # a stored entry's request
    rules: StoredRules | None = None  # a stored entry's rules for when it is stale; None: stored by an older version
    live: bool = False  # `stream` is a live stream (events as the upstream makes them): kept once whole, if small

    def copy(self) -> ProxyResult:
        """A twin to hand out (a kept entry stays as it is): its own header lists, the same body."""
        twin = object.__new__(ProxyResult)
        twin.__dict__.update(self.__dict__)
        twin.headers, twin.extra = list(self.headers), list(self.extra)
        return twin

    def all_headers(self) -> list[tuple[str, str]]:
        return [*self.headers, ("X-Cache", self.cache), *self.extra]

    def header(self, name: str) -> str:
        """Every value of a response header joined with ', ' ('' when absent)."""
        lower = name.lower()
        return ", ".join(value for key, value in self.headers if key.lower() == lower)

    def close_stream(self) -> None:
        close = getattr(self.stream, "close", None)
        if close is not None:
            close()
