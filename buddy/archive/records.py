"""The HTTP messages in WARC records, read as the proxy reads them from an upstream (http.client, urllib3, then
buddy.content's decoding), and requests paired with their responses."""
from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from http.client import HTTPException, parse_headers
from typing import Any, Iterable, Iterator, cast

import requests
from urllib3 import HTTPHeaderDict

from buddy.archive.common import CHUNK, LINE_LIMIT, OWN, Tally, first_line
from buddy.content import body_chunks, content_coding
from buddy.forwarding import upstream_fields
from buddy.upstream import is_interim

PENDING = 4  # records held while waiting for their partner (capture_http writes each response, then its request)
STATUS_LINE = re.compile(r"HTTP/[0-9]\.[0-9] ([0-9]{3})(?: (.*))?")
_REQUEST_LINE = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+) (\S+) HTTP/[0-9]\.[0-9]")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_DIGITS = re.compile(r"[0-9]+")


class Malformed(ValueError):
    """A record's HTTP message cannot be read the way an HTTP client would read it."""


class _Counted:
    """A record's stream, counting what is read of it (a record cut short reads fewer bytes than it declares) and
    hashing it (a seal covers the record's block byte for byte)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.count = 0
        self.hash = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = cast(bytes, self.stream.read(size))
        self.count += len(data)
        self.hash.update(data)
        return data

    def readline(self, size: int = -1) -> bytes:
        data = cast(bytes, self.stream.readline(size))
        self.count += len(data)
        self.hash.update(data)
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
    digest: str = ""  # the SHA-256 of the record's block (its HTTP message as recorded), in hex


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


def _first_message_line(stream: _Counted, what: str) -> str:
    """A request or status line, refused past LINE_LIMIT bytes as http.client refuses it (LineTooLong)."""
    line = stream.readline(LINE_LIMIT + 1)
    if len(line) > LINE_LIMIT:
        raise Malformed(f"{what} over 64 KiB")
    return line.decode("latin-1").rstrip("\r\n")


def read_request(stream: _Counted, body_limit: int) -> Message:
    line = _first_message_line(stream, "a request line")
    if not _REQUEST_LINE.fullmatch(line):
        raise Malformed(f"not an HTTP request line: {line[:80]!r}")
    headers = list(parse_headers(cast(Any, stream)).items())
    message = Message(line, headers, None)
    try:
        message.body = _collect(_framed(stream, headers, request=True), body_limit)
    except Malformed:
        message.short, message.body = True, b""
    return message


def read_response(stream: _Counted, body_limit: int) -> Message:
    """Read as the proxy reads an upstream answer (http.client, urllib3, then buddy.content's decoding)."""
    while True:
        line = _first_message_line(stream, "a status line")
        found = STATUS_LINE.fullmatch(line)
        if not found:
            raise Malformed(f"not an HTTP status line: {line[:80]!r}")
        headers = upstream_fields(HTTPHeaderDict(parse_headers(cast(Any, stream)).items()).items())
        if not is_interim(int(found.group(1))):  # interim answers (100, 102, 103) are skipped, as on a live fetch
            break
    message = Message(line, headers, None)
    status = int(found.group(1))
    if status in (204, 304) or 100 <= status < 200:
        message.body = b""
        return message
    coding = content_coding(HTTPHeaderDict(headers).get("Content-Encoding") or "")
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
            part.message = read_response(stream, limits[1])  # ours hold decoded bodies: nothing to decode
    except (Malformed, HTTPException, UnicodeError) as exc:
        part.problem, part.detail = "malformed HTTP messages", f"{part.kind}: {first_line(exc)}"
    stream.drain()
    part.digest = stream.hash.hexdigest()
    declared = record.length
    if declared is not None and stream.count < int(declared):
        part.problem = "records cut short (a truncated or corrupt file)"
        part.detail = f"{part.kind} of {declared} bytes ends after {stream.count}"
    return part


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
