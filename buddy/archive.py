"""Cache slices to and from WARC files (ISO 28500, through warcio): `buddy export` and `buddy import`.

An export writes each stored entry as a response record (the stored status, headers and body, dated when it was
stored) and its request record (what the upstream was sent and the entry keyed on, never a credential), with
WARC headers of our own (`WARC-Buddy-*`) for what WARC has no field for. An import reads any WARC, ours or one
recorded by another tool (warcio's `capture_http`, wget, a crawler), rebuilds each entry's key from its recorded
request for the mapping whose upstream the URL belongs to, and stores the answer exactly as the proxy would have
stored it after fetching it live: bodies decoded, hop-by-hop headers and cookies dropped, policy applied.

Both stream: an export reads Redis a SCAN batch at a time and never more than FETCH_BYTES of entries at once; an
import holds at most PENDING records (each at most one body, capped by the proxy's own limits) while it pairs
requests with responses.
"""
from __future__ import annotations

import contextlib
import gzip
import io
import math
import os
import re
import sys
import time
import zlib
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from http.client import HTTPException, parse_headers
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, cast
from urllib.parse import unquote_plus, urlsplit

import click
import requests
from flask import current_app
from flask.cli import with_appcontext
from urllib3 import HTTPHeaderDict
from warcio.archiveiterator import WARCIterator
from warcio.exceptions import ArchiveLoadFailed
from warcio.statusandheaders import StatusAndHeaders, StatusAndHeadersParserException
from warcio.timeutils import datetime_to_iso_date, iso_date_to_datetime
from warcio.warcwriter import WARCWriter

from buddy import codec, policy
from buddy.codec import VaryPointer
from buddy.content import body_chunks, content_coding
from buddy.errors import BadProxyRequest, StoreUnavailable
from buddy.fingerprint import CREDENTIAL_HEADERS
from buddy.messages import ProxyRequest, ProxyResult
from buddy.redaction import spellings
from buddy.redis_keys import EntryId
from buddy.settings import DomainSettings
from buddy.upstream import (
    build_url,
    client_response_headers,
    forwardable_request_headers,
    location_for_client,
    safe_path,
    safe_query,
    storable_headers,
    upstream_path,
)
from buddy.views import NAMESPACE

OWN = "WARC-Buddy-"  # the prefix of the WARC headers this module writes and reads
SCAN_COUNT = 500  # keys per SCAN round trip
FETCH_BYTES = 8 * 1024 * 1024  # entries fetched per MGET at most (one larger entry is fetched alone)
PENDING = 4  # records held while waiting for their partner (capture_http writes each response, then its request)
CHUNK = 64 * 1024
MAX_MESSAGES = 5  # per reason: the rest are counted in the summary only
# Query parameters that carry an upstream credential by convention. Such an entry is never exported: the query
# is part of its key, so it could only be carried with the credential itself.
QUERY_CREDENTIALS = frozenset({
    "key", "api_key", "apikey", "api-key", "access_token", "auth_token", "token", "client_secret", "password",
    "subscription-key", "appid", "app_key", "signature", "x-amz-signature", "x-amz-credential", "x-goog-signature",
})
_DURATION = re.compile(r"([0-9]+)\s*(s|m|h|d|w)?")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_STATUS_LINE = re.compile(r"HTTP/[0-9]\.[0-9] ([0-9]{3})(?: (.*))?")
_REQUEST_LINE = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+) (\S+) HTTP/[0-9]\.[0-9]")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DIGITS = re.compile(r"[0-9]+")


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
        self.echo = echo

    def skip(self, reason: str, detail: str = "", error: bool = False) -> None:
        """Count a skipped entry or record; an error is also told as it happens (where, what), MAX_MESSAGES per
        reason, so that a damaged file shows where it is damaged."""
        counts = self.errors if error else self.skipped
        counts[reason] += 1
        if error and detail and counts[reason] <= MAX_MESSAGES:
            self.echo(f"error: {_printable(detail)}: {reason}")

    def lines(self) -> list[str]:
        out = [f"  {n} {reason}" for reason, n in self.skipped.most_common()]
        return out + [f"  {n} {reason} (error)" for reason, n in self.errors.most_common()]


# -- export ------------------------------------------------------------------------------------------------------


class _WireHeaders(StatusAndHeaders):
    """Headers written byte for byte as the proxy stored them (latin-1, as HTTP carries them), where warcio would
    percent-encode any non-ASCII value."""

    def compute_headers_buffer(self, header_filter: Any = None) -> None:
        self.headers_buff = self.to_str(header_filter).encode("latin-1", "replace") + b"\r\n"


def _iso(when: float) -> str:
    return cast(str, datetime_to_iso_date(datetime.fromtimestamp(when, timezone.utc).replace(tzinfo=None)))


def query_credentials(url: str) -> list[str]:
    """The names of the query parameters in `url` that carry a credential by convention (QUERY_CREDENTIALS)."""
    names = (unquote_plus(item.partition("=")[0]).lower() for item in urlsplit(url).query.split("&") if item)
    return sorted({name for name in names if name in QUERY_CREDENTIALS})


