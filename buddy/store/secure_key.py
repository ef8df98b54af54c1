"""The proxy's access key: configured, or generated once and kept in Redis (SET NX) so every worker agrees.

Only a process that serves generates the key; an operator command only reads it. A serving process also says
in Redis where its key comes from (never the key itself), so that `api-buddy key`, run without the service's
environment, can say where to find a configured key instead of printing one the proxy does not accept.
"""
from __future__ import annotations

import json
import secrets
import threading
from typing import NamedTuple

import redis

from buddy.redaction import redact_in_logs
from buddy.redis_keys import RedisKeys
from buddy.store.guard import StoreGuard

GENERATED = "generated"


class KeySource(NamedTuple):
    """What the serving proxy said about its key: whether it requires one, and where it comes from (GENERATED, or
    the variable or file that configured it)."""

    required: bool
    origin: str


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
        self.source_name = keys.key_source

    def get(self) -> str:
        """Raises StoreUnavailable if the key must come from Redis and Redis cannot be reached."""
        if self._key is None:
            with self._lock:
                if self._key is None:
                    key = self.guard.run(self._load_or_create, key=self.name)
                    redact_in_logs(key)
                    self._key = key
        return self._key

    def _load_or_create(self) -> str:
        # SET NX: when several workers start at once, the first one's key wins and all read it back.
        self.client.set(self.name, secrets.token_urlsafe(32), nx=True)
        value = self.client.get(self.name)
        return value.decode() if isinstance(value, bytes) else str(value)

    def stored(self) -> str | None:
        """The generated key as Redis holds it, or None; never generates one (for commands)."""
        value = self.guard.run(lambda: self.client.get(self.name), key=self.name)
        return None if value is None else value.decode() if isinstance(value, bytes) else str(value)

    def announce(self, source: KeySource) -> None:
        """Say where the serving proxy's key comes from (no secret: whether it is required, and its origin)."""
        self.guard.run(lambda: self.client.set(self.source_name, json.dumps(source._asdict())), key=self.source_name)

    def announced(self) -> KeySource | None:
        """What the serving proxy said about its key, or None (no proxy has served on this Redis yet)."""
        value = self.guard.run(lambda: self.client.get(self.source_name), key=self.source_name)
        try:
            said = json.loads(value) if value else None
            return KeySource(bool(said["required"]), str(said["origin"])) if isinstance(said, dict) else None
        except (ValueError, KeyError):
            return None
