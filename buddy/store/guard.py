"""The boundary to Redis: a circuit breaker for outages, and error replies kept apart from outages.

- A connection error or timeout (Redis down, restarting, hung, or a replica that turned read-only during a
  failover) opens the circuit: every call fails at once with StoreUnavailable, without touching Redis,
  while one probe at a time (a PING from a background thread every `retry_after` seconds, or without
  one a single call let through) finds out when it is back; the first that succeeds closes the circuit.
  A hung Redis thus costs one socket timeout per process, not one per request.
- An error reply (Redis answered) is not an outage and never opens the circuit: that call fails with
  StoreUnavailable so the request carries on without Redis. Out of memory is recorded as a refusal
  (health says writes fail and why); anything else (WRONGTYPE, a script error) is a bug: logged loudly,
  once per kind, with what the call touched, and kept for health.
- A Redis Cluster adds its own of each. Outages: CLUSTERDOWN and MASTERDOWN (a failover under way, slots with
  no primary), slots the client finds uncovered, a cluster it cannot reach at all. Passing: TRYAGAIN, and a
  MOVED or ASK that redis-py did not follow itself (slots migrating): that call fails, the circuit stays
  closed (while a slot moves, new keys of it see this until the move ends). Bugs: keys of one call in different
  slots (CROSSSLOT, or redis-py's refusal to send such a call).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, TypeVar

import redis
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)

from buddy.background import ProcessThread
from buddy.errors import StoreUnavailable
from buddy.redis_memory import out_of_memory

log = logging.getLogger("buddy.store")
T = TypeVar("T")
RECENT_SECONDS = 60.0  # a refusal or bug older than this no longer makes health 'degraded'
# Redis (or the part of a cluster that a call needs) cannot serve now. MasterDownError is a ClusterDownError.
OUTAGES = (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError, ClusterDownError, SlotNotCoveredError)
# A slot in migration: TRYAGAIN (a script's keys half moved, or all new while the slot is being imported), a MOVED
# or ASK not followed, or redis-py's "TTL exhausted" ClusterError after 16 of those. (AskError includes MovedError;
# ClusterDownError, also a ClusterError, is an outage and is told apart first.)
PASSING = (TryAgainError, AskError, ClusterError)
# redis-py's own RedisClusterException (no RedisError) for a cluster it cannot reach or map; others are bugs
CLUSTER_OUTAGE_TEXTS = ("cannot be connected", "cannot be reached", "not covered", "could not agree",
                        "No targets were found")
BUG_SHARE_SECONDS = 5.0
BUG_TTL_SECONDS = 60


class StoreGuard:
    """Runs Redis calls; see the module docstring for what each kind of failure does."""

    def __init__(
        self,
        retry_after: float = 1.0,
        log_every: float = 30.0,
        probe: Callable[[], object] | None = None,
        on_bug: Callable[[str], object] | None = None,
    ) -> None:
        self.retry_after = retry_after
        self.log_every = log_every
        self.probe = probe  # given (a PING): a background thread probes, so that no request ever waits on it
        self.on_bug = on_bug  # given: tells every process (through Redis) of an error reply, at most every 5 s
        self._bug_shared_at = 0.0
        self.failed_at: float | None = None  # when the circuit opened (monotonic), None while closed
        self.last_error = ""
        self.refused_at: float | None = None  # the last error reply for lack of memory
        self.last_refusal = ""
        self.bug_at: float | None = None  # the last other error reply
        self.last_bug = ""
        self._bugs_logged: set[str] = set()
        self._probe_at = 0.0
        self._probing = False
        self._logged_at = 0.0
        self._refused_logged_at = 0.0
        self._passing_logged_at = float("-inf")
        self._lock = threading.Lock()
        self.prober = ProcessThread("buddy-redis-probe", self._probe_until_back)

    def run(self, call: Callable[[], T], what: str = "") -> T:
        """Run one Redis call; `what` names the keys it touches, for the log line of a bug."""
        probe = False
        if self.failed_at is not None:
            with self._lock:
                now = time.monotonic()
                if self.failed_at is not None:
                    if self.probe is not None:
                        self.prober.ensure()  # (a no-op while it runs)
                        raise StoreUnavailable(self.last_error)
                    if self._probing or now - self._probe_at < self.retry_after:
                        raise StoreUnavailable(self.last_error)
                    self._probing, self._probe_at, probe = True, now, True
        try:
            result = call()
        except (redis.RedisError, RedisClusterException) as exc:
            if is_outage(exc):
                self._failed(exc)
            elif isinstance(exc, PASSING):
                self._passing(exc)
            else:
                self._answered_with_error(exc, what, answered=isinstance(exc, redis.RedisError))
            raise StoreUnavailable(str(exc)) from exc
        finally:
            if probe:
                self._probing = False
        if self.failed_at is not None:
            self._recovered()
        return result

    @property
    def open(self) -> bool:
        """True while Redis counts as unavailable (calls fail without being tried)."""
        return self.failed_at is not None

    def problems(self) -> list[str]:
        """What is wrong with Redis now, for health: an outage, writes refused, a recent bug."""
        now, found = time.monotonic(), []
        if self.failed_at is not None:
            found.append(f"unavailable: {self.last_error}")
        if self.refused_at is not None and now - self.refused_at < RECENT_SECONDS:
            found.append(f"writes refused: {self.last_refusal}")
        if self.bug_at is not None and now - self.bug_at < RECENT_SECONDS:
            found.append(f"error replies: {self.last_bug}")
        return found

    def _passing(self, exc: Exception) -> None:
        """A slot in migration: this call goes without Redis, the next one finds the slot's new home."""
        now = time.monotonic()
        if self.failed_at is not None:
            self._recovered()  # it answered: reachable again
        with self._lock:
            if now - self._passing_logged_at < self.log_every:
                return
            self._passing_logged_at = now
        log.warning("Redis Cluster is moving slots (or a one-server URL names a cluster node: see /admin/health); "
                    "a call went without the cache: %s: %s", type(exc).__name__, exc)

    def _answered_with_error(self, exc: Exception, what: str, answered: bool = True) -> None:
        """An error reply (`answered`), or a call that redis-py refused to send (a RedisClusterException)."""
        message = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        if self.failed_at is not None and answered:
            self._recovered()  # it answered: reachable again
        if out_of_memory(exc):
            with self._lock:
                self.refused_at, self.last_refusal = now, message
                if now - self._refused_logged_at >= self.log_every:
                    self._refused_logged_at = now
                    log.error("Redis is out of memory and refuses writes; serving without storing: %s", message)
            return
        kind = str(exc).split(" ", 1)[0][:40] + (f" on {what}" if what else "")
        with self._lock:
            self.bug_at, self.last_bug = now, message + (f" (on {what})" if what else "")
            first = kind not in self._bugs_logged
            self._bugs_logged.add(kind)
            share = self.on_bug is not None and now - self._bug_shared_at >= BUG_SHARE_SECONDS
            if share:
                self._bug_shared_at = now
        if share and self.on_bug is not None:
            try:
                self.on_bug(self.last_bug)
            except redis.RedisError:
                pass  # health in this process still knows
        if first:
            log.error("Redis answered a command with an error: this is a bug, not an outage; that request is "
                      "served without Redis: %s%s", message, f" (keys: {what})" if what else "")

    def stop(self) -> None:
        self.prober.stop()

    def _probe_until_back(self, stopping: threading.Event) -> None:
        """The background prober: once started, one PING every `retry_after` seconds while the circuit is open."""
        while not stopping.wait(self.retry_after):
            if self.failed_at is None:
                continue
            assert self.probe is not None
            try:
                self.probe()
            except (redis.RedisError, RedisClusterException) as exc:
                if is_outage(exc):
                    self._failed(exc)
                    continue
                # an error reply is an answer: Redis is reachable
            self._recovered()

    def _failed(self, exc: Exception) -> None:
        now = time.monotonic()
        with self._lock:
            if self.failed_at is None:
                self.failed_at = self._probe_at = now  # the first probe comes retry_after from now
                if self.probe is not None:
                    self.prober.ensure()
            self.last_error = f"{type(exc).__name__}: {exc}"
            if now - self._logged_at >= self.log_every:
                self._logged_at = now
                log.error(
                    "Redis unavailable: serving without cache (X-Cache: BYPASS), rate limits kept per process, "
                    "one probe every %.0f s: %s", self.retry_after, self.last_error,
                )

    def _recovered(self) -> None:
        with self._lock:
            if self.failed_at is not None:
                self.failed_at = None
                self._logged_at = 0.0
                log.warning("Redis is back, cache in use again")


def is_outage(exc: BaseException) -> bool:
    """Does this error mean Redis (or a part of the cluster) cannot serve now, rather than a bug?"""
    if isinstance(exc, OUTAGES):
        return True
    return isinstance(exc, RedisClusterException) and any(text in str(exc) for text in CLUSTER_OUTAGE_TEXTS)
