"""Counters for the whole proxy, kept in Redis: each process buffers increments and flushes them once a second.

Buffering keeps a cache hit at one Redis round trip; the counters lag by at most the flush interval, and
a process that is killed loses at most that much counting.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections import Counter

import redis

from buddy.background import ProcessThread
from buddy.errors import StoreUnavailable
from buddy.redis_keys import RedisKeys, stats_field
from buddy.store.guard import StoreGuard

log = logging.getLogger("buddy.metrics")
RECENT_ERRORS = 50
WORKER_SEEN_SECONDS = 15


class MetricsRecorder:
    """`count(domain, field, n)` and `error(...)` cost a dict update; a thread flushes them in one pipeline."""

    def __init__(self, client: redis.Redis, guard: StoreGuard, keys: RedisKeys, interval: float = 1.0) -> None:
        self.client = client
        self.guard = guard
        self.keys = keys
        self.interval = interval
        self._counts: Counter[tuple[str, str]] = Counter()
        self._errors: list[str] = []
        self._lock = threading.Lock()
        self.thread = ProcessThread("buddy-metrics", self._run, fresh=self._counts.clear)  # a child tallies anew
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.serving = False  # set by the first request this process counts

    def count(self, domain: str, field: str, n: int = 1) -> None:
        self.count_many(domain, {field: n})

    def count_many(self, domain: str, fields: dict[str, int]) -> None:
        assert all(stats_field(field) for field in fields), f"undeclared counter in {sorted(fields)}"
        if not self.thread.running:
            self.thread.ensure()
        self.serving = True
        with self._lock:
            for field, n in fields.items():
                self._counts[(domain, field)] += n

    def error(self, domain: str, status: str, message: str) -> None:
        event = json.dumps({"time": round(time.time(), 3), "domain": domain, "status": status, "message": message})
        with self._lock:
            self._errors.append(event)
            del self._errors[:-RECENT_ERRORS]

    def flush(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, Counter()
            errors, self._errors = self._errors, []
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

        def write() -> None:
            pipe = self.client.pipeline(transaction=False)
            for (domain, field), n in counts.items():
                pipe.hincrby(self.keys.stats(domain), field, n)
            if errors:
                pipe.lpush(self.keys.recent_errors, *errors)
                pipe.ltrim(self.keys.recent_errors, 0, RECENT_ERRORS - 1)
            if self.serving:  # a `flask buddy` command is no worker
                pipe.zadd(self.keys.workers, {self.worker: time.time()})
                pipe.zremrangebyscore(self.keys.workers, "-inf", time.time() - WORKER_SEEN_SECONDS)
            pipe.execute()

        try:
            self.guard.run(write)
        except StoreUnavailable:
            with self._lock:  # keep them for the next flush
                self._counts.update(counts)
                self._errors[:0] = errors
                del self._errors[:-RECENT_ERRORS]

    def stop(self) -> None:
        """Stop the flusher and write what is left; later calls do nothing."""
        if self.thread.stopping.is_set():
            return
        self.thread.stop()
        self.flush()

    def start(self) -> None:
        self.thread.ensure()

    def _run(self, stopping: threading.Event) -> None:
        while not stopping.wait(self.interval):
            try:
                self.flush()
            except Exception:  # never let the flusher die: counting is not worth a crash
                log.exception("flushing metrics failed")
