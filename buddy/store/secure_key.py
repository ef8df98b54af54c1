"""The proxy's access key: configured, or generated once and kept in Redis (SET NX) so every worker agrees."""
from __future__ import annotations

import secrets
import threading

import redis

from buddy.redaction import redact_in_logs
from buddy.redis_keys import RedisKeys
from buddy.store.guard import StoreGuard


class SecureKeyStore:
    """`get()` returns the key; a generated one is read from Redis once per process, then kept in memory."""

    def __init__(self, client: redis.Redis, guard: StoreGuard, keys: RedisKeys, configured: str | None) -> None:
        self.client = client
        self.guard = guard
        self.name = keys.secure_key
        self._key = configured
        if configured:
            redact_in_logs(configured)
        self._lock = threading.Lock()

    def get(self) -> str:
        """Raises StoreUnavailable if the key must come from Redis and Redis cannot be reached."""
        if self._key is None:
            with self._lock:
                if self._key is None:
                    key = self.guard.run(self._load_or_create)
                    redact_in_logs(key)
                    self._key = key
        return self._key

    def _load_or_create(self) -> str:
        # SET NX: when several workers start at once, the first one's key wins and all read it back.
        self.client.set(self.name, secrets.token_urlsafe(32), nx=True)
        value = self.client.get(self.name)
        return value.decode() if isinstance(value, bytes) else str(value)
