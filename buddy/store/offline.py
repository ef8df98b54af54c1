"""Offline mode: nothing reaches any upstream. Set by the config (`cache.offline`, BUDDY_OFFLINE) and switched at
run time through Redis (`flask buddy offline on|off`), so that every worker and host follows within a second."""
from __future__ import annotations

import threading
import time

import redis

from buddy.errors import StoreUnavailable
from buddy.redis_keys import RedisKeys
from buddy.store.guard import StoreGuard

READ_EVERY = 1.0  # seconds: how stale one process's view of the switch may be


class OfflineSwitch:
    """`on()` is the switch as last read from Redis (at most READ_EVERY seconds ago), else the configured value.

    The run-time switch, once set, wins over the configuration until `reset()`; while Redis cannot be read,
    a process keeps the last value it read.
    """

    def __init__(self, client: redis.Redis, guard: StoreGuard, keys: RedisKeys, configured: bool) -> None:
        self.client = client
        self.guard = guard
        self.name = keys.offline
        self.configured = configured
        self._value = configured
        self._read_at = -READ_EVERY
        self._lock = threading.Lock()

    def on(self) -> bool:
        if time.monotonic() - self._read_at < READ_EVERY:
            return self._value
        with self._lock:  # one read per process and interval; the other threads use the value it got
            if time.monotonic() - self._read_at >= READ_EVERY:
                try:
                    self._value = self._decide(self.guard.run(lambda: self.client.get(self.name), key=self.name))
                except StoreUnavailable:
                    pass
                self._read_at = time.monotonic()
        return self._value

    def state(self) -> tuple[bool, str]:
        """(on, where that comes from: "switched at run time" or "configured"), read from Redis now."""
        raw = self.guard.run(lambda: self.client.get(self.name), key=self.name)
        return self._decide(raw), "configured" if raw is None else "switched at run time"

    def set(self, on: bool) -> None:
        self.guard.run(lambda: self.client.set(self.name, b"1" if on else b"0"), key=self.name)
        self._read_at = -READ_EVERY

    def reset(self) -> None:
        """Back to the configured value (cache.offline, BUDDY_OFFLINE)."""
        self.guard.run(lambda: self.client.delete(self.name), key=self.name)
        self._read_at = -READ_EVERY

    def _decide(self, raw: bytes | None) -> bool:
        return self.configured if raw is None else raw == b"1"
