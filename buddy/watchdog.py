"""Total deadlines for upstream calls: one thread per process shuts a connection's socket down when its time is up.

requests' read timeout is per read, so an upstream that sends one byte a second keeps a thread forever. A
socket shut down under a blocked read makes that read return at once, and the caller reports a timeout.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import os
import socket
import threading
import time

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
    """`arm(deadline, sock)` -> Alarm; `disarm(alarm)` once the call is over. Restarted after a fork."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Alarm]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._pid = 0
        self._thread: threading.Thread | None = None

    def arm(self, deadline: float, sock: socket.socket | None) -> Alarm:
        alarm = Alarm(deadline, sock)
        with self._cond:
            if self._pid != os.getpid():
                self._pid, self._heap = os.getpid(), []
                self._thread = threading.Thread(target=self._run, name="buddy-upstream-watchdog", daemon=True)
                self._thread.start()
            heapq.heappush(self._heap, (deadline, next(self._order), alarm))
            self._cond.notify()
        return alarm

    def stop(self) -> None:
        """End the thread (an app shutting down); a later arm() starts it again."""
        with self._cond:
            mine, self._pid = self._pid == os.getpid(), 0
            self._cond.notify()
        if mine and self._thread is not None:
            self._thread.join(5)

    @staticmethod
    def disarm(alarm: Alarm) -> None:
        alarm.done = True  # dropped from the heap when its time comes; nothing to wake for

    def _run(self) -> None:
        pid = os.getpid()
        while True:
            with self._cond:
                if self._pid != pid:
                    return
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
