"""One app's lifecycle: its parts start in the order they were added and stop in reverse, once; an app still open
when its process leaves (a gunicorn worker's quick exit, the interpreter's exit) is closed then."""
from __future__ import annotations

import atexit
import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("buddy")


@dataclass(frozen=True)
class Part:
    """A part with a lifecycle: `start` (if any) runs when the app starts, `stop` (if any) when it closes."""

    name: str
    start: Callable[[], object] | None = None
    stop: Callable[[], object] | None = None


class Lifecycle:
    """`add()` each part as it is built, `start()` once all are, `close()` (any number of times) at the end.

    A part that fails to stop is logged and the others still stop: a worker leaving, or a program closing its
    proxy, gets its counters flushed and its embedded Redis left whatever one thread does.
    """

    def __init__(self) -> None:
        self.parts: list[Part] = []
        self.closed = False
        self._lock = threading.Lock()

    def add(self, name: str, *, start: Callable[[], object] | None = None,
            stop: Callable[[], object] | None = None) -> None:
        self.parts.append(Part(name, start, stop))

    def start(self) -> None:
        """Start every part, in the order added; from now until close(), the process's exit closes this one."""
        _OPEN.add(self)
        for part in self.parts:
            if part.start is not None:
                part.start()

    def close(self) -> None:
        """Stop every part, last added first; later calls do nothing."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        _OPEN.discard(self)
        for part in reversed(self.parts):
            if part.stop is None:
                continue
            try:
                part.stop()
            except Exception:
                log.exception("stopping %s failed", part.name)


# Weak: an app its program dropped without closing it does not stay in memory for this (its threads, while they
# run, keep what they use alive, and stop with the process).
_OPEN: "weakref.WeakSet[Lifecycle]" = weakref.WeakSet()


@atexit.register
def close_all() -> None:
    """Close every app still open in this process: flush its counters, leave the embedded Redis. The one exit hook
    for all of them (registered once, at import); a gunicorn worker calls it itself on its way out."""
    for lifecycle in list(_OPEN):
        lifecycle.close()
