"""One pub/sub subscriber per process that wakes the local requests waiting on a fill."""
from __future__ import annotations

import logging
import threading
import time

import redis

from buddy.background import ProcessThread
from buddy.redis_keys import EntryId

log = logging.getLogger("buddy.coalesce")


class Waiter:
    """A parked request: an Event that the subscriber sets when its entry is announced."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def wait(self, timeout: float) -> bool:
        woken = self.event.wait(timeout)
        self.event.clear()
        return woken


class WakeupHub:
    """Subscribes once per process (re-started after a fork) and dispatches to local waiters.

    A waiter registers before it re-checks Redis, so a result published in between is seen by the re-check,
    and one published after it wakes the waiter: no wake-up is lost. That holds only once Redis has
    confirmed the subscription (`listening`); until then, and while Redis is restarting, waiters poll
    quickly, and every waiter is woken when the subscription comes back.
    """

    def __init__(self, client: redis.Redis, channel: str) -> None:
        self.client = client
        self.channel = channel
        self._waiters: dict[str, set[Waiter]] = {}
        self._lock = threading.Lock()
        self._listening = threading.Event()
        self.thread = ProcessThread("buddy-wakeup", self._run, fresh=self._listening.clear)

    @property
    def listening(self) -> bool:
        """True while the subscription is confirmed by Redis: only then may a waiter rely on being woken."""
        return self._listening.is_set() and self.thread.running

    def start(self, wait: float = 0.0) -> bool:
        """Start this process's subscriber (if needed) and wait up to `wait` seconds for Redis to confirm it."""
        self.thread.ensure()
        return self._listening.wait(wait) if wait else self.listening

    def register(self, entry: EntryId) -> Waiter:
        self.start(wait=0.5)
        waiter = Waiter()
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

    @staticmethod
    def _name(entry: EntryId) -> str:
        return f"{entry.domain}\n{entry.digest}"

    def _wake(self, name: str | None) -> None:
        with self._lock:
            if name is None:
                targets = [w for waiters in self._waiters.values() for w in waiters]
            else:
                targets = list(self._waiters.get(name, ()))
        for waiter in targets:
            waiter.event.set()

    def _run(self, stopping: threading.Event) -> None:
        failures = 0
        while not stopping.is_set():
            pubsub = self.client.pubsub()
            try:
                pubsub.subscribe(self.channel)
                while not stopping.is_set():
                    message = pubsub.get_message(timeout=0.25)  # short, so that stop() is quick
                    if not message:
                        continue
                    if message.get("type") == "subscribe":
                        # Redis has processed SUBSCRIBE: every publish from now on reaches us.
                        self._listening.set()
                        if failures:
                            log.warning("wake-up subscription restored")
                            self._wake(None)  # something may have finished while we were deaf
                        failures = 0
                    elif message.get("type") == "message":
                        data = message["data"]
                        self._wake(data.decode() if isinstance(data, bytes) else str(data))
            except (redis.RedisError, OSError, ValueError) as exc:
                self._listening.clear()
                if stopping.is_set():
                    break  # shutting down: Redis may already be gone, nothing to report
                if failures == 0:
                    log.warning("wake-up subscription lost, waiters poll until it is back: %s", exc)
                failures += 1
                time.sleep(min(1.0, 0.1 * failures))
            finally:
                try:
                    pubsub.close()
                except Exception:  # closing a broken connection may fail again; nothing left to do
                    pass
