"""The response cache: one compressed blob per key with a Redis-native TTL."""
from __future__ import annotations

import logging

import redis

from buddy import codec
from buddy.codec import CachedResponse
from buddy.store.guard import StoreGuard

log = logging.getLogger("buddy.cache")


class ResponseCache:
    """GET and SET of encoded responses; a blob that does not decode counts as a miss."""

    def __init__(self, client: redis.Redis, guard: StoreGuard) -> None:
        self.client = client
        self.guard = guard

    def get(self, key: str) -> CachedResponse | None:
        blob = self.guard.run(lambda: self.client.get(key))
        if blob is None:
            return None
        try:
            return codec.decode(blob)
        except codec.CodecError as exc:
            log.info("unreadable cache entry treated as a miss: %s", exc)
            return None

    def put(self, key: str, response: CachedResponse, ttl_seconds: int) -> None:
        blob = codec.encode(response)
        self.guard.run(lambda: self.client.set(key, blob, ex=ttl_seconds))
