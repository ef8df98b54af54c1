"""Parked followers: a request waiting on an identical one in flight costs a socket, not a thread.

Each worker lets only so many of its threads wait on fills (store.rate_limiter.WaitingRoom: hits need the rest).
Under `gunicorn wsgi:app` a follower that finds no room does not get a 429: it is parked. The service raises
`Parked` through the app; the worker (buddy.worker) keeps the connection without a thread and, when the fill it
follows is announced (or once a second, or at its deadline), runs the same request again on a thread, which
follows the same leader from where it left off (`resumed`): its answer, or that leader's shared result or relay,
never a second upstream call. Elsewhere (the Flask app under another server, CachingProxy) nothing is parkable,
and a follower without room is refused as before.

The worker says what may be parked, and what is resumed, for the request its thread is running (`running`).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from buddy.redis_keys import EntryId
from buddy.store.wakeup import Waiter, WakeupHub


@dataclass(eq=False)
class Parked(BaseException):
    """Raised by a follower with no room to wait, through Flask (a BaseException, so no error handler turns it
    into a 500) to the worker, which parks its connection. `body`: the request's, read already."""

    entry: EntryId
    holder: str  # the leader it follows
    started: float  # time.monotonic() when it began to wait: its coalescing deadline counts from there
    body: bytes
    hub: WakeupHub = field(repr=False)
    waiter: Waiter | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.waiter is None:  # from the request's thread: nothing announced from now on goes unheard
            self.waiter = self.hub.register(self.entry)

    def watch(self, wake: Callable[[], None]) -> None:
        """Call `wake` (from the hub's thread, or now) when the entry's fill is announced, or was since parking."""
        assert self.waiter is not None
        self.waiter.then = wake
        if self.waiter.event.is_set():
            wake()

    def unwatch(self) -> None:
        if self.waiter is not None:
            self.hub.unregister(self.entry, self.waiter)
            self.waiter = None


_running = threading.local()  # .parkable: bool; .resumed: Parked | None, for the request this thread runs


@contextmanager
def running(parkable: bool, resumed: Parked | None = None) -> Iterator[None]:
    """The worker's thread runs one request: whether it may park, and the parked request it resumes, if any."""
    _running.parkable, _running.resumed = parkable, resumed
    try:
        yield
    finally:
        _running.parkable, _running.resumed = False, None


def parkable() -> bool:
    """May the request this thread runs be parked (under buddy's worker, which is not stopping)?"""
    return getattr(_running, "parkable", False)


def resumed(entry: EntryId) -> Parked | None:
    """The parked request this thread resumes, if it followed a fill of `entry`."""
    parked: Parked | None = getattr(_running, "resumed", None)
    return parked if parked is not None and parked.entry == entry else None


def resuming() -> bool:
    """Does this thread run a parked request again? (Then the hit path leaves it to the view: its answer, found
    in the cache now, is the fill it waited on, COALESCED, not a HIT.)"""
    return getattr(_running, "resumed", None) is not None


def resumed_body() -> bytes | None:
    """The body of the request this thread resumes (read before it was parked), or None."""
    parked: Parked | None = getattr(_running, "resumed", None)
    return parked.body if parked is not None else None
