"""One background thread per process for each of the proxy's loops (wake-ups, metrics, locks, deadlines, probes),
and short-lived threads of one kind (background refreshes); each says how it is doing, for /admin/health.

A loop runs in a daemon thread started on demand in the process that needs it: again in a forked child
(which inherits the object but not the thread), again if the loop died of an error (logged, after a
pause), never twice at once. `stop()` ends it for good and waits for it.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable, Protocol

log = logging.getLogger("buddy")
RESTART_PAUSE_SECONDS = 1.0
# What /admin/health says of a kind of thread, in the process that answers:
ALIVE = "alive"  # running
IDLE = "idle"  # not started in this process yet (each starts when first needed), or done until needed again
DEAD = "dead"  # ended by an error it could not recover from; started again when next needed
STOPPED = "stopped"  # stopped for good: the app was shut down
_pid = os.getpid()  # this process's, kept here: os.getpid() is a system call, and `running` is asked on every request


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


class Watched(Protocol):
    """A kind of background thread, as /admin/health shows it (ProcessThread, ShortLived)."""

    name: str

    def report(self) -> dict[str, Any]: ...


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
        self.restarts = 0  # in this process: its loop failed (logged) and ran again, or its dead thread started again
        self.death: str | None = None  # why this process's thread ended, if an error ended it

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
                self.restarts, self.death = 0, None
                if self.fresh is not None:
                    self.fresh()
            elif self.death is not None:
                self.restarts, self.death = self.restarts + 1, None
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

    def state(self) -> str:
        """ALIVE, IDLE, DEAD or STOPPED, in this process."""
        if self.stopping.is_set():
            return STOPPED
        if self.running:
            return ALIVE
        if self._thread is not None and self._pid == _pid and self.death is not None:
            return DEAD
        return IDLE

    def report(self) -> dict[str, Any]:
        """What /admin/health shows of this thread: its name, state, restarts, and what ended it when dead."""
        state = self.state()
        shown: dict[str, Any] = {"name": self.name, "state": state, "restarts": self.restarts}
        if state == DEAD:
            shown["error"] = self.death
        return shown

    def _run(self) -> None:
        try:
            while not self.stopping.is_set():
                try:
                    self.loop(self.stopping)
                    return  # the loop is done (a prober whose Redis is back); ensure() may start it again
                except Exception:
                    self.restarts += 1
                    log.exception("%s failed; starting it again", self.name)
                    self.stopping.wait(RESTART_PAUSE_SECONDS)
        except BaseException as exc:  # SystemExit from code the loop called, say: no `except Exception` sees it
            self.death = described(exc)
            if not self.stopping.is_set():
                log.error("%s died (%s); it starts again when next needed", self.name, self.death)
            raise


class ShortLived:
    """Threads of one kind that each run one job and end (a background refresh each), at most `limit` at once in
    this process: `reserve()` a place, then `run()` a job in it, or `release()` it unused."""

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self.stopping = threading.Event()
        self.died = 0  # jobs whose thread an error ended that the job did not catch
        self.death: str | None = None  # the latest such error
        self._places = threading.BoundedSemaphore(limit)
        self._running: set[threading.Thread] = set()
        self._lock = threading.Lock()

    def reserve(self) -> bool:
        """Take a place for a job; False when all are taken, or once stopped."""
        return not self.stopping.is_set() and self._places.acquire(blocking=False)

    def release(self) -> None:
        """Give back a place that no job ran in (a job's own place is given back when it ends)."""
        self._places.release()

    def run(self, job: Callable[..., object], *args: object) -> None:
        """Run `job(*args)` in a new thread, in a reserved place; RuntimeError when no thread can be had (the place
        is still the caller's to release)."""
        thread = threading.Thread(target=self._run, args=(job, args), name=self.name, daemon=True)
        with self._lock:
            self._running.add(thread)
        try:
            thread.start()
        except BaseException:
            with self._lock:
                self._running.discard(thread)
            raise

    def stop(self) -> None:
        """No job starts from now on; the ones running end with their job (a process leaving does not wait)."""
        self.stopping.set()

    def running(self) -> int:
        with self._lock:
            return sum(thread.is_alive() for thread in self._running)

    def report(self) -> dict[str, Any]:
        """Name, state (ALIVE while a job runs, else IDLE, or STOPPED), jobs running, limit, jobs an error ended."""
        running = self.running()
        state = STOPPED if self.stopping.is_set() else ALIVE if running else IDLE
        shown: dict[str, Any] = {"name": self.name, "state": state, "running": running, "limit": self.limit,
                                 "died": self.died}
        if self.death is not None:
            shown["error"] = self.death
        return shown

    def _run(self, job: Callable[..., object], args: tuple[object, ...]) -> None:
        try:
            job(*args)
        except BaseException as exc:
            self.died, self.death = self.died + 1, described(exc)
            raise
        finally:
            with self._lock:
                self._running.discard(threading.current_thread())
            self._places.release()


def described(exc: BaseException) -> str:
    """An error as health shows it: its type, and its message if any."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
