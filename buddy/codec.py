"""Cached response <-> versioned, zstd-compressed bytes; anything that does not decode is a miss, never a crash.

zstd level 1 was chosen by `bench/codec_choice.py`: on ConceptNet- and Wikidata-shaped JSON it compresses
better than zlib level 6 while encoding about 6x and decoding about 4x faster.
"""
from __future__ import annotations

import json
import struct
import threading
from dataclasses import dataclass

import zstandard

MAGIC = b"RB"
VERSION = 1
_HEADER_LEN = struct.Struct(">I")
_local = threading.local()  # zstd contexts are not thread-safe; one pair per thread


def _contexts() -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
    pair = getattr(_local, "pair", None)
    if pair is None:
        pair = _local.pair = (zstandard.ZstdCompressor(level=1), zstandard.ZstdDecompressor())
    return pair


class CodecError(ValueError):
    """The blob is from another format version, truncated or corrupt."""


@dataclass(frozen=True)
class CachedResponse:
    """A stored upstream answer: what the client gets back byte for byte on a hit."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    stored_at: float
    fetch_ms: int = 0  # how long the upstream took: what each hit on this entry saves


def encode(response: CachedResponse) -> bytes:
    meta = json.dumps(
        {"s": response.status, "r": response.reason, "h": response.headers, "t": response.stored_at,
         "d": response.fetch_ms},
        separators=(",", ":"),
    ).encode()
    payload = _HEADER_LEN.pack(len(meta)) + meta + response.body
    return MAGIC + bytes([VERSION]) + _contexts()[0].compress(payload)


def decode(blob: bytes) -> CachedResponse:
    if blob[:2] != MAGIC or len(blob) < 3:
        raise CodecError("not a cached response")
    if blob[2] != VERSION:
        raise CodecError(f"format version {blob[2]}, expected {VERSION}")
    try:
        payload = _contexts()[1].decompress(blob[3:])
        (size,) = _HEADER_LEN.unpack_from(payload)
        meta = json.loads(payload[4 : 4 + size])
        headers = tuple((str(name), str(value)) for name, value in meta["h"])
        return CachedResponse(
            int(meta["s"]), str(meta["r"]), headers, payload[4 + size :], float(meta["t"]), int(meta.get("d", 0))
        )
    except (zstandard.ZstdError, struct.error, ValueError, KeyError, TypeError) as exc:
        raise CodecError(str(exc)) from exc
