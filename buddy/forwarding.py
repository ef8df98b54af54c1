"""What passes between client, proxy and upstream: which request headers go upstream, which answer headers reach
the client and which are stored, and the URL the upstream is asked at (paths and queries kept as sent, apart from
unreserved characters; Locations turned back into the proxy's own URLs)."""
from __future__ import annotations

import re
from typing import Collection, Iterable
from urllib.parse import quote, unquote_to_bytes, urljoin, urlsplit

from werkzeug.http import http_date
from werkzeug.urls import iri_to_uri

from buddy.errors import BadProxyRequest
from buddy.settings import DomainSettings

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
     "te", "trailer", "trailers", "transfer-encoding", "upgrade"}
)
# Request headers the proxy sets itself (or that name the proxy, not the upstream).
NOT_FORWARDED = frozenset({"host", "content-length", "accept-encoding", "x-api-buddy-key", "x-buddy-namespace"})
_SEGMENT_SAFE = "!$&'()*+,;=:@~-._"
_QUERY_SAFE = "=&;+%/:?@!$'()*,~-._[]"
_BAD_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_PLAIN_PATH = re.compile(rb"[A-Za-z0-9!$&'()*+,;=:@~._/-]*")
_PLAIN_QUERY = re.compile(rb"[A-Za-z0-9=&;+/:?@!$'()*,~._-]*")
_DOT_SEGMENT = re.compile(rb"(?:^|/)\.\.?(?:/|$)")
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")
_UNRESERVED = re.compile(rb"[A-Za-z0-9._~-]")
_OBS_FOLD = re.compile(r"(?:(?<![ \t])[ \t]+)?\r?\n[ \t]+")  # whitespace, line break, whitespace: one fold


def upstream_fields(items: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """An upstream answer's header fields as the proxy reads them, whichever library parsed the head.

    A value folded onto the next line (obs-fold) has each fold replaced by one space, as RFC 9112 5.2 lets a
    proxy do; http.client keeps folds, urllib3 2.8 and later unfold them itself. A live fetch
    (`UpstreamClient`) and a WARC import (`buddy.archive.records`) both read fields through here, so that the
    two cannot store the same answer differently, whatever their versions.
    """
    return [(name, _OBS_FOLD.sub(" ", value) if "\n" in value else value) for name, value in items]


def dropped_headers(headers: Iterable[tuple[str, str]]) -> frozenset[str]:
    """Hop-by-hop header names, plus every name the message's Connection header lists."""
    listed = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == "connection"
        for token in value.split(",")
        if token.strip()
    }
    return HOP_BY_HOP | listed


def forwardable_request_headers(headers: list[tuple[str, str]]) -> dict[str, str]:
    """What the upstream gets: the client's headers less hop-by-hop ones and those the proxy sets.

    A header sent more than once (in any case) is joined into one field, as HTTP allows, so that the dict
    is exactly what goes on the wire and what the cache key is made of.
    """
    drop = dropped_headers(headers) | NOT_FORWARDED
    out: dict[str, str] = {}
    names: dict[str, str] = {}  # lower case -> the spelling used in `out`
    for name, value in headers:
        lower = name.lower()
        if lower in drop:
            continue
        if lower in names:
            out[names[lower]] += ("; " if lower == "cookie" else ", ") + value
        else:
            names[lower] = name
            out[name] = value
    return out


def client_response_headers(headers: Iterable[tuple[str, str]], decoded: bool) -> list[tuple[str, str]]:
    """What the client gets back; Content-Length is recomputed, Content-Encoding dropped once decoded.

    Headers that could not be sent on (a name that is no token, control characters or line folding in a
    value) are dropped, so that one odd upstream header never turns into a 500, let alone a cached one.
    """
    headers = list(headers)
    drop = dropped_headers(headers) | {"content-length"}
    if decoded:
        drop |= {"content-encoding"}
    return [
        # The upstream's own cache verdict would stand beside the proxy's: the client reads one X-Cache.
        ("X-Upstream-Cache" if name.lower() == "x-cache" else name, value)
        for name, value in headers
        if name.lower() not in drop and _TOKEN.fullmatch(name) and not BAD_VALUE.search(value)
    ]


def dated(headers: list[tuple[str, str]], received: float) -> list[tuple[str, str]]:
    """An upstream answer's fields with a Date: RFC 9110 6.6.1, a proxy with a clock adds the time it received an
    answer that has none (a cached answer's age is counted from it)."""
    if any(name.lower() == "date" for name, _ in headers):
        return headers
    return [*headers, ("Date", http_date(received))]


def storable_headers(headers: Iterable[tuple[str, str]], drop: Collection[str] = ()) -> list[tuple[str, str]]:
    """A stored or shared copy never replays someone's cookies, nor the fields an upstream calls private."""
    return [(name, value) for name, value in headers if name.lower() != "set-cookie" and name.lower() not in drop]


