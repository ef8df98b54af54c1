"""Stored values <-> versioned bytes; anything that does not decode is a miss, never a crash.

Three kinds of value live under a cache key or a leader's shared-result key:
- a response (`RB`): zstd-compressed metadata and body;
- a vary pointer (`RV`): the upstream said `Vary: <names>`, so the answers live under variant keys made
  from the values of those request headers (see policy.variant_digest);
- "not for sharing" (`RP`): a leader's answer that its followers must not be given (private, no-store,
  Vary: *); each follower asks the upstream itself.

zstd level 1 was chosen by `bench/codec_choice.py`: on ConceptNet- and Wikidata-shaped JSON it compresses
better than zlib level 6 while encoding about 6x and decoding about 4x faster.
"""
from __future__ import annotations

import base64
import io
import json
import struct
import threading
from typing import IO, NamedTuple, cast

import zstandard

from buddy.messages import ProxyResult, StoredRequest, StoredRules

MAGIC = b"RB"
POINTER_MAGIC = b"RV"
NOT_SHARED = b"RP\x01"
VERSION = 1
LEVEL = 1  # zstd's (see the module's doc)
_HEADER_LEN = struct.Struct(">I")
_FRAME_HEADER_MAX = 18  # bytes: the longest a zstd frame header can be (ZSTD_FRAMEHEADERSIZE_MAX)
LARGE_BLOB = 256 * 1024  # bytes: past this, a blob goes to Redis without being copied into the command (sendable)
_local = threading.local()  # zstd contexts are not thread-safe; one pair per thread


def _contexts() -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
    pair = getattr(_local, "pair", None)
    if pair is None:
        pair = _local.pair = (zstandard.ZstdCompressor(level=LEVEL), zstandard.ZstdDecompressor())
    return pair


class CodecError(ValueError):
    """The blob is from another format version, truncated or corrupt."""


class VaryPointer(NamedTuple):
    """Stored at a request's primary key when the upstream's answers vary on these request headers."""

    names: tuple[str, ...]


def encode(response: ProxyResult) -> bytes:
    """A response with a whole body (a stream is never stored)."""
    assert response.body is not None, "only whole bodies are stored"
    fields = {"s": response.status, "r": response.reason, "h": response.headers, "t": response.stored_at,
              "d": response.fetch_ms}
    if response.vary:
        fields.update(v=response.vary, k=response.variant)
    if response.fresh_for is not None:
        fields["f"] = response.fresh_for
    if response.request is not None:
        fields["q"] = _request_fields(response.request)
    if response.rules is not None:
        fields["g"] = _rules_fields(response.rules)
    meta = json.dumps(fields, separators=(",", ":")).encode()
    # One frame of (meta length, meta, body), compressed as the parts come, into the buffer the blob is taken from:
    # the body is never copied into a payload, nor the compressed bytes into a blob (getvalue() shares the buffer).
    out = io.BytesIO()
    out.write(MAGIC + bytes([VERSION]))
    # A large body's compressor is its own: one kept for the thread would keep the workspace sized for it (1.4 MB for
    # 10 MB), in every thread that ever stored one.
    compressor = _contexts()[0] if len(response.body) <= LARGE_BLOB else zstandard.ZstdCompressor(level=LEVEL)
    writer = compressor.stream_writer(out, size=_HEADER_LEN.size + len(meta) + len(response.body), closefd=False)
    writer.write(_HEADER_LEN.pack(len(meta)) + meta)
    writer.write(response.body)
    writer.flush(zstandard.FLUSH_FRAME)
    return out.getvalue()


def sendable(blob: bytes) -> bytes | memoryview:
    """A blob as it is handed to redis-py: a large one as a memoryview, which redis-py writes to the socket as it
    is; with hiredis installed, bytes are first packed into one buffer with the command (a copy of the blob)."""
    return memoryview(blob) if len(blob) > LARGE_BLOB else blob


def encode_pointer(pointer: VaryPointer) -> bytes:
    return POINTER_MAGIC + bytes([VERSION]) + json.dumps(list(pointer.names)).encode()


def decode(blob: bytes | list[bytes]) -> ProxyResult | VaryPointer:
    """A stored response or vary pointer; CodecError for anything else (including the not-shared mark).
    `blob`: the value, or a list of its pieces in order (as buddy.store.pieces reads a large one), which is emptied
    as they are decompressed: a piece is let go of once it has been read."""
    if isinstance(blob, list):
        if len(blob) > 1 and blob[0][:2] == MAGIC:
            return _decode_response(blob)
        blob = b"".join(blob)  # one piece, or not a response (nothing else is ever large)
    if len(blob) < 3 or blob[:2] not in (MAGIC, POINTER_MAGIC):
        raise CodecError("not a stored value")
    if blob[2] != VERSION:
        raise CodecError(f"format version {blob[2]}, expected {VERSION}")
    try:
        if blob[:2] == POINTER_MAGIC:
            names = json.loads(blob[3:])
            if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
                raise CodecError("a vary pointer must list header names")
            return VaryPointer(tuple(names))
        return _decode_response([blob])
    except (zstandard.ZstdError, struct.error, ValueError, KeyError, TypeError) as exc:
        raise CodecError(str(exc)) from exc


