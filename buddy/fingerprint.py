"""Request -> cache key: method (HEAD as GET), domain and its upstream, path, query, body, Content-Type, vary
headers, credentials."""
from __future__ import annotations

import functools
import hashlib
import json
from typing import Collection, Iterable, NamedTuple
from urllib.parse import urlsplit

KEY_VERSION = "v2"  # v2: the upstream's origin and base path are part of the key
_EMPTY_BODY = hashlib.sha256(b"").hexdigest()

# Headers whose values are upstream credentials: a response bought with them is partitioned by their hash.
# Cookie is not among them: reference APIs set tracking cookies, and a client that sends them back would
# otherwise never hit the entry its first request stored.
CREDENTIAL_HEADERS = (
    "authorization", "x-api-key", "api-key", "x-auth-token", "x-goog-api-key", "x-subscription-token",
    "ocp-apim-subscription-key",
)


# Query parameters that carry an upstream credential by convention, besides a mapping's `credential_params`
# (compared in lower case). The query is part of an entry's key, so such an entry could only be exported with its
# credential: it never is (buddy.archive), an import of one is keyed on a credential the file carries, and an
# upstream's pause applies to the requests that carry the same (`partition`).
CREDENTIAL_PARAMS = frozenset({
    "access_key",  # ipstack, aviationstack, Marketstack
    "access_token", "id_token", "refresh_token",  # OAuth 2.0 (RFC 6750 2.3), Facebook Graph, Mapbox
    "api_key", "apikey", "api-key",  # NASA, FRED, Last.fm, TMDB; OMDb, Alpha Vantage; New York Times
    "api_sig", "sig", "signature", "oauth_signature", "oauth_token",  # Flickr, Last.fm; Azure SAS; OAuth 1.0
    "app_key", "appid", "user_key", "hapikey",  # Edamam; OpenWeatherMap; 3scale; HubSpot
    "auth", "auth_key", "auth_token", "token",  # Firebase REST; DeepL; Twilio-style; many
    "client_secret", "password", "secret",
    "key",  # Google APIs, YouTube, Bing
    "subscription-key",  # Azure API Management
    "x-amz-credential", "x-amz-security-token", "x-amz-signature",  # AWS signed URLs
    "x-goog-credential", "x-goog-signature",  # Google Cloud Storage signed URLs
})


class RequestShape(NamedTuple):
    """What the cache key is made of, already normalized (a tuple: cheap to make and to hash, on every request)."""

    method: str
    domain: str
    upstream: str  # scheme://host:port/base-path: a remapped domain never serves the old upstream's answers
    path: str
    query: str
    body: bytes
    content_type: str
    vary: tuple[tuple[str, str | None], ...]
    credentials: str


def normalize_method(method: str) -> str:
    """HEAD shares GET's entry."""
    method = method.upper()
    return "GET" if method == "HEAD" else method


def sorted_query(query: str) -> tuple[str, ...]:
    """Query items sorted by name only, so repeated names keep their order (`a=1&a=2` is not `a=2&a=1`).

    Items stay exactly as sent (`flag` is not `flag=`); empty items (`&&`) carry nothing and are dropped.
    """
    items = [item for item in query.split("&") if item]
    return tuple(sorted(items, key=lambda item: item.split("=", 1)[0]))


def credentials_digest(headers: Iterable[tuple[str, str]], names: Collection[str] = CREDENTIAL_HEADERS) -> str:
    """A hash of the credential headers (`names`, lower case) a request carries; '' when it carries none."""
    found = sorted((name.lower(), value) for name, value in headers if name.lower() in names)
    if not found:
        return ""
    return hashlib.sha256(json.dumps(found).encode()).hexdigest()


def vary_values(headers: Iterable[tuple[str, str]], names: Iterable[str]) -> tuple[tuple[str, str | None], ...]:
    """The values of the named headers, in a fixed order; repeated headers are joined; None when absent
    (an empty header is not an absent one: the upstream may answer them differently)."""
    wanted: dict[str, list[str] | None] = {name.lower(): None for name in names}
    for name, value in headers:
        lower = name.lower()
        if lower in wanted:
            wanted[lower] = [*(wanted[lower] or []), value.strip()]
    return tuple((name, None if values is None else ", ".join(values)) for name, values in sorted(wanted.items()))


def fingerprint(shape: RequestShape) -> str:
    """The hex SHA-256 digest that names a response in the cache (remembered for recent small requests: a
    hot request's key is a dictionary look-up, not JSON and two hashes)."""
    return _fingerprint(shape) if shape.body else _remembered(shape)  # a body is hashed anyway, and kept by none


def _fingerprint(shape: RequestShape) -> str:
    material = [
        KEY_VERSION,
        normalize_method(shape.method),
        shape.domain,
        shape.upstream,
        shape.path,
        list(sorted_query(shape.query)),
        hashlib.sha256(shape.body).hexdigest() if shape.body else _EMPTY_BODY,
        shape.content_type,
        [list(pair) for pair in shape.vary],
        shape.credentials,
    ]
    return hashlib.sha256(json.dumps(material, separators=(",", ":")).encode()).hexdigest()


_remembered = functools.lru_cache(maxsize=4096)(_fingerprint)


def url_digest(url: str) -> str:
    """An upstream URL as the index of its stored GET answers names it: scheme and host in lower case, the path as
    sent, the query items in the key's order (so that `?b=2&a=1` is `?a=1&b=2`, as in the cache key)."""
    parts = urlsplit(url)
    material = [parts.scheme.lower(), parts.netloc.lower(), parts.path or "/", list(sorted_query(parts.query))]
    return hashlib.sha256(json.dumps(material, separators=(",", ":")).encode()).hexdigest()


def partition(headers: Iterable[tuple[str, str]], query: str, header_names: Collection[str],
              param_names: Collection[str]) -> str:
    """Which upstream credentials a request carries, as a short digest ('' for none): its credential headers
    (`header_names`) and credential query parameters (CREDENTIAL_PARAMS and `param_names`). An upstream's pause,
    and a mapping's per-credential rate limits, apply to the requests of one partition."""
    found = [(name.lower(), value) for name, value in headers if name.lower() in header_names]
    for item in query.split("&") if query else ():
        name, _, value = item.partition("=")
        lowered = name.lower()
        if lowered in CREDENTIAL_PARAMS or lowered in param_names:
            found.append(("?" + lowered, value))
    if not found:
        return ""
    return hashlib.sha256(json.dumps(sorted(found)).encode()).hexdigest()[:16]
