"""Stored values read from Redis in pieces of at most PIECE bytes, never as one reply of the whole value.

redis-py's reader (hiredis's, or its own) holds a reply whole in its buffer before it makes the bytes object, and
that buffer stays the size of the largest reply the connection has read until the connection reads again: every
pooled connection that once read a 10 MB entry would keep 10 MB of this worker's memory while it sits idle. So a
value is read as its first PIECE bytes (`GETRANGE 0 PIECE-1`: one round trip, as cheap as GET; most entries are
smaller and so read whole), and only a value that fills that piece is read again, whole, by `read_pieces.lua`: its
pieces in one reply, from one version of the value (the script runs atomically), never one reply of it all.
"""
from __future__ import annotations

from importlib import resources
from typing import Union

import redis

from buddy.store.guard import StoreGuard

PIECE = 256 * 1024  # bytes of a stored value in one reply at most

#: A value as read: one bytes (it fitted in a piece), or a list of its pieces in order; codec.decode takes either.
Value = Union[bytes, list[bytes]]


class PieceReader:
    """Reads stored values in pieces (see the module); one per Redis client."""

    def __init__(self, client: redis.Redis, guard: StoreGuard) -> None:
        self.client = client
        self.guard = guard
        self._pieces = client.register_script(
            resources.files("buddy.store").joinpath("lua").joinpath("read_pieces.lua").read_text())

    def read(self, key: str) -> Value | None:
        """The value at `key`, None when there is none."""
        return self.complete(key, self.guard.run(lambda: self.client.getrange(key, 0, PIECE - 1), key=key))

    def complete(self, key: str, first: bytes | None) -> Value | None:
        """The whole value at `key`, given what `GETRANGE key 0 PIECE-1` (first_piece) read of it a moment ago: that,
        when it is all of it; else the value read again in pieces (it may have changed meanwhile: the pieces are
        all of one version)."""
        if not first:  # GETRANGE of a missing key is empty; nothing stored here is empty
            return None
        if len(first) < PIECE:
            return first
        pieces = self.guard.run(lambda: self._pieces(keys=[key], args=[PIECE]), key=key)
        return list(pieces) if pieces else None


def first_piece(pipe: redis.client.Pipeline, key: str) -> None:
    """Queue the read of a value's first piece on a pipeline (PieceReader.complete takes the result)."""
    pipe.getrange(key, 0, PIECE - 1)
