"""Counters for the whole proxy, kept in Redis: each process buffers increments and flushes them once a second.

Buffering keeps a cache hit at one Redis round trip; the counters lag by at most the flush interval, and
a process that is killed loses at most that much counting. A few counters are also kept per minute (for the
dashboard's chart of the last hour), in keys that expire by themselves.
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
from redis.exceptions import AskError, ClusterError, TryAgainError

from buddy.background import ProcessThread
from buddy.errors import StoreUnavailable
from buddy.redis_keys import STATS_FIELDS, RedisKeys, stats_field
from buddy.redis_memory import out_of_memory
from buddy.store.guard import StoreGuard

log = logging.getLogger("buddy.metrics")
RECENT_ERRORS = 50
WORKER_SEEN_SECONDS = 15
IN_WORKER = False  # set in a gunicorn worker right after the fork (buddy.serve); `flask buddy` commands are none
MINUTE_FIELDS = ("hits", "misses", "upstream_requests")  # also counted per minute, in `minutes:{<name>}:<minute>`
TIMELINE_MINUTES = 60  # how many minutes the dashboard shows; a per-minute key outlives its minute by a bit more
MINUTE_KEEP_SECONDS = (TIMELINE_MINUTES + 2) * 60
# The most one flush adds to a counter. Redis counts in signed 64-bit integers and refuses an HINCRBY past them
# with an error reply (the flush fails, health reports a bug): clamped, a counter needs 32,768 flushes at the
# limit to get there, where a real one (bytes or milliseconds saved in a second) is a millionth of it.
INCREMENT_LIMIT = 2**48


def _clamped(n: int) -> int:
    return max(-INCREMENT_LIMIT, min(INCREMENT_LIMIT, n))


def _ran(error: BaseException | None) -> bool:
    """Did Redis run the whole pipeline, refusing one command for that command's sake (a value out of range, a key
    of another type)? Then the others are counted. Not so for a refusal of every write (read-only replica, out of
    memory) or a cluster slot on the move."""
    return isinstance(error, redis.ResponseError) and not isinstance(
        error, (redis.ReadOnlyError, ClusterError, AskError, TryAgainError)) and not out_of_memory(error)


class MetricsRecorder:
    """`count(domain, field, n)` and `error(...)` cost a dict update; a thread flushes them in one pipeline."""

    def __init__(self, client: redis.Redis, guard: StoreGuard, keys: RedisKeys, interval: float = 1.0) -> None:
        self.client = client
        self.guard = guard
        self.keys = keys
        self.interval = interval
        self._counts: Counter[tuple[str, str]] = Counter()
        self._minutes: Counter[tuple[str, int, str]] = Counter()  # (domain, Unix minute, field) -> n
        self._errors: list[str] = []
        self._lock = threading.Lock()
        self.thread = ProcessThread("buddy-metrics", self._run, fresh=self._fresh)  # a child tallies anew
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.serving = IN_WORKER  # else set by the first request this process counts

    def count(self, domain: str, field: str, n: int = 1) -> None:
        self.count_many(domain, {field: n})

    def count_many(self, domain: str, fields: dict[str, int]) -> None:
        assert STATS_FIELDS.issuperset(fields) or all(map(stats_field, fields)), f"undeclared counter: {sorted(fields)}"
        if not self.thread.running:
            self.thread.ensure()
        self.serving = True
        minute = int(time.time() // 60) if any(field in MINUTE_FIELDS for field in fields) else 0
        with self._lock:
            for field, n in fields.items():
                self._counts[(domain, field)] += n
                if field in MINUTE_FIELDS:
                    self._minutes[(domain, minute, field)] += n

    def error(self, domain: str, status: str, message: str, retry_after: str | None = None) -> None:
        """Remember an upstream failure (and, for a 429/503, the Retry-After it sent, if any) for health."""
        event: dict[str, object] = {"time": round(time.time(), 3), "domain": domain, "status": status,
                                    "message": message}
        if retry_after is not None:
            event["retry_after"] = retry_after
        with self._lock:
            self._errors.append(json.dumps(event))
            del self._errors[:-RECENT_ERRORS]

    def flush(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, Counter()
            minutes, self._minutes = self._minutes, Counter()
            errors, self._errors = self._errors, []
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

        def write() -> None:
            pipe = self.client.pipeline(transaction=False)
            for (domain, field), n in counts.items():
                pipe.hincrby(self.keys.stats(domain), field, _clamped(n))
            expiring: dict[str, int] = {}
            for (domain, minute, field), n in minutes.items():
                key = self.keys.minute_counts(domain, minute)
                pipe.hincrby(key, field, _clamped(n))
                expiring[key] = (minute + 1) * 60 + MINUTE_KEEP_SECONDS
            for key, when in expiring.items():
                pipe.expireat(key, when)
            if errors:
                pipe.lpush(self.keys.recent_errors, *errors)
                pipe.ltrim(self.keys.recent_errors, 0, RECENT_ERRORS - 1)
            if self.serving:  # a `flask buddy` command is no worker
                pipe.zadd(self.keys.workers, {self.worker: time.time()})
                pipe.zremrangebyscore(self.keys.workers, "-inf", time.time() - WORKER_SEEN_SECONDS)
            pipe.execute()

        try:
            self.guard.run(write)
        except StoreUnavailable as exc:
            if _ran(exc.__cause__):
                return  # adding them again would count the others twice (the refused one is dropped; health tells)
            with self._lock:  # keep them for the next flush
                self._counts.update(counts)
                self._minutes.update(minutes)
                self._errors[:0] = errors
                del self._errors[:-RECENT_ERRORS]

    def _fresh(self) -> None:
        """In a forked child: drop the parent's unflushed counts (no lock: the parent's may have been held)."""
        self._counts.clear()
        self._minutes.clear()

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
