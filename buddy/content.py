"""Upstream bodies as they arrive: read raw, decode gzip/deflate here, and refuse a compressed body cut short.

urllib3 decodes too, but it never checks that a gzip or deflate stream reached its end: an upstream that
marks the end of a body only by closing the connection, and is cut mid-stream, would look complete. Errors
come out as requests' exceptions, like `iter_content`'s, so callers handle one family.
"""
from __future__ import annotations

import zlib
from typing import Iterator

import requests
from urllib3.exceptions import HTTPError, ReadTimeoutError

DECODABLE = frozenset({"gzip", "x-gzip", "deflate"})


def content_coding(value: str) -> str | None:
    """The one coding the proxy decodes (gzip or deflate), or None: absent, identity, or anything else,
    such as `br` or two codings, which are passed on to the client as they came."""
    codings = [c.strip().lower() for c in value.split(",") if c.strip() and c.strip().lower() != "identity"]
    return codings[0] if len(codings) == 1 and codings[0] in DECODABLE else None


def _decompressor(coding: str, first: bytes) -> "zlib._Decompress":
    if coding != "deflate":
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    # 'deflate' is meant to be zlib-wrapped, but some servers send raw deflate: tell them apart by the header.
    wrapped = len(first) >= 2 and first[0] & 0x0F == 8 and (first[0] << 8 | first[1]) % 31 == 0
    return zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)


def body_chunks(response: requests.Response, coding: str | None, size: int, eager: bool = False) -> Iterator[bytes]:
    """The body in chunks of about `size` bytes, decoded when `coding` is given. `eager`: each piece as soon as it
    arrives (a live stream's events), not once `size` bytes have (a chunked body comes a chunk at a time anyway)."""
    decoder = None
    raw_stream = response.raw
    if eager and not raw_stream.chunked:
        pieces: Iterator[bytes] = iter(lambda: raw_stream.read1(size, decode_content=False), b"")
    else:
        pieces = raw_stream.stream(size, decode_content=False)
    try:
        for raw in pieces:
            if coding is None:
                yield raw
                continue
            if decoder is None:
                decoder = _decompressor(coding, raw)
            data = decoder.decompress(raw, size)  # bounded: 64 KiB of gzip can hold gigabytes of zeros
            while data:
                yield data
                data = decoder.decompress(decoder.unconsumed_tail, size) if decoder.unconsumed_tail else b""
    except ReadTimeoutError as exc:
        raise requests.ReadTimeout(str(exc)) from exc
    except (HTTPError, OSError) as exc:
        raise requests.ConnectionError(f"the body broke off: {type(exc).__name__}") from exc
    except zlib.error as exc:
        raise requests.exceptions.ContentDecodingError(f"the {coding} body does not decode: {exc}") from exc
    if decoder is not None:
        tail = decoder.flush()
        if tail:
            yield tail
        if not decoder.eof:
            raise requests.exceptions.ContentDecodingError(f"the {coding} body ended before its end")
