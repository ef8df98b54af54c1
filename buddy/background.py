"""One background thread per process for each of the proxy's loops (wake-ups, metrics, locks, deadlines, probes).

A loop runs in a daemon thread started on demand in the process that needs it: again in a forked child
(which inherits the object but not the thread), again if the loop died of an error (logged, after a
pause), never twice at once. `stop()` ends it for good and waits for it.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Callable

log = logging.getLogger("buddy")
RESTART_PAUSE_SECONDS = 1.0
_pid = os.getpid()  # this process's, kept here: os.getpid() is a system call, and `running` is asked on every request


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


class ProcessThread:
    """`ensure()` before relying on the loop; the loop gets the `stopping` Event and should return soon after
    it is set. `fresh`, if given, runs whenever the thread starts in a new process (to drop state a forked
    child must not inherit, such as its parent's unflushed counters); `interrupt`, if given, runs when stop()
    is called, to end a wait the loop cannot see the Event from (a blocking read)."""

    def __init__(
        self, name: str, loop: Callable[[threading.Event], None], fresh: Callable[[], None] | None = None,
        interrupt: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.loop = loop
        self.fresh = fresh
        self.interrupt = interrupt
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        """True while this process's thread is alive."""
        thread = self._thread
        return thread is not None and self._pid == _pid and thread.is_alive()

    def ensure(self) -> None:
        """Start the thread in this process, unless it runs already or was stopped."""
        if self.running or self.stopping.is_set():
            return
        with self._lock:
            if self.running or self.stopping.is_set():
                return
            if self._pid != os.getpid():
                self._pid = os.getpid()
                if self.fresh is not None:
                    self.fresh()
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """End the loop for good and wait up to `timeout` seconds for the thread."""
        self.stopping.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread() and self._pid == os.getpid():
            if self.interrupt is not None:
                try:
                    self.interrupt()
                except Exception:  # the loop still ends at its next look at `stopping`
                    log.debug("%s: interrupting its wait failed", self.name, exc_info=True)
            thread.join(timeout)

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.loop(self.stopping)
                return  # the loop is done (a prober whose Redis is back); ensure() may start it again
            except Exception:
                log.exception("%s failed; starting it again", self.name)
                self.stopping.wait(RESTART_PAUSE_SECONDS)
