"""One pub/sub subscriber per process that wakes the local requests waiting on a fill."""
from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any, Callable

import redis
from redis.exceptions import RedisClusterException

from buddy.background import ProcessThread
from buddy.redis_keys import EntryId
from buddy.store.connect import cluster_of, refresh_topology

log = logging.getLogger("buddy.coalesce")
# A subscription quiet for this long is PINGed (a hung Redis, a cut network, send nothing, not even an error);
# after TRUSTED_SECONDS of silence, this worker's in-memory copies (L1) are not used, since a store or clear may
# go unheard; after GIVE_UP_SECONDS, the subscription is made again.
HEARTBEAT_SECONDS = 0.5
TRUSTED_SECONDS = 1.5
GIVE_UP_SECONDS = 5.0


def entry_message(entry: EntryId) -> str:
    """What the channel carries about one entry: its waiters wake, and every worker drops its copy (L1)."""
    return f"{entry.domain}\n{entry.digest}"


class Waiter:
    """A waiting request: an Event that the subscriber sets when its entry is announced, and `then`, called (on
    the subscriber's thread) each time, for a request parked without a thread (buddy.parking)."""

    def __init__(self, then: Callable[[], None] | None = None) -> None:
        self.event = threading.Event()
        self.then = then

    def wait(self, timeout: float) -> bool:
        woken = self.event.wait(timeout)
        self.event.clear()
        return woken

    def wake(self) -> None:
        self.event.set()
        if self.then is not None:
            self.then()


