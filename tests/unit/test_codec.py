"""Stored blobs: exact round trip, compressed, and unreadable blobs are misses rather than crashes; a large one is
written and read without copies of it piling up."""
from __future__ import annotations

import json
import random
import tracemalloc
from dataclasses import replace
from typing import Callable

import fakeredis
import pytest

from buddy import codec
from buddy.codec import VaryPointer
from buddy.messages import ProxyResult
from buddy.redis_keys import EntryId, RedisKeys
from buddy.store.guard import StoreGuard
from buddy.store.pieces import PIECE
from buddy.store.response_cache import ResponseCache

MB = 1_000_000
ENTRY = ProxyResult(
    status=200, reason="OK",
    headers=[("Content-Type", "application/json"), ("X-Thing", "a"), ("X-Thing", "b")],
    body=json.dumps({"edges": [{"rel": "IsA", "weight": i} for i in range(200)]}).encode(),
    stored_at=1767225600.25,
)


def test_round_trip_is_exact_and_compressed() -> None:
    blob = codec.encode(ENTRY)
    assert codec.decode(blob) == ENTRY
    assert len(blob) < len(ENTRY.body) / 3


def test_binary_bodies_survive() -> None:
    entry = ProxyResult(404, "Not Found", [], bytes(range(256)) * 3, stored_at=1.0)
    assert codec.decode(codec.encode(entry)) == entry


def test_a_varying_answer_keeps_what_it_varies_on_and_a_pointer_round_trips() -> None:
    entry = ProxyResult(200, "OK", [("Vary", "X-Tenant")], b"{}", stored_at=2.0, vary=("x-tenant",), variant="ab")
    assert codec.decode(codec.encode(entry)) == entry
    assert codec.decode(codec.encode_pointer(VaryPointer(("x-tenant",)))) == VaryPointer(("x-tenant",))
    with pytest.raises(codec.CodecError):
        codec.decode_response(codec.encode_pointer(VaryPointer(("x-tenant",))))


@pytest.mark.parametrize(
    "blob", [b"", b"RB", b"XX\x01abc", b"RB\x02" + b"x" * 10, b"RB\x01not zstd", b"RP\x01", b"RV\x01{}", b"RV\x01[1]"]
)
def test_foreign_versions_and_garbage_raise_codec_error(blob: bytes) -> None:
    with pytest.raises(codec.CodecError):
        codec.decode(blob)


def test_a_truncated_or_old_entry_reads_as_a_miss() -> None:
    client = fakeredis.FakeRedis()
    keys = RedisKeys("t:")
    cache = ResponseCache(client, StoreGuard(), keys)
    entry = EntryId("up", "d1")
    cache.put(entry, ENTRY, 60)
    assert cache.get(entry) == ENTRY
    client.set(keys.cache("up", "d1"), codec.encode(ENTRY)[:-20])
    assert cache.get(entry) is None
    client.set(keys.cache("up", "d1"), b"RB\x00" + codec.encode(ENTRY)[3:])  # a format version this build does not read
    assert cache.get(entry) is None


LARGE = ProxyResult(200, "OK", [("Content-Type", "application/octet-stream")], random.Random(7).randbytes(10 * MB),
                    stored_at=3.0)


def peak_while(work: Callable[[], object]) -> tuple[object, int]:
    """What `work` returns, and the most memory (bytes, Python's own allocations) it held at once beyond what it
    was handed."""
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        result = work()
        return result, tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()


def test_storing_a_large_answer_holds_one_compressed_copy_beside_it() -> None:
    # A body that does not compress is the worst case: its blob is as large as the body.
    blob, peak = peak_while(lambda: codec.encode(LARGE))
    assert isinstance(blob, bytes) and codec.decode(blob) == LARGE
    assert peak < 1.3 * len(blob), f"encoding held {peak / MB:.1f} MB for a {len(blob) / MB:.1f} MB blob"


def test_reading_a_large_answer_holds_its_body_once_and_lets_the_pieces_go() -> None:
    blob = codec.encode(LARGE)
    pieces = [blob[start : start + MB] for start in range(0, len(blob), MB)]  # as a large value is read from Redis
    del blob
    found, peak = peak_while(lambda: codec.decode(pieces))
    assert found == LARGE
    assert peak < 1.1 * len(LARGE.body), f"decoding held {peak / MB:.1f} MB for a 10 MB body"
    assert not any(pieces), "a piece was kept after it was decompressed"


def test_a_large_entry_is_read_back_whole_from_its_pieces_and_never_mixes_two_versions() -> None:
    client = fakeredis.FakeRedis()
    keys = RedisKeys("t:")
    cache = ResponseCache(client, StoreGuard(), keys)
    entry, key = EntryId("up", "d1"), keys.cache("up", "d1")
    cache.put(entry, LARGE, 60)
    assert client.strlen(key) > 4 * PIECE  # read in pieces
    assert cache.get(entry) == LARGE
    # The entry changes between the read of its first piece and the rest: the answer is the new one, whole.
    first = client.getrange(key, 0, PIECE - 1)
    newer = replace(LARGE, body=random.Random(8).randbytes(6 * MB), stored_at=4.0)
    cache.put(entry, newer, 60)
    assert cache.complete(key, first) == newer
    client.set(key, codec.encode(LARGE)[:-PIECE])  # cut short: a miss, not a short body
    assert cache.get(entry) is None