def fresh_left(entry: ProxyResult, ttl_ms: int, now: float) -> int:
    """Seconds of freshness an entry has left (0 once expired); one stored without a lifetime is fresh while kept."""
    if entry.fresh_for is not None:
        return max(0, math.floor(entry.stored_at + entry.fresh_for - now))
    return max(0, ttl_ms // 1000) if ttl_ms > 0 else 0


class Exporter:
    """Writes stored entries to one WARC file (after a warcinfo record): `export()` once per mapping."""

    def __init__(self, buddy: Any, out: IO[bytes], gzip: bool, include_credentialed: bool = False,
                 since: int | None = None, now: float | None = None, filename: str = "") -> None:
        self.buddy = buddy
        self.cache = buddy.service.cache
        self.writer = WARCWriter(out, gzip=gzip)
        self.include_credentialed = include_credentialed
        self.now = time.time() if now is None else now
        self.since = None if since is None else self.now - since
        self.tally = Tally()
        self.bytes = 0
        self.secrets = self._secrets()
        info = {"software": f"reference-api-buddy {_version()}", "format": "WARC File Format 1.0",
                "description": "cache entries of reference-api-buddy; import with `api-buddy import FILE`"}
        self.writer.write_record(self.writer.create_warcinfo_record(filename, info))

    def _secrets(self) -> frozenset[str]:
        """Every spelling of the proxy's access key, read (never generated) so that no record can carry it."""
        key = self.buddy.settings.security["secure_key"]
        if not key:
            store = self.buddy.secure_key
            stored = store.guard.run(lambda: store.client.get(store.name))
            key = stored.decode() if isinstance(stored, bytes) else stored
        return spellings(key) if key else frozenset()

    def export(self, domain: DomainSettings, namespace: str | None = None,
               progress: Callable[[int], None] = lambda n: None) -> None:
        for key, entry, ttl_ms in self._entries(domain.name, namespace, progress):
            reason = self._refusal(domain, entry)
            if reason is not None:
                self.tally.skip(reason)
                continue
            self._write(domain, key, entry, ttl_ms)
            self.tally.done += 1

    def _entries(self, domain: str, namespace: str | None,
                 progress: Callable[[int], None]) -> Iterator[tuple[str, ProxyResult, int]]:
        """(key, entry, its PTTL in ms) for every stored response of the mapping: SCAN a batch, measure it, and
        fetch it in MGETs of at most FETCH_BYTES, so that memory holds one batch's keys and FETCH_BYTES of blobs."""
        client, guard = self.cache.client, self.cache.guard
        pattern, cursor = self.cache.keys.cache_pattern(domain, namespace), 0
        while True:
            cursor, found = guard.run(lambda: client.scan(cursor, match=pattern, count=SCAN_COUNT))
            if found:
                def measure() -> list[int]:
                    pipe = client.pipeline(transaction=False)
                    for key in found:
                        pipe.strlen(key)
                        pipe.pttl(key)
                    return cast(list[int], pipe.execute())
                measured = guard.run(measure)
                sizes, ttls = measured[0::2], measured[1::2]
                for group in _groups(list(zip(found, sizes, ttls)), FETCH_BYTES):
                    blobs = guard.run(lambda: client.mget([key for key, _, _ in group]))
                    for (key, _, ttl_ms), blob in zip(group, blobs):
                        entry = self._decoded(blob)
                        if entry is not None:
                            yield key.decode() if isinstance(key, bytes) else str(key), entry, int(ttl_ms)
                progress(len(found))
            if cursor == 0:
                return

    def _decoded(self, blob: bytes | None) -> ProxyResult | None:
        if blob is None:
            return None  # gone (expired, evicted) between SCAN and GET
        try:
            value = codec.decode(blob)
        except codec.CodecError:
            self.tally.skip("unreadable (another format version, or corrupt)")
            return None
        return value if isinstance(value, ProxyResult) else None  # a vary pointer: its variants are entries

    def _refusal(self, domain: DomainSettings, entry: ProxyResult) -> str | None:
        """Why an entry is not exported, or None."""
        request = entry.request
        if request is None:
            return "stored by an older version (no request recorded)"
        if not request.body_kept:
            return "request body too large to have been kept"
        if self.since is not None and entry.stored_at < self.since:
            return "stored before --since"
        if query_credentials(request.url):
            return "an upstream credential in the query (never exported)"
        if request.credentials and not self.include_credentialed:
            return "keyed on credentials (see --include-credentialed)"
        texts = [request.url, *(v for _, v in request.headers), *(v for _, v in entry.headers)]
        for secret in self.secrets:
            raw = secret.encode("latin-1", "replace")
            if any(secret in text for text in texts) or raw in (entry.body or b"") or raw in request.body:
                return "carries the proxy's access key (never exported)"
        return None

    def _write(self, domain: DomainSettings, key: str, entry: ProxyResult, ttl_ms: int) -> None:
        request = entry.request
        assert request is not None and entry.body is not None
        parts = urlsplit(request.url)
        never = CREDENTIAL_HEADERS + tuple(domain.credential_headers)
        sent = [(n, v) for n, v in request.headers if n.lower() not in never]
        if request.content_type and not any(n.lower() == "content-type" for n, _ in sent):
            sent.append(("Content-Type", request.content_type))
        if request.body:
            sent.append(("Content-Length", str(len(request.body))))
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        left = fresh_left(entry, ttl_ms, self.now)
        keyed = ["method", "url", "body", "content-type", *sorted(set(domain.vary_headers) | set(entry.vary))]
        keyed += ["credentials"] * bool(request.credentials) + ["namespace"] * bool(request.namespace)
        lifetime = entry.fresh_for if entry.fresh_for is not None else math.ceil(self.now - entry.stored_at) + left
        own = {
            "WARC-Date": _iso(entry.stored_at),
            OWN + "Mapping": domain.name,
            OWN + "Stored-At": f"{entry.stored_at:.6f}",
            OWN + "Fresh-For": str(lifetime),
            OWN + "Fresh-Left": str(left),
            OWN + "Keyed-On": ", ".join(keyed),
            OWN + "Entry": key.rsplit(":", 1)[-1],
            OWN + "Fetch-Ms": str(entry.fetch_ms),
        }
        if entry.vary:
            own[OWN + "Vary"] = ", ".join(entry.vary)
        if request.credentials:
            own[OWN + "Credentials"] = request.credentials
        if request.namespace:
            own[OWN + "Namespace"] = request.namespace
        response = self.writer.create_warc_record(
            request.url, "response", payload=io.BytesIO(entry.body), length=len(entry.body), warc_headers_dict=own,
            http_headers=_WireHeaders(f"{entry.status} {entry.reason}".rstrip(),
                                      [*entry.headers, ("Content-Length", str(len(entry.body)))], protocol="HTTP/1.1"),
        )
        sent_request = self.writer.create_warc_record(
            request.url, "request", payload=io.BytesIO(request.body), length=len(request.body),
            warc_headers_dict={OWN + "Mapping": domain.name},
            http_headers=_WireHeaders(f"{request.method} {target} HTTP/1.1", [("Host", parts.netloc), *sent]),
        )
        self.writer.write_request_response_pair(sent_request, response)
        self.bytes += len(entry.body)


def _groups(items: list[tuple[Any, int, int]], budget: int) -> Iterator[list[tuple[Any, int, int]]]:
    group: list[tuple[Any, int, int]] = []
    size = 0
    for item in items:
        if group and size + item[1] > budget:
            yield group
            group, size = [], 0
        group.append(item)
        size += max(0, item[1])
    if group:
        yield group


def _version() -> str:
    from buddy import __version__

    return __version__


# -- reading WARC records ----------------------------------------------------------------------------------------


class Malformed(ValueError):
    """A record's HTTP message cannot be read the way an HTTP client would read it."""


class _Counted:
    """A record's stream, counting what is read of it (a record cut short reads fewer bytes than it declares)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = cast(bytes, self.stream.read(size))
        self.count += len(data)
        return data

    def readline(self, size: int = -1) -> bytes:
        data = cast(bytes, self.stream.readline(size))
        self.count += len(data)
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


@dataclass
class Message:
    """An HTTP message as a client reads it: first line, headers (each as sent), body (None: over its limit)."""

    first_line: str
    headers: list[tuple[str, str]]
    body: bytes | None
    short: bool = False  # fewer bytes than its Content-Length, or a chunked body without its last chunk
    decoded: bool = False  # a gzip/deflate body, decoded as the proxy decodes it


@dataclass
class Part:
    """One request or response record, read whole (its body within limits) so that its partner may come later."""

    kind: str
    record_id: str
    links: tuple[str, ...]
    uri: str
    date: str
    where: str
    own: dict[str, str] = field(default_factory=dict)  # our WARC-Buddy-* headers, lower-case names
    message: Message | None = None
    problem: str = ""  # why it could not be read (a reason of the summary); its pair is dropped quietly
    detail: str = ""


def _dechunked(stream: _Counted) -> Iterator[bytes]:
    """A chunked body's data, a bounded piece at a time; Malformed for bad framing or a missing last chunk."""
    while True:
        line = stream.readline(1024)
        if not line.endswith(b"\n"):
            raise Malformed("the chunked body ends before its last chunk")
        size_text = line.split(b";", 1)[0].strip()
        if not _CHUNK_SIZE.fullmatch(size_text):
            raise Malformed("a chunk size that is not hexadecimal")
        size = int(size_text, 16)
        if size == 0:
            while stream.readline(65537).strip():  # trailers, up to the blank line (or the record's end)
                pass
            return
        while size:
            data = stream.read(min(size, CHUNK))
            if not data:
                raise Malformed("the chunked body ends inside a chunk")
            size -= len(data)
            yield data
        stream.readline(3)  # the CRLF after the chunk's data


def _sized(stream: _Counted, length: int | None) -> Iterator[bytes]:
    """Up to `length` bytes (the rest of the record when None); Malformed when fewer arrive."""
    left = length
    while left is None or left > 0:
        data = stream.read(CHUNK if left is None else min(left, CHUNK))
        if not data:
            if left is not None:
                raise Malformed("the body is shorter than its Content-Length")
            return
        if left is not None:
            left -= len(data)
        yield data


class _Raw:
    """What buddy.content.body_chunks reads an upstream body from (`response.raw.stream`), over a record's bytes."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.raw = self
        self.chunks = chunks

    def stream(self, size: int, decode_content: bool = False) -> Iterator[bytes]:
        return self.chunks


def _framed(stream: _Counted, headers: list[tuple[str, str]], request: bool) -> Iterator[bytes]:
    """The body as http.client frames it: chunked, else Content-Length, else (a response) to the record's end."""
    by_name = HTTPHeaderDict(headers)
    if (by_name.get("Transfer-Encoding") or "").lower() == "chunked":
        return _dechunked(stream)
    length = (by_name.get("Content-Length") or "").strip()
    if _DIGITS.fullmatch(length):
        return _sized(stream, int(length))
    if length:
        raise Malformed(f"Content-Length {length!r}")
    return iter(()) if request else _sized(stream, None)


def _collect(chunks: Iterable[bytes], limit: int) -> bytes | None:
    """The body whole, or None past `limit` bytes (what remains is left for the record's drain)."""
    buffer = bytearray()
    for chunk in chunks:
        buffer += chunk
        if len(buffer) > limit:
            return None
    return bytes(buffer)


def read_request(stream: _Counted, body_limit: int) -> Message:
    line = stream.readline(65537).decode("latin-1").rstrip("\r\n")
    if not _REQUEST_LINE.fullmatch(line):
        raise Malformed(f"not an HTTP request line: {line[:80]!r}")
    headers = list(parse_headers(cast(Any, stream)).items())
    message = Message(line, headers, None)
    try:
        message.body = _collect(_framed(stream, headers, request=True), body_limit)
    except Malformed:
        message.short, message.body = True, b""
    return message


def read_response(stream: _Counted, body_limit: int, decode: bool) -> Message:
    """Read as the proxy reads an upstream answer (http.client, urllib3, then buddy.content's decoding)."""
    while True:
        line = stream.readline(65537).decode("latin-1").rstrip("\r\n")
        found = _STATUS_LINE.fullmatch(line)
        if not found:
            raise Malformed(f"not an HTTP status line: {line[:80]!r}")
        headers = list(HTTPHeaderDict(parse_headers(cast(Any, stream)).items()).items())
        if found.group(1) != "100":  # http.client skips an interim 100 Continue
            break
    message = Message(line, headers, None)
    status = int(found.group(1))
    if status in (204, 304) or 100 <= status < 200:
        message.body = b""
        return message
    coding = content_coding(HTTPHeaderDict(headers).get("Content-Encoding") or "") if decode else None
    try:
        chunks = _framed(stream, headers, request=False)
        if coding is not None:
            chunks = body_chunks(cast(requests.Response, _Raw(chunks)), coding, CHUNK)
            message.decoded = True
        message.body = _collect(chunks, body_limit)
    except (Malformed, requests.RequestException) as exc:
        if isinstance(exc, requests.exceptions.ContentDecodingError):
            raise Malformed(f"the {coding} body does not decode") from exc
        message.short, message.body = True, b""
    return message


def read_part(record: Any, where: str, limits: tuple[int, int]) -> Part:
    """A request or response record, read whole within `limits` (request body, response body)."""
    headers = record.rec_headers
    part = Part(
        kind=record.rec_type,
        record_id=headers.get_header("WARC-Record-ID") or f"<unnamed {where}>",
        links=tuple(v for n, v in headers.headers if n.lower() == "warc-concurrent-to"),
        uri=headers.get_header("WARC-Target-URI") or "",
        date=headers.get_header("WARC-Date") or "",
        where=where,
        own={n.lower(): v for n, v in headers.headers if n.lower().startswith(OWN.lower())},
    )
    stream = _Counted(record.raw_stream)
    try:
        if part.kind == "request":
            part.message = read_request(stream, limits[0])
        else:
            part.message = read_response(stream, limits[1], decode=OWN.lower() + "stored-at" not in part.own)
    except (Malformed, HTTPException, UnicodeError) as exc:
        part.problem, part.detail = "malformed HTTP messages", f"{part.kind}: {_first_line(exc)}"
    stream.drain()
    declared = record.length
    if declared is not None and stream.count < int(declared):
        part.problem = "records cut short (a truncated or corrupt file)"
        part.detail = f"{part.kind} of {declared} bytes ends after {stream.count}"
    return part


class _WholeGzip(Exception):
    """The file is gzipped as one stream (`gzip file.warc`), not one member per record as .warc.gz should be."""


class Reader:
    """The request and response records of one WARC file, in order; past a corrupt stretch it looks for the next
    record (a gzip member, or a `WARC/1.` line) and goes on. Problems are reported to `tally` as errors."""

    def __init__(self, path: Path, tally: Tally, limits: tuple[int, int],
                 progress: Callable[[int], None] = lambda n: None) -> None:
        self.path = path
        self.tally = tally
        self.limits = limits
        self.progress = progress
        self._records_read = 0
        self._shown = 0

    def parts(self) -> Iterator[Part]:
        with open(self.path, "rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
            try:
                yield from self._parts(raw, raw, gzipped, skip=0)
            except _WholeGzip:  # warcio reads one member per record only: read it as the plain WARC it holds
                raw.seek(0)
                with gzip.GzipFile(fileobj=raw) as whole:
                    yield from self._parts(cast(IO[bytes], whole), raw, gzipped=False, skip=self._records_read)
            self.progress(os.fstat(raw.fileno()).st_size - self._shown)

    def _parts(self, fh: IO[bytes], raw: IO[bytes], gzipped: bool, skip: int) -> Iterator[Part]:
        start: int | None = 0
        resyncing = False
        while start is not None:
            at = good = start
            fh.seek(at)
            iterator = WARCIterator(fh, no_record_parse=True)
            try:
                for record in self._quietly(iterator):
                    resyncing = False  # a record was read: a later failure is a new corrupt stretch
                    self._records_read += 1
                    offset = iterator.offset
                    if self._records_read <= skip:
                        pass  # read before, as the first member of a file gzipped whole
                    elif record.rec_type in ("request", "response"):
                        part = read_part(record, f"{self.path.name} at offset {offset}", self.limits)
                        if part.problem:
                            self.tally.skip(part.problem, f"{part.where}: {part.detail}", error=True)
                        yield part
                    elif record.rec_type == "revisit":
                        self.tally.skip("revisit records (they point at a body elsewhere)")
                    with contextlib.redirect_stderr(io.StringIO()):  # (see _quietly)
                        iterator.read_to_end()
                    good = iterator.offset
                    self.progress(raw.tell() - self._shown)
                    self._shown = raw.tell()
                start = None
                fh.seek(good)
                if fh is raw and fh.read(4096).strip():  # (a file gzipped whole says so itself: EOFError)
                    self.tally.skip("records cut short (a truncated or corrupt file)",
                                    f"{self.path.name} at offset {good}: the file ends inside a record", error=True)
            except (ArchiveLoadFailed, StatusAndHeadersParserException, EOFError, OSError, zlib.error) as exc:
                if gzipped and "non-chunked gzip" in str(exc):
                    raise _WholeGzip() from exc
                if not resyncing:  # one message per corrupt stretch, not one per attempt to get past it
                    what = "not a WARC file" if good == 0 else "corrupt data"
                    self.tally.skip(what, f"{self.path.name} at offset {good}: {_first_line(exc)}", error=True)
                start, resyncing = self._next_record(fh, max(good, at) + 1, gzipped), True

    @staticmethod
    def _quietly(iterator: WARCIterator) -> Iterator[Any]:
        """warcio writes its own warnings to stderr; ours are in the tally."""
        while True:
            with contextlib.redirect_stderr(io.StringIO()):
                record = next(iterator, None)
            if record is None:
                return
            yield record

    @staticmethod
    def _next_record(fh: IO[bytes], start: int, gzipped: bool) -> int | None:
        marker = b"\x1f\x8b\x08" if gzipped else b"\nWARC/1."
        fh.seek(start)
        carry = b""
        position = start
        while True:
            chunk = fh.read(1024 * 1024)
            if not chunk:
                return None
            data = carry + chunk
            found = data.find(marker)
            if found >= 0:
                return position - len(carry) + found + (0 if gzipped else 1)
            carry = data[-(len(marker) - 1):]
            position += len(chunk)


def _printable(text: str) -> str:
    """One line of printable ASCII: a damaged or hostile record must not write escape sequences to a terminal."""
    return " ".join("".join(c if c.isascii() and c.isprintable() else " " for c in text).split())


def _first_line(exc: BaseException) -> str:
    """An exception's message on one line, printable, at most 120 characters (warcio quotes binary data)."""
    if str(exc).startswith("Invalid WARC record"):
        return "no WARC record starts here"  # warcio's message goes on with the bytes it found: binary noise
    text = _printable(str(exc))
    return (text[:117] + "...") if len(text) > 120 else text or type(exc).__name__


def pairs(parts: Iterable[Part], tally: Tally) -> Iterator[tuple[Part, Part]]:
    """(request, response) pairs: linked by WARC-Concurrent-To either way, else adjacent with the same URI; a
    response left without its request is an error, a request without its response is merely skipped."""
    pending: OrderedDict[str, Part] = OrderedDict()

    def unpaired(part: Part) -> None:
        if part.problem:
            return
        if part.kind == "response":
            tally.skip("a response record with no request record", f"{part.where} ({part.uri})", error=True)
        else:
            tally.skip("a request record with no response record")

    for part in parts:
        partner = next((p for p in reversed(pending.values()) if p.kind != part.kind and (
            p.record_id in part.links or part.record_id in p.links)), None)
        if partner is None and not part.links:
            partner = next((p for p in reversed(pending.values())
                            if p.kind != part.kind and not p.links and p.uri == part.uri), None)
        if partner is None:
            pending[part.record_id] = part
            while len(pending) > PENDING:
                unpaired(pending.popitem(last=False)[1])
            continue
        del pending[partner.record_id]
        if part.problem or partner.problem:
            continue
        yield (part, partner) if part.kind == "request" else (partner, part)
    for part in pending.values():
        unpaired(part)


# -- import ------------------------------------------------------------------------------------------------------


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


def _origin(url: str) -> tuple[str, str, int, str, str]:
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
    scheme, host, port, path, _ = _origin(url)
    for rule in maps:
        if rule.matches(scheme, host, port, path):
            domain = domains[rule.name]
            rest = _below(path, domain.base_path if rule.base is None else rule.base)
            return None if rest is False else (domain, cast("str | None", rest))
    candidates = sorted(domains.values(), key=lambda d: (d.name != recorded, -len(d.base_path)))
    for domain in candidates:
        up_scheme, up_host, up_port, _, _ = _origin(domain.upstream_id)
        rest = _below(path, domain.base_path)
        if (scheme, host, port) == (up_scheme, up_host, up_port) and rest is not False:
            return domain, cast("str | None", rest)
    return None


@dataclass
class ImportOptions:
    maps: tuple[HostMap, ...] = ()
    ttl: int | None = None
    overwrite: bool = False
    namespace: str | None = None


class Importer:
    """Stores (request, response) pairs as the proxy would have stored them after fetching them live."""

    def __init__(self, buddy: Any, options: ImportOptions, tally: Tally,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = buddy.settings
        self.cache = buddy.service.cache
        self.options = options
        self.tally = tally
        self.clock = clock
        self.now = clock()

    @property
    def limits(self) -> tuple[int, int]:
        return self.settings.server["max_request_body"], self.settings.cache["max_cache_response_size"]

    def store(self, request: Part, response: Part) -> None:
        where = f"{response.where} ({response.uri or request.uri})"
        self.now = self.clock()  # an import may take minutes: each entry's freshness is reckoned when it is stored
        try:
            reason = self._store(request, response)
        except _Refused as refused:
            self.tally.skip(refused.reason, where, error=refused.error)
            return
        except (ValueError, UnicodeError) as exc:  # what a damaged record can still hold: a URL with no valid port...
            self.tally.skip("records that cannot be read", f"{where}: {_first_line(exc)}", error=True)
            return
        if reason is None:
            self.tally.done += 1
        else:
            self.tally.skip(reason, where)

    def _store(self, recorded: Part, answer: Part) -> str | None:
        """None once stored, else why not (raises _Refused for what counts as an error)."""
        sent, got = recorded.message, answer.message
        assert sent is not None and got is not None
        url = (recorded.uri or answer.uri).split("#", 1)[0]
        if urlsplit(url).scheme.lower() not in ("http", "https") or not urlsplit(url).hostname:
            raise _Refused("a WARC-Target-URI that is not an http(s) URL", error=True)
        found = resolve(self.settings.domains, url, answer.own.get("warc-buddy-mapping", ""), self.options.maps)
        if found is None:
            scheme, host, port, _, _ = _origin(url)
            raise _Refused(f"no mapping for {scheme}://{host}:{port} (see --map HOST=NAME)", error=True)
        domain, rest_text = found
        method = sent.first_line.split(" ", 1)[0].upper()
        if method == "HEAD":
            return "HEAD requests (no body was recorded)"
        if method not in policy.CACHEABLE_METHODS:
            return f"{method} requests (never cached)"
        if sent.short or sent.body is None:
            return "request body over server.max_request_body, or cut short"
        try:
            rest = None if rest_text is None else safe_path(rest_text.encode("utf-8"))
            query = safe_query(_origin(url)[4].encode("utf-8"))
            upstream_url = build_url(domain, upstream_path(domain, rest), query)
        except BadProxyRequest as exc:
            raise _Refused(f"a URL the proxy would refuse ({exc})", error=True) from None
        namespace = self.options.namespace
        if namespace is None:
            namespace = answer.own.get("warc-buddy-namespace", "")
        if namespace and not NAMESPACE.fullmatch(namespace):
            raise _Refused("a WARC-Buddy-Namespace the proxy would refuse", error=True)
        request = ProxyRequest(
            domain=domain, method=method, path=upstream_path(domain, rest), query=query, headers=sent.headers,
            body=sent.body, forwarded=forwardable_request_headers(sent.headers), namespace=namespace,
        )
        if not policy.cacheable_request(request):
            return "conditional or range requests (never cached)"
        result = self._result(domain, upstream_url, answer)
        if isinstance(result, str):
            return result
        storage = policy.storage(domain, result)
        if storage.ttl is None:
            return ("answers marked private or no-store, or with Vary: *" if not storage.shareable
                    else f"status {result.status} (never stored)")
        credentials = self._credentials(request, answer)
        primary = policy.entry_for(request, credentials)
        target = primary
        if storage.vary:
            target = EntryId(domain.name, policy.variant_digest(primary.digest, storage.vary, request.forwarded))
        fresh_for = self._fresh_for(answer, result.stored_at, storage.ttl)
        left = result.stored_at + fresh_for - self.now
        if left <= 0:
            return "expired (give them new freshness with --ttl)"
        if not self.options.overwrite and self._fresher_kept(primary, target, result.stored_at + fresh_for):
            return "already cached, as fresh or fresher (see --overwrite)"
        stored_request = policy.stored_request(request, upstream_url, storage.vary)
        if credentials is not None:
            stored_request = replace(stored_request, credentials=credentials)
        kept = ProxyResult(
            result.status, result.reason, storable_headers(result.headers, storage.drop), result.body,
            fetch_ms=result.fetch_ms, stored_at=result.stored_at, vary=storage.vary,
            variant=target.digest if storage.vary else "", fresh_for=fresh_for, request=stored_request,
        )
        pointer = None
        if storage.vary:
            lifetime = max(domain.ttl_seconds, domain.negative_ttl_seconds)
            pointer = (primary, VaryPointer(storage.vary), policy.kept_for(domain, lifetime))
        self.cache.put(target, kept, policy.kept_for(domain, math.ceil(left)), pointer)
        return None

    def _result(self, domain: DomainSettings, url: str, answer: Part) -> ProxyResult | str:
        """The answer as the proxy would hold it after reading it from the upstream (before policy)."""
        got = answer.message
        assert got is not None
        if got.body is None:
            return "bodies over cache.max_cache_response_size (never stored)"
        if got.short:
            raise _Refused("a body cut short (shorter than its Content-Length, or chunks missing)", error=True)
        found = _STATUS_LINE.fullmatch(got.first_line)
        assert found is not None
        status, reason = int(found.group(1)), (found.group(2) or "").strip()
        if not 200 <= status <= 599 or _CONTROL.search(reason):
            return "malformed status lines (never stored)"
        own = "warc-buddy-stored-at" in answer.own
        headers = client_response_headers(got.headers, got.decoded)
        if not own:
            headers = [(n, v) for n, v in ((n, location_for_client(domain, url, v) if n.lower() == "location"
                                            else v) for n, v in headers) if v is not None]
        stored_at = _number(answer.own.get("warc-buddy-stored-at")) if own else None
        if stored_at is None:
            try:
                stored_at = iso_date_to_datetime(answer.date, tz_aware=True).timestamp()
            except (ValueError, TypeError, OverflowError):
                raise _Refused(f"a WARC-Date that is not a date ({answer.date!r})", error=True) from None
        fetch_ms = int(_number(answer.own.get("warc-buddy-fetch-ms")) or 0)
        return ProxyResult(status, reason, headers, got.body, fetch_ms=fetch_ms, stored_at=min(stored_at, self.now),
                           upstream_headers=None if own else got.headers)

    def _credentials(self, request: ProxyRequest, answer: Part) -> str | None:
        """The credential digest recorded by our export (whose request never carries the values); None: compute
        it from the recorded headers, as the proxy does."""
        digest = answer.own.get("warc-buddy-credentials", "")
        domain = request.domain
        if not digest or domain.share_across_credentials:
            return None
        if any(name.lower() in domain.credential_headers for name in request.forwarded):
            return None
        return digest

    def _fresh_for(self, answer: Part, stored_at: float, ttl: int) -> int:
        if self.options.ttl is not None:
            return math.ceil(self.now - stored_at) + self.options.ttl
        recorded = _number(answer.own.get("warc-buddy-fresh-for"))
        return ttl if recorded is None else min(int(recorded), ttl)

    def _fresher_kept(self, primary: EntryId, target: EntryId, until: float) -> bool:
        """Does the cache already hold, where this would go, an entry fresh at least until `until`?"""
        for at in {primary, target}:
            held = self.cache.get(at)
            if isinstance(held, ProxyResult):
                held_until = math.inf if held.fresh_for is None else held.stored_at + held.fresh_for
                if held_until >= until:
                    return True
        return False


class _Refused(Exception):
    def __init__(self, reason: str, error: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) and value >= 0 else None


def import_files(buddy: Any, paths: Iterable[Path], options: ImportOptions, tally: Tally,
                 progress: Callable[[int], None] = lambda n: None) -> None:
    importer = Importer(buddy, options, tally)
    for path in paths:
        reader = Reader(path, tally, importer.limits, progress)
        for request, response in pairs(reader.parts(), tally):
            importer.store(request, response)


# -- the commands ------------------------------------------------------------------------------------------------


def _namespace(value: str | None) -> str | None:
    if value is not None and not NAMESPACE.fullmatch(value):
        raise click.BadParameter("1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return value


def _redis_down(exc: StoreUnavailable) -> click.ClickException:
    return click.ClickException(f"Redis is unavailable: {exc}")


@click.command("export")
@click.argument("names", nargs=-1, metavar="[NAME ...]")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, writable=True),
              help="The WARC file to write; gzipped (one member per record) when it ends in .gz.")
@click.option("--namespace", callback=lambda ctx, param, value: _namespace(value),
              help="Only the entries stored under this X-Buddy-Namespace.")
@click.option("--since", type=Duration(), help="Only entries stored within this long (90s, 15m, 2h, 7d, 1w).")
@click.option("--include-credentialed", is_flag=True,
              help="Also entries keyed on upstream credentials: they carry the credentials' digest, never a value.")
@with_appcontext
def export_command(names: tuple[str, ...], output: str, namespace: str | None, since: int | None,
                   include_credentialed: bool) -> None:
    """Write the cached entries of NAME (every mapping when none is named) to a WARC file, as request and
    response records that any WARC tool reads and `import` loads into another proxy's cache."""
    buddy = current_app.extensions["buddy"]
    unknown = [name for name in names if name not in buddy.settings.domains]
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)}: not configured; choose from "
                                 f"{', '.join(sorted(buddy.settings.domains))}", param_hint="NAME")
    target = Path(output)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        census = buddy.service.cache.census(max_age=0)
        chosen = [buddy.settings.domains[n] for n in (names or sorted(buddy.settings.domains))]
        total = sum(census.describe(d.name).entries for d in chosen)
        with open(partial, "wb") as out, click.progressbar(length=total, label="exporting", file=sys.stderr) as bar:
            exporter = Exporter(buddy, out, gzip=target.name.endswith(".gz"),
                                include_credentialed=include_credentialed, since=since, filename=target.name)
            for domain in chosen:
                exporter.export(domain, namespace, bar.update)
        os.replace(partial, target)
    except StoreUnavailable as exc:
        raise _redis_down(exc) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    tally = exporter.tally
    click.echo(f"exported {tally.done} entries ({exporter.bytes} bytes of bodies) to {target}")
    if tally.skipped or tally.errors:
        click.echo(f"not exported: {sum(tally.skipped.values()) + sum(tally.errors.values())}")
        for line in tally.lines():
            click.echo(line)


