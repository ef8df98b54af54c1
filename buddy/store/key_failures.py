"""Refused access keys, per client address: wrong ones slow the address down, and refusals are logged in aggregate.

The rules (key_failure.lua; `LocalFailures` is the same in Python):
- The `limit`-th wrong key in a row from one address (each less than FRESH_SECONDS after the one before) locks
  the address out for 1 s; from then on, each wrong key tried after a lock-out has ended locks it again, for
  twice as long, up to `longest`. FRESH_SECONDS after its last wrong key, or after the end of its last
  lock-out, the address starts afresh.
- During a lock-out every request from the address is refused, 429 with Retry-After, the right key's too,
  without trying its key: a guess must get no answer. An attacker who shares the address (every local user
  is 127.0.0.1) can thus keep the others waiting while it goes on, never longer than `longest` after it stops.
- Each address's refusals (wrong key, no key, locked out) make one log line per LOG_EVERY_SECONDS with their
  count: the first at once, the rest when due.

Where the state lives: in Redis, one script call per refusal and none for a good request, so every worker
and host counts together. A worker knows an address is locked out from a refusal it handled itself: one
that has refused nothing from it during this lock-out tries one more key of it (a wrong one then tells it).
Without Redis, each process counts alone.
"""
from __future__ import annotations

import ipaddress
import logging
import math
import threading
import time
from typing import Callable, NamedTuple

import redis

from buddy.background import ProcessThread
from buddy.errors import StoreUnavailable
from buddy.redis_keys import RedisKeys
from buddy.store.fill_lock import load_script
from buddy.store.guard import StoreGuard

log = logging.getLogger("buddy.security")
FRESH_SECONDS = 60.0
LOG_EVERY_SECONDS = 60.0
LOCAL_ADDRESSES = 10_000  # addresses one process follows by itself (Redis unreachable); then it starts afresh
WRONG, REFUSED, FLUSH = "wrong", "refused", "flush"


class Outcome(NamedTuple):
    """What one refusal (or a flush) came to, for one address; times in ms since the epoch."""

    until: int  # the end of the address's lock-out; 0 when it is not locked out
    report: int  # refusals to log now; 0 for none
    unlogged: int  # refusals still to log, later
    strikes: int  # lock-outs in a row
    logged: int  # the last log line about the address
    before: int  # when a line is due now: the line before it (0: this is the first)


def address_of(remote: str | None) -> str:
    """The address a client is counted by: its IP, an IPv4-mapped IPv6 as IPv4, other IPv6 by /64 (what one
    host usually gets; counting each address would let it try 2^64 of them)."""
    try:
        ip = ipaddress.ip_address((remote or "").split("%", 1)[0])
    except ValueError:
        return remote or "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        if not ip.is_loopback:
            return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class LocalFailures:
    """key_failure.lua's rules in one process's memory, for while Redis cannot be reached."""

    def __init__(self) -> None:
        self._state: dict[str, dict[str, int]] = {}
        self._lock = threading.Lock()

    def record(self, address: str, mode: str, now: int, limit: int, longest: int, fresh: int, every: int) -> Outcome:
        with self._lock:
            state = self._state.get(address)
            if state is None:
                if mode == FLUSH:
                    return Outcome(0, 0, 0, 0, 0, 0)
                if len(self._state) >= LOCAL_ADDRESSES:
                    self._forget(now, fresh + every)
                state = self._state[address] = dict.fromkeys(
                    ("failures", "strikes", "last", "until", "unlogged", "logged"), 0)
            if mode == FLUSH and state["unlogged"] == 0:
                return Outcome(state["until"] if state["until"] > now else 0, 0, 0, state["strikes"],
                               state["logged"], 0)
            if mode != FLUSH:
                state["unlogged"] += 1
            if mode == WRONG and state["until"] <= now and limit > 0:
                if now - max(state["last"], state["until"]) > fresh:
                    state["failures"] = state["strikes"] = 0
                state["failures"] += 1
                state["last"] = now
                if state["strikes"] > 0 or state["failures"] >= limit:
                    state["strikes"] += 1
                    state["until"] = now + int(min(1000 * 2 ** (state["strikes"] - 1), longest))
            report, before = 0, state["logged"]
            if state["unlogged"] > 0 and now - state["logged"] >= every:
                report, state["unlogged"], state["logged"] = state["unlogged"], 0, now
            until = state["until"] if state["until"] > now else 0
            return Outcome(until, report, state["unlogged"], state["strikes"], state["logged"],
                           before if report else 0)

    def _forget(self, now: int, keep: int) -> None:
        """Drop what has expired (as the Redis hash would); if that is not enough, everything (a flood)."""
        for address in [a for a, s in self._state.items() if max(s["until"], s["last"], s["logged"]) + keep < now]:
            del self._state[address]
        if len(self._state) >= LOCAL_ADDRESSES:
            self._state.clear()


