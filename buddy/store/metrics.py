"""Counters for the whole proxy, kept in Redis: each process buffers increments and flushes them once a second.

Buffering keeps a cache hit at one Redis round trip; the counters lag by at most the flush interval, and
a process that is killed loses at most that much counting. A few counters are also kept per minute (for the
dashboard's chart of the last hour), in keys that expire by themselves.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import socket
import threading
import time
from typing import Mapping, TypeVar

import redis
from redis.exceptions import AskError, ClusterError, TryAgainError

from buddy.background import ProcessThread
from buddy.counters import PER_MINUTE, Counter, Outcome, UndeclaredCounter, declared
from buddy.errors import StoreUnavailable
from buddy.redis_keys import RedisKeys
from buddy.redis_memory import out_of_memory
from buddy.store.guard import StoreGuard

log = logging.getLogger("buddy.metrics")
RECENT_ERRORS = 50
WORKER_SEEN_SECONDS = 15
IN_WORKER = False  # set in a gunicorn worker right after the fork (buddy.serve); `flask buddy` commands are none
MINUTE_FIELDS = tuple(c.field for c in PER_MINUTE)  # also counted in `minutes:{<name>}:<minute>`
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


Countable = Counter | Outcome | str  # a declared counter or outcome, or its field ("hits", "status:200")
C = TypeVar("C", bound=Countable)


class MetricsRecorder:
    """`count(domain, counter, n)` and `error(...)` cost a dict update; a thread flushes them in one pipeline.

    What it counts must be declared in buddy.counters: an undeclared counter raises UndeclaredCounter (a bug in
    the caller), an undeclared upstream outcome (`status:<anything else>`) is logged and not counted, so that no
    answer an upstream sends can add a field to a hash without a TTL, nor fail the request that got it.
    """

    def __init__(self, client: redis.Redis, guard: StoreGuard, keys: RedisKeys, interval: float = 1.0) -> None:
        self.client = client
        self.guard = guard
        self.keys = keys
        self.interval = interval
        self._counts: collections.Counter[tuple[str, str]] = collections.Counter()
        # (domain, Unix minute, field) -> n
        self._minutes: collections.Counter[tuple[str, int, str]] = collections.Counter()
        self._errors: list[str] = []
        self._lock = threading.Lock()
        self.thread = ProcessThread("buddy-metrics", self._run, fresh=self._fresh)  # a child tallies anew
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.serving = IN_WORKER  # else set by the first request this process counts
        self._unheard: set[str] = set()  # undeclared outcomes already logged

    def count(self, domain: str, counter: Countable, n: int = 1) -> None:
        self.count_many(domain, {counter: n})

    def count_many(self, domain: str, fields: Mapping[C, int]) -> None:
        found = [(kind, n) for kind, n in ((self._declared(name), n) for name, n in fields.items()) if kind]
        if not self.thread.running:
            self.thread.ensure()
        self.serving = True
        with self._lock:
            for kind, n in found:
                self._counts[(domain, kind.field)] += n
                if isinstance(kind, Counter) and kind.per_minute:
                    self._minutes[(domain, int(time.time() // 60), kind.field)] += n

    def _declared(self, name: Countable) -> Counter | Outcome | None:
        """What `name` counts; an undeclared counter raises, an undeclared outcome is logged (once) and None."""
        kind = declared(name)
        if kind is not None:
            return kind
        field = name if isinstance(name, str) else name.field
        if not field.startswith("status:"):
            raise UndeclaredCounter(f"undeclared counter {field!r}: declare it in buddy.counters.Counters")
        if field not in self._unheard:
            self._unheard.add(field)
            log.error("upstream outcome %r is not declared in buddy.counters: not counted", field[len("status:"):])
        return None

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
            counts, self._counts = self._counts, collections.Counter()
            minutes, self._minutes = self._minutes, collections.Counter()
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