def safe_path(raw_rest: bytes) -> str:
    """The path below the domain as received, made safe: it can only name something under the upstream's base path.

    A segment that is (or, decoded, hides) `.`/`..` or carries control bytes is refused, so `..%2f` cannot climb.
    Otherwise the path is sent (and keyed) as received, but for RFC 3986's normalisation (6.2.2): an escaped
    unreserved character (`%7E`, `%2E`) is decoded, other escapes are kept, in upper case (`%3b` is `%3B`: a
    reserved character escaped is data, not the delimiter, so `a%3Bb` and `a;b` are different resources), and a
    character a path may not hold (a space, a quote, non-ASCII) is escaped.
    """
    if _PLAIN_PATH.fullmatch(raw_rest) and not _DOT_SEGMENT.search(raw_rest):
        return raw_rest.decode("ascii")  # nothing to decode or re-encode: the common case, kept cheap
    if _BAD_PERCENT.search(raw_rest):
        raise BadProxyRequest("malformed percent-encoding in the path")
    out = []
    for segment in raw_rest.split(b"/"):
        decoded = unquote_to_bytes(segment)
        if _CONTROL.search(decoded):
            raise BadProxyRequest("control characters in the path")
        if any(part in (b".", b"..") for part in re.split(rb"[/\\]", decoded)):
            raise BadProxyRequest("the path may not contain '.' or '..' segments")
        normalised = _ESCAPE.sub(_unescape_unreserved, segment)
        out.append(quote(normalised, safe=_SEGMENT_SAFE + "%"))  # (escapes kept; a bare '%' was refused above)
    return "/".join(out)


def _unescape_unreserved(escape: re.Match[bytes]) -> bytes:
    byte = bytes([int(escape.group(1), 16)])
    return byte if _UNRESERVED.fullmatch(byte) else escape.group(0).upper()


def safe_query(raw_query: bytes) -> str:
    """The query as sent, with stray characters (space, '#', non-ASCII) percent-encoded."""
    if _PLAIN_QUERY.fullmatch(raw_query):
        return raw_query.decode("ascii")  # nothing to check or encode: the common case, kept cheap
    if _BAD_PERCENT.search(raw_query):
        raise BadProxyRequest("malformed percent-encoding in the query")
    if _CONTROL.search(raw_query):
        raise BadProxyRequest("control characters in the query")  # encoded ones (%0A in SPARQL) are data
    return quote(raw_query, safe=_QUERY_SAFE)


def upstream_path(domain: DomainSettings, rest: str | None) -> str:
    """`/<domain>` maps to the base path itself; `/<domain>/<rest>` to base path + `/` + rest."""
    if rest is None:
        return domain.base_path or "/"
    return f"{domain.base_path}/{rest}"


def build_url(domain: DomainSettings, path: str, query: str) -> str:
    """The upstream URL; refuses anything whose scheme, host, port or base path differ from the mapping's."""
    url = f"{domain.scheme}://{domain.netloc}{path}" + (f"?{query}" if query else "")
    parts = urlsplit(url)
    if (parts.scheme, parts.netloc.lower()) != (domain.scheme, domain.netloc) or not (
        parts.path == (domain.base_path or "/") or parts.path.startswith(domain.base_path + "/")
    ):
        raise BadProxyRequest("the request does not map to the configured upstream")
    return url


def location_for_client(domain: DomainSettings, request_url: str, location: str) -> str | None:
    """The Location the client gets (see rewrite_location), or None for one that cannot be sent on
    (an invalid port or IPv6 host): dropped like any other header that would break the response."""
    try:
        rewritten = rewrite_location(domain, request_url, location)
        _ = urlsplit(rewritten).port  # raises for a port out of range
        iri_to_uri(rewritten)
    except ValueError:
        return None
    return rewritten


def rewrite_location(domain: DomainSettings, request_url: str, location: str) -> str:
    """Point a redirect within the upstream back through the proxy; leave other redirects alone."""
    absolute = urljoin(request_url, location)
    target = urlsplit(absolute)
    base = domain.base_path
    if (target.scheme, target.netloc.lower()) != (domain.scheme, domain.netloc):
        return location
    if target.path != base and not target.path.startswith(base + "/"):
        return absolute  # same host, outside the mapping: the client must go there itself
    rewritten = f"/{domain.name}{target.path[len(base):]}"
    return rewritten + (f"?{target.query}" if target.query else "")


def keep_access_key(
    headers: list[tuple[str, str]], domain: DomainSettings, prefix: str, param: str
) -> list[tuple[str, str]]:
    """A redirect back through the proxy keeps the access key where this client put it (path or query),
    so that following it is not a 401. Applied per response: the stored copy never holds a key."""
    mapped = f"/{domain.name}"

    def keyed(location: str) -> str:
        if location != mapped and not location.startswith((mapped + "/", mapped + "?")):
            return location
        if param:
            path, mark, query = location.partition("?")
            location = f"{path}?{query}&key={param}" if mark and query else f"{path}?key={param}"
        return f"/{prefix}{location}" if prefix else location

    return [(name, keyed(value) if name.lower() == "location" else value) for name, value in headers]
