"""Total deadlines for upstream calls: one thread per process shuts a connection's socket down when its time is up.

requests' read timeout is per read, so an upstream that sends one byte a second keeps a thread forever. A
socket shut down under a blocked read makes that read return at once, and the caller reports a timeout.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import socket
import threading
import time

from buddy.background import ProcessThread

log = logging.getLogger("buddy.upstream")


class Alarm:
    """One armed deadline; `fired` tells the reader why its read failed."""

    __slots__ = ("deadline", "sock", "fired", "done")

    def __init__(self, deadline: float, sock: socket.socket | None) -> None:
        self.deadline = deadline
        self.sock = sock
        self.fired = False
        self.done = False


class Watchdog:
    """`arm(deadline, sock)` -> Alarm; `disarm(alarm)` once the call is over; `stop()` ends the thread."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Alarm]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self.thread = ProcessThread("buddy-upstream-watchdog", self._run, fresh=self._heap.clear)

    def arm(self, deadline: float, sock: socket.socket | None) -> Alarm:
        alarm = Alarm(deadline, sock)
        self.thread.ensure()
        with self._cond:
            heapq.heappush(self._heap, (deadline, next(self._order), alarm))
            self._cond.notify()
        return alarm

    def stop(self) -> None:
        self.thread.stopping.set()
        with self._cond:
            self._cond.notify()
        self.thread.stop()

    @staticmethod
    def disarm(alarm: Alarm) -> None:
        alarm.done = True  # dropped from the heap when its time comes; nothing to wake for

    def _run(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            with self._cond:
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)
                wait = self._heap[0][0] - time.monotonic() if self._heap else 60.0
                if wait > 0:
                    self._cond.wait(min(wait, 60.0))
                    continue
                _, _, alarm = heapq.heappop(self._heap)
            self._fire(alarm)

    @staticmethod
    def _fire(alarm: Alarm) -> None:
        if alarm.done or alarm.sock is None:
            return
        alarm.fired = True
        try:
            alarm.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed: the call is over anyway
