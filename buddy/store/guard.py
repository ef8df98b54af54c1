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
        self._refused_logged_at = 0.0
        self._lock = threading.Lock()

    def run(self, call: Callable[[], T]) -> T:
        failed_at = self.failed_at
        if failed_at is not None and time.monotonic() - failed_at < self.retry_after:
            raise StoreUnavailable(self.last_error)
        try:
            result = call()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            self._failed(exc)
            raise StoreUnavailable(str(exc)) from exc
        except redis.RedisError as exc:
            # Redis answered, with an error (out of memory, read-only replica, ...): this call fails, the
            # next one may not, so Redis is not skipped; logged at most once per interval all the same.
            self._refused(exc)
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

    def _refused(self, exc: Exception) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._refused_logged_at >= self.log_every:
                self._refused_logged_at = now
                log.error("Redis refused a command, serving that request without it: %s: %s", type(exc).__name__, exc)

    def _recovered(self) -> None:
        with self._lock:
            if self.failed_at is not None:
                self.failed_at = None
                self._logged_at = 0.0
                log.warning("Redis is back, cache in use again")