class KeyFailures:
    """Counts refusals per client address (through Redis when given one) and slows down wrong keys."""

    def __init__(self, limit: int, longest: float, *, client: redis.Redis | None = None,
                 guard: StoreGuard | None = None, keys: RedisKeys | None = None, log_events: bool = True,
                 clock: Callable[[], float] = time.time) -> None:
        self.limit = limit
        self.longest_ms = int(longest * 1000)
        self.log_events = log_events
        self.clock = clock
        self.client, self.guard, self.keys = client, guard, keys
        self._script = client.register_script(load_script("key_failure")) if client is not None else None
        self.local = LocalFailures()
        self._locked: dict[str, float] = {}  # address -> when its lock-out ends (seconds), as far as we know
        self._due: dict[str, float] = {}  # address -> when its next log line is due (seconds)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.flusher = ProcessThread("buddy-key-failures", self._flush_when_due, interrupt=self._wake.set)

    def locked(self, remote: str | None) -> float:
        """Seconds until the address's lock-out ends, as this process knows it (no Redis call); 0 for none."""
        if not self._locked:
            return 0.0
        until = self._locked.get(address_of(remote))
        if until is None:
            return 0.0
        left = until - self.clock()
        return left if left > 0 else 0.0

    def wrong(self, remote: str | None) -> float:
        """A wrong key from this address: counted; the seconds it must now wait (0: none)."""
        return self._record(address_of(remote), WRONG)

    def refused(self, remote: str | None) -> float:
        """A refusal that tried no key (none was sent, or the address is locked out): counted for the log only."""
        return self._record(address_of(remote), REFUSED)

    def flush(self) -> None:
        """Log the counts now due (the background thread calls this; so may a test with its own clock)."""
        now = self.clock()
        with self._lock:
            ready = [address for address, due in self._due.items() if due <= now]
            for address in ready:
                del self._due[address]
        for address in ready:
            self._record(address, FLUSH)

    def stop(self) -> None:
        self.flusher.stop()

    def count(self, address: str, mode: str, now: float) -> Outcome:
        """What the rules make of one event for one address: in Redis, or in this process when Redis is away."""
        now_ms, fresh, every = int(now * 1000), int(FRESH_SECONDS * 1000), int(LOG_EVERY_SECONDS * 1000)
        if self._script is not None and self.guard is not None and self.keys is not None:
            name, script = self.keys.key_failures(address), self._script
            args = [mode, now_ms, self.limit, self.longest_ms, fresh, every]
            try:
                return Outcome(*(int(v) for v in self.guard.run(lambda: script(keys=[name], args=args), name)))
            except StoreUnavailable:
                pass
        return self.local.record(address, mode, now_ms, self.limit, self.longest_ms, fresh, every)

    def _record(self, address: str, mode: str) -> float:
        now = self.clock()
        outcome = self.count(address, mode, now)
        wait = max(0.0, outcome.until / 1000 - now) if outcome.until else 0.0
        with self._lock:
            if wait:
                self._locked[address] = outcome.until / 1000
            elif address in self._locked:
                del self._locked[address]
            if len(self._locked) > LOCAL_ADDRESSES:
                self._locked = {a: t for a, t in self._locked.items() if t > now}
            if outcome.unlogged and self.log_events:
                self._due[address] = outcome.logged / 1000 + LOG_EVERY_SECONDS
        if outcome.unlogged and self.log_events:
            self.flusher.ensure()
            self._wake.set()
        if outcome.report and self.log_events:
            self._log(address, outcome, now)
        return wait

    def _log(self, address: str, outcome: Outcome, now: float) -> None:
        count = outcome.report
        requests = f"{count} request{'s' if count != 1 else ''}"
        if outcome.before:
            line = f"refused {requests} from {address} in the last {now - outcome.before / 1000:.0f} s"
        else:
            line = f"refused {requests} from {address}"
        line += ": missing or wrong access key"
        if outcome.until:
            line += (f"; locked out for {math.ceil(outcome.until / 1000 - now)} s more "
                     f"(lock-out {outcome.strikes} in a row)")
        if not outcome.before:
            line += f" (further refusals from {address} are counted and logged once a minute)"
        log.warning("%s", line)

    def _flush_when_due(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            self._wake.clear()
            self.flush()
            with self._lock:
                due = min(self._due.values(), default=None)
            self._wake.wait(None if due is None else max(0.05, due - self.clock()))
