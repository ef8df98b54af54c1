"""What a worker still has to send to clients that read slowly: a slow reader costs a socket, not a thread.

A request's thread writes its answer through the connection's `Outbox` (gunicorn's Response writes to it as to
a socket). What the client's socket takes at once is sent at once; the rest is queued, without a copy, and the
worker's main loop sends it as the client reads (buddy.worker). The thread is then free: a cached 8 MB answer to
a client that never reads holds the bytes it has not taken and a socket, nothing else. A client that takes
nothing for `server.send_timeout` seconds is closed by the loop.

Bounds, so that slow readers cannot take the worker's memory instead of its threads:
- `SendBudget`: the bytes one worker holds for slow readers (`server.send_buffer`). An answer the budget cannot
  take is still queued, but its thread waits until that client has taken it all (as a plain gunicorn thread
  would), closed by the same send_timeout. Identical large answers (many clients of one cached entry) are held
  once: the budget counts each distinct body once, however many clients are sending it.
- `PRODUCER_AHEAD`: a thread that keeps writing (a streamed body) waits while its client has this much queued,
  so a stream is never read from upstream faster than its client takes it.
"""
from __future__ import annotations

import errno
import socket
import threading
import time
from collections import deque
from typing import Callable

#: A writing thread waits while its client has more than this queued (a stream outpacing its reader).
PRODUCER_AHEAD = 1024 * 1024
#: Bodies at least this large are held once for all the clients sending them.
SHARED_SIZE = 256 * 1024
#: How long a waiting thread sleeps between looks at its client (the loop also wakes it on progress).
WAIT_STEP = 1.0


class SendBudget:
    """The bytes one worker holds for slow readers: each distinct body once, with how many queues hold it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()
        self._bodies: dict[int, list] = {}  # id(body) -> [body, how many queued parts hold it]
        self._shared: dict[tuple[int, int], bytes] = {}  # (size, hash) -> a large body now held

    def share(self, data: bytes) -> bytes:
        """The body already held that equals `data`, if any (so the one copy is held), else `data`."""
        if len(data) < SHARED_SIZE or type(data) is not bytes:
            return data
        key = (len(data), hash(data))  # hashing a large body costs about a millisecond per MB, once
        with self._lock:
            held = self._shared.get(key)
        return held if held is not None and held == data else data

    def hold(self, body: bytes) -> None:
        with self._lock:
            entry = self._bodies.get(id(body))
            if entry is None:
                self._bodies[id(body)] = [body, 1]
                self.held += len(body)
                if len(body) >= SHARED_SIZE and type(body) is bytes:
                    self._shared.setdefault((len(body), hash(body)), body)
            else:
                entry[1] += 1

    def release(self, body: bytes) -> None:
        with self._lock:
            entry = self._bodies.get(id(body))
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                del self._bodies[id(body)]
                self.held -= len(body)
                if len(body) >= SHARED_SIZE and type(body) is bytes:
                    key = (len(body), hash(body))
                    if self._shared.get(key) is body:
                        del self._shared[key]

    @property
    def over(self) -> bool:
        return self.held > self.limit


class Outbox:
    """One connection's unsent bytes: written to by its request's thread (`sendall`, as gunicorn's Response
    writes to a socket), sent by the worker's loop (`flush`) once the socket stops taking them at once."""

    def __init__(self, sock: socket.socket, budget: SendBudget, timeout: float, wake: Callable[[], None]) -> None:
        self.sock = sock
        self.budget = budget
        self.timeout = timeout
        self.wake = wake  # asks the loop to watch this socket for writing (from the request's thread)
        self.parts: deque[tuple[memoryview, bytes]] = deque()  # (what is left of a write, the body it is of)
        self.queued = 0
        self.deadline = float("inf")  # the loop closes the connection when the client has taken nothing by then
        self.closed = False
        self.changed = threading.Condition()

    # -- the request's thread ----------------------------------------------------------------------------

    def sendall(self, data: bytes) -> None:
        """Send what the socket takes now, queue the rest for the loop; wait only where the bounds say so."""
        with self.changed:
            self._wait(lambda: self.queued <= PRODUCER_AHEAD)
            sent = 0
            first = not self.parts
            if first:
                sent = self._send(memoryview(data))
                if sent == len(data):
                    return
                self.deadline = time.monotonic() + self.timeout
            body = self.budget.share(data)
            view = memoryview(body)[sent:]
            self.parts.append((view, body))
            self.queued += len(view)
            self.budget.hold(body)
            if first:
                self.wake()  # after the append: the loop finds something to send
            if self.budget.over:
                self._wait(lambda: not self.parts)  # past the worker's budget: this thread waits, as in gthread

    def _wait(self, done: Callable[[], bool]) -> None:
        while not self.closed and not done():
            self.changed.wait(WAIT_STEP)
        if self.closed:
            raise BrokenPipeError(errno.EPIPE, "the client took nothing for server.send_timeout seconds")

    def _send(self, view: memoryview) -> int:
        """Bytes of `view` the socket took without blocking (OSError: the client is gone)."""
        sent = 0
        while sent < len(view):
            try:
                sent += self.sock.send(view[sent:], socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
        return sent

    # -- the worker's loop -------------------------------------------------------------------------------

    @property
    def pending(self) -> bool:
        return bool(self.parts)

    def flush(self) -> bool:
        """Send what the socket takes now; True once nothing is left (OSError: the client is gone)."""
        with self.changed:
            moved = False
            while self.parts:
                view, body = self.parts[0]
                sent = self._send(view)
                if sent:
                    moved = True
                    self.queued -= sent
                if sent < len(view):
                    self.parts[0] = (view[sent:], body)
                    break
                self.parts.popleft()
                self.budget.release(body)
            if moved:
                self.deadline = time.monotonic() + self.timeout
                self.changed.notify_all()
            return not self.parts

    def abort(self) -> int:
        """Drop what is left (the client stopped reading, or is gone) and fail the thread's next write; the
        bytes dropped."""
        with self.changed:
            dropped = self.queued
            for _, body in self.parts:
                self.budget.release(body)
            self.parts.clear()
            self.queued = 0
            self.closed = True
            self.changed.notify_all()
            return dropped
