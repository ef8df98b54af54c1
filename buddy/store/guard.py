"""The boundary to Redis: driver errors become StoreUnavailable, logged once per interval, retried after a pause."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, TypeVar

import redis

from buddy.errors import StoreUnavailable

log = logging.getLogger("buddy.store")
T = TypeVar("T")


class StoreGuard:
    """Runs Redis calls; after a failure it skips Redis for `retry_after` seconds so requests never queue on it."""

    def __init__(self, retry_after: float = 1.0, log_every: float = 30.0) -> None:
        self.retry_after = retry_after
        self.log_every = log_every
        self.failed_at: float | None = None
        self.last_error = ""
        self._logged_at = 0.0
        self._lock = threading.Lock()

    @property
    def degraded(self) -> bool:
        return self.failed_at is not None

    def run(self, call: Callable[[], T]) -> T:
        failed_at = self.failed_at
        if failed_at is not None and time.monotonic() - failed_at < self.retry_after:
            raise StoreUnavailable(self.last_error)
        try:
            result = call()
        except redis.RedisError as exc:
            self._failed(exc)
            raise StoreUnavailable(str(exc)) from exc
        if failed_at is not None:
            self._recovered()
        return result

    def _failed(self, exc: Exception) -> None:
        now = time.monotonic()
        with self._lock:
            self.failed_at, self.last_error = now, f"{type(exc).__name__}: {exc}"
            if now - self._logged_at >= self.log_every:
                self._logged_at = now
                log.error(
                    "Redis unavailable: serving without cache (X-Cache: BYPASS), rate limits kept per process: %s",
                    self.last_error,
                )

    def _recovered(self) -> None:
        with self._lock:
            if self.failed_at is not None:
                self.failed_at = None
                self._logged_at = 0.0
                log.warning("Redis is back, cache in use again")
