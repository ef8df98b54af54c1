"""The boundary to Redis: a circuit breaker for outages, one circuit per part of the store that fails alone, and
error replies kept apart from outages.

- Circuits. One Redis server (or Sentinel's primary) is one circuit. On a Redis Cluster each primary is one: every
  key of a mapping carries its name as a {hash tag}, so a mapping lives on one primary, and a primary that fails
  sends only its own mappings to BYPASS while the others keep their cache. A call names a key it touches (`key=`);
  its circuit is that of the primary serving the key's slot in the client's current view of the cluster (no round
  trip). A call without a key (PUBLISH, a pipeline over several mappings, a SCAN of one node) is refused only while
  the cluster as a whole cannot be reached. The whole-cluster circuit also holds the keys of a cluster not reached
  yet.
- A connection error or timeout (Redis down, restarting, hung, or a replica that turned read-only during a
  failover) opens a circuit: that of the node redis-py names in the error, else that of the call's key (on one
  server, the only one). While it is open, every call for it fails at once with StoreUnavailable, without
  touching Redis, and one probe per open circuit (from a background thread every `retry_after` seconds, or without
  one a single call let through) finds out when it is back; the first that succeeds closes it. A hung Redis thus
  costs one (short: see connect.COMMAND_TIMEOUT_SECONDS) timeout per process and node, not one per request. On a
  cluster the probe first asks the cluster which node serves which slots now: once a replica has taken over, the
  failed node serves none, its circuit closes, and its mappings' keys go to their new primary.
- An error reply (Redis answered) is not an outage and never opens a circuit: that call fails with
  StoreUnavailable so the request carries on without Redis. Out of memory is recorded as a refusal (health says
  writes fail and why); anything else (WRONGTYPE, a script error) is a bug: logged loudly, once per kind, with what
  the call touched, and kept for health.
- A Redis Cluster adds its own of each. Outages: CLUSTERDOWN and MASTERDOWN (a failover under way, slots with no
  primary: the node that says so), slots the client finds uncovered, a cluster it cannot reach at all (the
  whole-cluster circuit). Passing: TRYAGAIN, and a MOVED or ASK that redis-py did not follow itself (slots
  migrating): that call fails, the circuit stays closed (while a slot moves, new keys of it see this until the move
  ends). Bugs: keys of one call in different slots (CROSSSLOT, or redis-py's refusal to send such a call).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Protocol, TypeVar

import redis
from redis.exceptions import RedisClusterException

from buddy.background import ProcessThread
from buddy.errors import StoreUnavailable
from buddy.redis_memory import out_of_memory
from buddy.store.outages import PASSING, is_outage, node_named_by, unreachable

__all__ = ["StoreGuard", "NodeMap", "WHOLE", "BUG_TTL_SECONDS", "is_outage"]

log = logging.getLogger("buddy.store")
T = TypeVar("T")
RECENT_SECONDS = 60.0  # a refusal or bug older than this no longer makes health 'degraded'
BUG_SHARE_SECONDS = 5.0
BUG_TTL_SECONDS = 60
WHOLE = ""  # the name of the circuit of the whole store: the one server, Sentinel's primary, a cluster as a whole


class NodeMap(Protocol):
    """A Redis Cluster as the guard sees it (connect.LazyCluster)."""

    def node_of(self, key: str) -> str:
        """host:port of the primary serving `key`'s slot in the client's current view; WHOLE if none is known."""

    def probe(self, node: str) -> object:
        """Raise an outage error while `node` (WHOLE: the cluster as a whole) cannot serve; return if it can, or if
        it no longer serves any slot (a replica took over)."""


class Circuit:
    """One open circuit: since when, why, and its probing."""

    def __init__(self, name: str, now: float) -> None:
        self.name = name
        self.failed_at = now
        self.error = ""
        self.probe_at = now  # the first probe comes retry_after from now
        self.probing = False
        self.logged_at = float("-inf")

    def describe(self) -> str:
        return self.error if self.name == WHOLE else f"node {self.name}: {self.error}"


class StoreGuard:
    """Runs Redis calls; see the module docstring for what each kind of failure does."""

    def __init__(
        self,
        retry_after: float = 1.0,
        log_every: float = 30.0,
        probe: Callable[[], object] | None = None,
        on_bug: Callable[[str], object] | None = None,
        nodes: NodeMap | None = None,
    ) -> None:
        self.retry_after = retry_after
        self.log_every = log_every
        self.probe = probe  # given (a PING): a background thread probes, so that no request ever waits on it
        self.nodes = nodes  # given (a cluster): a circuit per primary, each probed through nodes.probe
        self.on_bug = on_bug  # given: tells every process (through Redis) of an error reply, at most every 5 s
        self._bug_shared_at = 0.0
        self._open: dict[str, Circuit] = {}  # the open circuits by name (WHOLE or host:port); closed ones are gone
        self.last_error = ""  # the latest outage, of any circuit
        self.refused_at: float | None = None  # the last error reply for lack of memory
        self.last_refusal = ""
        self.bug_at: float | None = None  # the last other error reply
        self.last_bug = ""
        self._bugs_logged: set[str] = set()
        self._refused_logged_at = 0.0
        self._passing_logged_at = float("-inf")
        self._unplaced_logged_at = float("-inf")
        self._lock = threading.Lock()
        self.prober = ProcessThread("buddy-redis-probe", self._probe_until_back)

    def run(self, call: Callable[[], T], what: str = "", *, key: str | None = None) -> T:
        """Run one Redis call. `key`: a key it touches (on a cluster, the circuit is that of the key's node; every
        key of one call shares a slot); `what` names the keys it touches for the log line of a bug (default: `key`)."""
        where = self.where(key)
        probing = self._admit(where) if self._open else None
        try:
            result = call()
        except (redis.RedisError, RedisClusterException) as exc:
            if is_outage(exc):
                self._failed(self._blame(exc, where), exc)
            elif isinstance(exc, PASSING):
                self._passing(exc, where)
            else:
                self._answered_with_error(exc, what or key or "", where, answered=isinstance(exc, redis.RedisError))
            raise StoreUnavailable(str(exc)) from exc
        finally:
            if probing is not None:
                probing.probing = False
        if self._open:
            self._recovered(where)
        return result

    def where(self, key: str | None) -> str:
        """The name of the circuit a call touching `key` depends on: its node on a cluster, else WHOLE."""
        if key is None or self.nodes is None:
            return WHOLE
        return self.nodes.node_of(key)

    @property
    def open(self) -> bool:
        """True while some circuit is open: Redis, or a part of the cluster, counts as unavailable."""
        return bool(self._open)

    def open_for(self, key: str | None) -> bool:
        """True while calls touching `key` fail without being tried."""
        if not self._open:
            return False
        return WHOLE in self._open or self.where(key) in self._open

    def problems(self) -> list[str]:
        """What is wrong with Redis now, for health: an outage (per node on a cluster), writes refused, a recent bug."""
        now, found = time.monotonic(), []
        with self._lock:
            circuits = sorted(self._open.values(), key=lambda c: c.name)
        found += [f"unavailable: {circuit.describe()}" for circuit in circuits]
        if self.refused_at is not None and now - self.refused_at < RECENT_SECONDS:
            found.append(f"writes refused: {self.last_refusal}")
        if self.bug_at is not None and now - self.bug_at < RECENT_SECONDS:
            found.append(f"error replies: {self.last_bug}")
        return found

    def stop(self) -> None:
        self.prober.stop()

    def _admit(self, where: str) -> Circuit | None:
        """Let a call through unless its circuit (or the whole store's) is open; the circuit whose probe the call is,
        if it is one (without a background prober, one call per circuit and interval goes through as its probe)."""
        with self._lock:
            now = time.monotonic()
            for name in (WHOLE, where) if where != WHOLE else (WHOLE,):
                circuit = self._open.get(name)
                if circuit is None:
                    continue
                if self._background:
                    self.prober.ensure()  # (a no-op while it runs)
                    raise StoreUnavailable(circuit.describe())
                if circuit.probing or now - circuit.probe_at < self.retry_after:
                    raise StoreUnavailable(circuit.describe())
                circuit.probing, circuit.probe_at = True, now
                return circuit
        return None

    @property
    def _background(self) -> bool:
        return self.probe is not None or self.nodes is not None

    def _blame(self, exc: BaseException, where: str) -> str | None:
        """The circuit an outage opens: on one server the only one; on a cluster the whole cluster's when no node
        answers, else the node named in the error (where redis-py was sent: after a MOVED, not the one the key's
        slot mapped to), else the node of the call's key; None for a call without a key that names no node (a
        pipeline over several nodes, say): nothing is known to be down, and no circuit opens."""
        if self.nodes is None or unreachable(exc):
            return WHOLE
        return node_named_by(exc) or where or None

    def _passing(self, exc: Exception, where: str) -> None:
        """A slot in migration: this call goes without Redis, the next one finds the slot's new home."""
        now = time.monotonic()
        if self._open:
            self._recovered(where)  # it answered: reachable again
        with self._lock:
            if now - self._passing_logged_at < self.log_every:
                return
            self._passing_logged_at = now
        log.warning("Redis Cluster is moving slots (or a one-server URL names a cluster node: see /admin/health); "
                    "a call went without the cache: %s: %s", type(exc).__name__, exc)

    def _answered_with_error(self, exc: Exception, what: str, where: str, answered: bool = True) -> None:
        """An error reply (`answered`), or a call that redis-py refused to send (a RedisClusterException)."""
        message = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        if self._open and answered:
            self._recovered(where)  # it answered: reachable again
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

    def _probe_until_back(self, stopping: threading.Event) -> None:
        """The background prober: once started, one probe of each open circuit every `retry_after` seconds."""
        while not stopping.wait(self.retry_after):
            with self._lock:
                names = list(self._open)
            for name in names:
                try:
                    if self.nodes is not None:
                        self.nodes.probe(name)
                    else:
                        assert self.probe is not None
                        self.probe()
                except (redis.RedisError, RedisClusterException) as exc:
                    if is_outage(exc):
                        self._failed(name, exc)
                        continue
                    # an error reply is an answer: Redis is reachable
                self._recovered(name)

    def _failed(self, name: str | None, exc: BaseException) -> None:
        now = time.monotonic()
        error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self.last_error = error
            if name is None:
                if now - self._unplaced_logged_at >= self.log_every:
                    self._unplaced_logged_at = now
                    log.warning("a Redis Cluster call without a key failed (no circuit opens for it): %s", error)
                return
            circuit = self._open.get(name)
            if circuit is None:
                circuit = self._open[name] = Circuit(name, now)
                if self._background:
                    self.prober.ensure()
            circuit.error = error
            if now - circuit.logged_at < self.log_every:
                return
            circuit.logged_at = now
        if name == WHOLE:
            log.error("Redis unavailable: serving without cache (X-Cache: BYPASS), rate limits kept per process, "
                      "one probe every %.0f s: %s", self.retry_after, error)
        else:
            log.error("Redis Cluster node %s unavailable: the mappings it serves go without cache (X-Cache: BYPASS) "
                      "and keep their rate limits per process until it or a replica answers, probed every %.0f s: "
                      "%s", name, self.retry_after, error)

    def _recovered(self, name: str) -> None:
        """A call or probe that depends on circuit `name` got an answer: it closes, and so does the whole store's."""
        with self._lock:
            closed = [self._open.pop(n) for n in {name, WHOLE} if n in self._open]
        for circuit in closed:
            if circuit.name == WHOLE:
                log.warning("Redis is back, cache in use again")
            else:
                log.warning("Redis Cluster node %s is back (or no longer serves any slot), cache in use again for "
                            "its mappings", circuit.name)