def _decode_response(pieces: list[bytes]) -> ProxyResult:
    """A stored response from its pieces (the first holds at least its magic and version)."""
    if len(pieces[0]) < 3 or pieces[0][:2] != MAGIC or pieces[0][2] != VERSION:
        raise CodecError("not a stored response of this version")
    try:
        meta, body = _meta_and_body(pieces)
        headers = [(str(name), str(value)) for name, value in meta["h"]]
        return ProxyResult(
            int(meta["s"]), str(meta["r"]), headers, body, fetch_ms=int(meta.get("d", 0)),
            stored_at=float(meta["t"]), vary=tuple(str(n) for n in meta.get("v", ())), variant=str(meta.get("k", "")),
            fresh_for=None if meta.get("f") is None else float(meta["f"]),
            request=None if meta.get("q") is None else _stored_request(meta["q"]),
            rules=None if meta.get("g") is None else _stored_rules(meta["g"]),
        )
    except (zstandard.ZstdError, struct.error, ValueError, KeyError, TypeError) as exc:
        raise CodecError(str(exc)) from exc


def _meta_and_body(pieces: list[bytes]) -> tuple[dict, bytes]:
    """A response's meta and body from the pieces of its blob, the body decompressed straight into its own bytes
    (no payload to slice it from: reading a 10 MB entry makes one 10 MB body, not two); each piece is let go of
    once it has been decompressed."""
    total = zstandard.frame_content_size(pieces[0][3 : 3 + _FRAME_HEADER_MAX])
    if total < _HEADER_LEN.size:  # -1: a frame that does not say its size (never written here)
        raise CodecError("a response frame must say its size")
    reader = _contexts()[1].stream_reader(cast(IO[bytes], _PieceSource(pieces, skip=3)), read_across_frames=False)
    (size,) = _HEADER_LEN.unpack(_read_exactly(reader, _HEADER_LEN.size))
    if size > total - _HEADER_LEN.size:
        raise CodecError("the meta is longer than the frame")
    meta = json.loads(_read_exactly(reader, size))
    body = _read_exactly(reader, total - _HEADER_LEN.size - size)
    if reader.read(1):
        raise CodecError("more in the frame than it says")
    return meta, body


class _PieceSource:
    """The compressed frame as zstd's stream reader reads it: from the pieces in turn, dropping each once read."""

    def __init__(self, pieces: list[bytes], skip: int) -> None:
        self.pieces = pieces
        self.index = 0
        self.offset = skip

    def read(self, size: int = -1) -> bytes | memoryview:
        while self.index < len(self.pieces):
            piece = self.pieces[self.index]
            if self.offset < len(piece):
                end = len(piece) if size < 0 else self.offset + size
                data = memoryview(piece)[self.offset : end]
                self.offset += len(data)
                return data
            self.pieces[self.index] = b""
            self.index, self.offset = self.index + 1, 0
        return b""


def _read_exactly(reader: zstandard.ZstdDecompressionReader, size: int) -> bytes:
    data = reader.read(size) if size else b""
    if len(data) < size:  # the reader fills what it can at once; a short read means a truncated frame
        more = [data]
        while (got := sum(map(len, more))) < size:
            piece = reader.read(size - got)
            if not piece:
                raise CodecError("the frame ends early")
            more.append(piece)
        data = b"".join(more)
    return data


def _request_fields(request: StoredRequest) -> dict:
    fields: dict = {"m": request.method, "u": request.url}
    if request.headers:
        fields["h"] = request.headers
    if request.body:
        fields["b"] = base64.b64encode(request.body).decode()
    if not request.body_kept:
        fields["bk"] = False
    for name, value in (("c", request.content_type), ("x", request.credentials), ("n", request.namespace)):
        if value:
            fields[name] = value
    return fields


def _rules_fields(rules: StoredRules) -> dict:
    fields: dict = {"a": round(rules.initial_age, 3)}
    if rules.no_stale:
        fields["n"] = 1
    if rules.while_revalidate is not None:
        fields["w"] = rules.while_revalidate
    if rules.if_error is not None:
        fields["e"] = rules.if_error
    return fields


def _stored_rules(fields: dict) -> StoredRules:
    return StoredRules(
        initial_age=float(fields.get("a", 0.0)), no_stale=bool(fields.get("n", 0)),
        while_revalidate=None if fields.get("w") is None else float(fields["w"]),
        if_error=None if fields.get("e") is None else float(fields["e"]),
    )


def _stored_request(fields: dict) -> StoredRequest:
    return StoredRequest(
        method=str(fields["m"]), url=str(fields["u"]),
        headers=tuple((str(name), str(value)) for name, value in fields.get("h", ())),
        body=base64.b64decode(fields.get("b", ""), validate=True), body_kept=bool(fields.get("bk", True)),
        content_type=str(fields.get("c", "")), credentials=str(fields.get("x", "")), namespace=str(fields.get("n", "")),
    )


def decode_response(blob: bytes) -> ProxyResult:
    """A stored response; CodecError for a pointer or anything else."""
    value = decode(blob)
    if not isinstance(value, ProxyResult):
        raise CodecError("a vary pointer, not a response")
    return value
