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
import json
import struct
import threading
from typing import NamedTuple

import zstandard

from buddy.messages import ProxyResult, StoredRequest, StoredRules

MAGIC = b"RB"
POINTER_MAGIC = b"RV"
NOT_SHARED = b"RP\x01"
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
    payload = _HEADER_LEN.pack(len(meta)) + meta + response.body
    return MAGIC + bytes([VERSION]) + _contexts()[0].compress(payload)


def encode_pointer(pointer: VaryPointer) -> bytes:
    return POINTER_MAGIC + bytes([VERSION]) + json.dumps(list(pointer.names)).encode()


def decode(blob: bytes) -> ProxyResult | VaryPointer:
    """A stored response or vary pointer; CodecError for anything else (including the not-shared mark)."""
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
        payload = _contexts()[1].decompress(blob[3:])
        (size,) = _HEADER_LEN.unpack_from(payload)
        meta = json.loads(payload[4 : 4 + size])
        headers = [(str(name), str(value)) for name, value in meta["h"]]
        return ProxyResult(
            int(meta["s"]), str(meta["r"]), headers, payload[4 + size :], fetch_ms=int(meta.get("d", 0)),
            stored_at=float(meta["t"]), vary=tuple(str(n) for n in meta.get("v", ())), variant=str(meta.get("k", "")),
            fresh_for=None if meta.get("f") is None else float(meta["f"]),
            request=None if meta.get("q") is None else _stored_request(meta["q"]),
            rules=None if meta.get("g") is None else _stored_rules(meta["g"]),
        )
    except (zstandard.ZstdError, struct.error, ValueError, KeyError, TypeError) as exc:
        raise CodecError(str(exc)) from exc


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