@click.command("import")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--map", "maps", multiple=True, metavar="OLD-HOST=NAME",
              help="Records of OLD-HOST (host, host:port, or scheme://host[:port]/base) go to mapping NAME.")
@click.option("--ttl", type=Duration(), help="Fresh for this long from now, whatever was recorded (also "
              "revives expired entries).")
@click.option("--overwrite", is_flag=True, help="Replace entries the cache holds even when they are fresher.")
@click.option("--namespace", callback=lambda ctx, param, value: _namespace(value),
              help="Store every entry under this X-Buddy-Namespace instead of the recorded one.")
@with_appcontext
def import_command(files: tuple[str, ...], maps: tuple[str, ...], ttl: int | None, overwrite: bool,
                   namespace: str | None) -> None:
    """Load the request/response pairs of WARC FILEs into the cache, keyed as the proxy keys the same requests:
    ours from `export`, or recorded by another tool (warcio's capture_http, a crawler). Exits 1 when a record
    could not be imported for an error (a corrupt file, no mapping for its host, a response with no request)."""
    buddy = current_app.extensions["buddy"]
    try:
        rules = tuple(HostMap.parse(text) for text in maps)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--map") from None
    for rule in rules:
        if rule.name not in buddy.settings.domains:
            raise click.BadParameter(f"{rule.name}: not configured; choose from "
                                     f"{', '.join(sorted(buddy.settings.domains))}", param_hint="--map")
    tally = Tally(lambda line: click.echo(line, err=True))
    paths = [Path(f) for f in files]
    options = ImportOptions(rules, ttl, overwrite, namespace)
    total = sum(p.stat().st_size for p in paths)
    try:
        with click.progressbar(length=total, label="importing", file=sys.stderr) as bar:
            import_files(buddy, paths, options, tally, bar.update)
    except StoreUnavailable as exc:
        raise _redis_down(exc) from exc
    skipped = sum(tally.skipped.values()) + sum(tally.errors.values())
    click.echo(f"imported {tally.done} entries from {len(paths)} file{'s' if len(paths) != 1 else ''}"
               + (f"; skipped {skipped}:" if skipped else ""))
    for line in tally.lines():
        click.echo(line)
    if tally.errors:
        sys.exit(1)
