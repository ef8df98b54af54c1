"""Rate limits for upstream calls: sliding windows in Redis (one Lua call per request) and a per-process fallback."""
from __future__ import annotations

import math
import secrets
import threading
import time
from collections import deque
from typing import NamedTuple

import redis

from buddy.redis_keys import RedisKeys
from buddy.settings import DomainSettings
from buddy.store.fill_lock import load_script
from buddy.store.guard import StoreGuard

GUARD_MS = 100  # every window is this much longer than configured, so that arrival jitter never breaks a limit
QUIET_MS = 60_000  # the penalty level decays to 0 after this long without a 429/503 or a refusal


class Decision(NamedTuple):
    """A throttle verdict: go after `delay` seconds, or refuse (then `delay` is how long until a slot frees)."""

    accepted: bool
    delay: float
    limit: int = 0
    window: float = 0.0
    level: int = 0
    slot: str = ""  # what release() needs to give the reserved start back: the member ...
    starts: str = ""  # ... of this sorted set
    reserved: bool = True  # False: paused, nothing reserved; after `delay`, ask again


def windows(domain: DomainSettings) -> list[tuple[int, int]]:
    """(window ms, limit) for each configured limit of the domain."""
    out = [(3_600_000, domain.max_requests_per_hour)]
    if domain.max_requests_per_minute:
        out.append((60_000, domain.max_requests_per_minute))
    if domain.max_requests_per_second:
        out.append((1_000, domain.max_requests_per_second))
    return out


class RateLimiter:
    """Shared by every worker and host on the Redis; time comes from Redis itself."""

    def __init__(self, client: redis.Redis, guard: StoreGuard, keys: RedisKeys, max_delay: float) -> None:
        self.client = client
        self.guard = guard
        self.keys = keys
        self.max_delay_ms = int(max_delay * 1000)
        self._throttle = client.register_script(load_script("throttle"))
        self._penalize = client.register_script(load_script("penalize"))
        self._reset = client.register_script(load_script("reset_penalty"))

    def plan(self, domain: DomainSettings, partition: str = "") -> tuple[list[str], list[int | str]]:
        """The KEYS and ARGV of one throttle call for `domain` (throttle.lua; lead.lua runs it too), with a
        fresh slot name as the first argument. `partition`: the credentials the request carries (see
        fingerprint.partition): their pause applies to it besides the mapping's, and with per-credential limits
        their own windows."""
        args: list[int | str] = [secrets.token_hex(8), self.max_delay_ms, GUARD_MS, QUIET_MS]
        for window_ms, limit in windows(domain):
            args += [window_ms, limit]
        own = partition if domain.rate_limit_per_credential else ""
        keys = [self.keys.rate_starts(domain.name, own), self.keys.rate_penalty(domain.name, partition),
                self.keys.rate_penalty(domain.name)]
        return keys, args

    @staticmethod
    def decision(verdict: list, keys: list[str], args: list[int | str]) -> Decision:
        """The Decision for what throttle.lua returned when called with `keys` and `args` (from `plan`)."""
        accepted, delay, limit, window, level, reserved = verdict
        return Decision(bool(accepted), int(delay) / 1000, int(limit), int(window) / 1000, int(level), str(args[0]),
                        keys[0], bool(reserved))

    def acquire(self, domain: DomainSettings, partition: str = "") -> Decision:
        keys, args = self.plan(domain, partition)
        verdict = self.guard.run(lambda: self._throttle(keys=keys, args=args), key=keys[0])
        return self.decision(verdict, keys, args)

    def release(self, domain: DomainSettings, decision: Decision) -> None:
        """Give a reserved start back (its request was refused after all, or its client left)."""
        if not decision.reserved:
            return
        key = decision.starts or self.keys.rate_starts(domain.name)
        self.guard.run(lambda: self.client.zrem(key, decision.slot), key=key)

    def penalize(self, domain: DomainSettings, retry_after: float | None, partition: str = "") -> None:
        """Pause the requests of `partition` (the credentials that got the 429 or 503), or the whole mapping."""
        retry_ms = -1 if retry_after is None else int(retry_after * 1000)
        keys = [self.keys.rate_penalty(domain.name, partition)]
        self.guard.run(lambda: self._penalize(keys=keys, args=[retry_ms, self.max_delay_ms, QUIET_MS]), key=keys[0])

    def paused(self, domain: DomainSettings, partition: str = "") -> float:
        """Seconds until the pause that applies to a request of `partition` ends (its own, or the mapping's: an
        upstream's Retry-After, or the backoff after refusals), by Redis's clock; 0 when there is none."""
        names = [self.keys.rate_penalty(domain.name)] + ([self.keys.rate_penalty(domain.name, partition)]
                                                         if partition else [])

        def read() -> list:
            pipe = self.client.pipeline(transaction=False)
            pipe.time()
            for name in names:
                pipe.hget(name, "until")
            return pipe.execute()

        (seconds, micros), *until = self.guard.run(read, key=names[0])
        now = int(seconds) * 1000 + int(micros) // 1000
        return max(0, *(int(u or 0) - now for u in until)) / 1000

    def reset(self, domain: DomainSettings, partition: str = "") -> None:
        key = self.keys.rate_penalty(domain.name, partition)
        self.guard.run(lambda: self._reset(keys=[key]), key=key)