class WakeupHub:
    """Subscribes once per process (re-started after a fork) and dispatches to local waiters.

    A waiter registers before it re-checks Redis, so a result published in between is seen by the re-check,
    and one published after it wakes the waiter: no wake-up is lost. That holds only once Redis has
    confirmed the subscription (`listening`); until then, and while Redis is restarting, waiters poll
    quickly, and every waiter is woken when the subscription comes back.

    On a Redis Cluster the subscription goes to one node, picked at random (so that many processes spread
    over the cluster): a classic PUBLISH on any node reaches every node, replicas included. When that node
    fails, the next subscription goes to another one, from a fresh view of the cluster. With Sentinel it goes
    to the current primary, found again after a switch.
    """

    def __init__(self, client: redis.Redis, channel: str) -> None:
        self.client = client
        self.channel = channel
        self.node = ""  # on a cluster, the node subscribed to (or last tried)
        self._node_failed = False
        self._waiters: dict[str, set[Waiter]] = {}
        self._lock = threading.Lock()
        self._listening = threading.Event()
        self.epoch = 0  # counts confirmed subscriptions: a message may have been missed between two of them
        self.heard = 0.0  # monotonic: when Redis last sent anything on the subscription (a PONG counts)
        self.listeners: list[Callable[[str], None]] = []  # told every message (the L1 cache drops what it names)
        self._pubsub_now: Any = None  # the subscription the thread reads from, for stop() to cut short
        self.thread = ProcessThread("buddy-wakeup", self._run, fresh=self._listening.clear, interrupt=self._hang_up)

    @property
    def listening(self) -> bool:
        """True while the subscription is confirmed by Redis: only then may a waiter rely on being woken."""
        return self._listening.is_set() and self.thread.running

    def current(self) -> int | None:
        """The subscription now confirmed and heard from lately (a number that changes on every new one); None
        while there is none, or it has been silent for TRUSTED_SECONDS, PINGs unanswered."""
        if not self.listening or time.monotonic() - self.heard > TRUSTED_SECONDS:
            return None
        return self.epoch

    def start(self, wait: float = 0.0) -> bool:
        """Start this process's subscriber (if needed) and wait up to `wait` seconds for Redis to confirm it."""
        self.thread.ensure()
        return self._listening.wait(wait) if wait else self.listening

    def register(self, entry: EntryId, then: Callable[[], None] | None = None) -> Waiter:
        self.start(wait=0.5)
        waiter = Waiter(then)
        with self._lock:
            self._waiters.setdefault(self._name(entry), set()).add(waiter)
        return waiter

    def unregister(self, entry: EntryId, waiter: Waiter) -> None:
        name = self._name(entry)
        with self._lock:
            waiters = self._waiters.get(name)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[name]

    def waiting(self) -> int:
        with self._lock:
            return sum(len(w) for w in self._waiters.values())

    def stop(self) -> None:
        self.thread.stop()

    def _hang_up(self) -> None:
        """Close the subscription's connection under the reading thread: its wait ends now, not at its timeout."""
        pubsub = self._pubsub_now
        if pubsub is not None and pubsub.connection is not None:
            pubsub.connection.disconnect()

    @staticmethod
    def _name(entry: EntryId) -> str:
        return entry_message(entry)

    def _wake(self, name: str | None) -> None:
        with self._lock:
            if name is None:
                targets = [w for waiters in self._waiters.values() for w in waiters]
            else:
                targets = list(self._waiters.get(name, ()))
        for waiter in targets:
            waiter.wake()

    def _pubsub(self) -> Any:
        """A pub/sub object: the client's own, or on a cluster one bound to a node chosen here."""
        cluster = cluster_of(self.client)  # a cluster that cannot be reached raises ConnectionError
        if cluster is None:
            return self.client.pubsub()
        if self._node_failed:
            refresh_topology(cluster)
        nodes = cluster.get_nodes()
        others = [node for node in nodes if node.name != self.node] if self._node_failed else nodes
        node = random.choice(others or nodes)
        self.node, self._node_failed = node.name, True  # until the subscription is confirmed
        return cluster.pubsub(node=node)

    @staticmethod
    def _check_alive(pubsub: Any, heard: float, pinged: bool) -> tuple[float, bool]:
        """A node that vanished without closing the connection (host down, network cut) sends nothing, not even an
        error: after a quiet HEARTBEAT_SECONDS, PING it; with no answer by GIVE_UP_SECONDS, reconnect."""
        quiet = time.monotonic() - heard
        if quiet < HEARTBEAT_SECONDS:
            return heard, pinged
        if not pinged:
            pubsub.ping()
            return heard, True
        if quiet >= GIVE_UP_SECONDS:
            raise redis.ConnectionError(f"no answer to PING on the wake-up subscription for {quiet:.0f} s")
        return heard, pinged

    def _run(self, stopping: threading.Event) -> None:
        failures = 0
        while not stopping.is_set():
            pubsub = None
            try:
                pubsub = self._pubsub_now = self._pubsub()
                if stopping.is_set():
                    break
                pubsub.subscribe(self.channel)
                heard, pinged = time.monotonic(), False
                while not stopping.is_set():
                    message = pubsub.get_message(timeout=0.25)  # short, so that stop() is quick
                    if not message:
                        heard, pinged = self._check_alive(pubsub, heard, pinged)
                        continue
                    heard, pinged = time.monotonic(), False
                    self.heard = heard
                    if message.get("type") == "subscribe":
                        # Redis has processed SUBSCRIBE: every publish from now on reaches us.
                        self._node_failed = False
                        self.epoch += 1
                        self._listening.set()
                        if failures:
                            log.warning("wake-up subscription restored")
                            self._wake(None)  # something may have finished while we were deaf
                        failures = 0
                    elif message.get("type") == "message":
                        data = message["data"]
                        name = data.decode() if isinstance(data, bytes) else str(data)
                        for listener in self.listeners:
                            try:
                                listener(name)
                            except Exception:  # a listener's bug must not cost the waiters their wake-ups
                                log.exception("a wake-up listener failed on %r", name[:200])
                        self._wake(name)
            except (redis.RedisError, RedisClusterException, OSError, ValueError) as exc:
                self._listening.clear()
                self._node_failed = True
                if stopping.is_set():
                    break  # shutting down: Redis may already be gone, nothing to report
                if failures == 0:
                    where = f" (node {self.node})" if self.node else ""
                    log.warning("wake-up subscription lost%s, waiters poll until it is back: %s", where, exc)
                failures += 1
                time.sleep(min(1.0, 0.1 * failures))
            finally:
                try:
                    if pubsub is not None:
                        pubsub.close()
                except Exception:  # closing a broken connection may fail again; nothing left to do
                    pass