class LocalLimiter:
    """The fallback while Redis is unreachable: each process keeps its share (limit / workers) of every window."""

    def __init__(self, max_delay: float, workers: int) -> None:
        self.max_delay = max_delay
        self.workers = max(1, workers)
        self._starts: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def share(self, domain: DomainSettings) -> list[tuple[float, int]]:
        """This process's windows: limit/workers per window, or one request per a longer window below 1."""
        out = []
        for window_ms, limit in windows(domain):
            per_process = limit / self.workers
            if per_process >= 1:
                out.append(((window_ms + GUARD_MS) / 1000, math.floor(per_process)))
            else:
                out.append(((window_ms + GUARD_MS) / 1000 * math.ceil(1 / per_process), 1))
        return out

    def acquire(self, domain: DomainSettings) -> Decision:
        with self._lock:
            now = time.monotonic()
            starts = self._starts.setdefault(domain.name, deque())
            t = max(now, starts[-1]) if starts else now
            shares = self.share(domain)
            for _ in range(8):
                moved = False
                for span, limit in shares:
                    inside = [s for s in starts if s > t - span]
                    if len(inside) >= limit:
                        t, moved = inside[len(inside) - limit] + span, True
                if not moved:
                    break
            delay = t - now
            if delay > self.max_delay:
                return Decision(False, delay)
            starts.append(t)
            longest = max(span for span, _ in shares)
            while starts and starts[0] <= now - longest:
                starts.popleft()
            return Decision(True, delay, slot=repr(t))

    def release(self, domain: DomainSettings, decision: Decision) -> None:
        with self._lock:
            try:
                self._starts.get(domain.name, deque()).remove(float(decision.slot))
            except ValueError:
                pass  # already aged out


class WaitingRoom:
    """How many requests of this process may wait, per mapping and in all: for a rate-limit slot, or on an
    identical request that fetches (coalesced).

    Every waiter holds a server thread; past these caps a request is refused at once (429) instead, so
    that waiting misses can never take the threads that cache hits need: a quarter always stays free.
    """

    def __init__(self, threads: int) -> None:
        self.per_mapping = max(1, threads // 2)
        self.total = max(1, threads * 3 // 4)
        self._waiting: dict[str, int] = {}
        self._lock = threading.Lock()

    def enter(self, domain: str, per_mapping: bool = True) -> bool:
        """Room to wait? `per_mapping=False` (a coalesced follower) checks only the total: a burst of
        identical requests is what coalescing is for."""
        with self._lock:
            mine = self._waiting.get(domain, 0)
            if (per_mapping and mine >= self.per_mapping) or sum(self._waiting.values()) >= self.total:
                return False
            self._waiting[domain] = mine + 1
            return True

    def leave(self, domain: str) -> None:
        with self._lock:
            self._waiting[domain] -= 1

    def waiting(self, domain: str) -> int:
        with self._lock:
            return self._waiting.get(domain, 0)
