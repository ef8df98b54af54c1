"""Connections the worker's loop holds while no thread works on them (buddy.worker's DeadlineWorker mixes this in).

- An answer a slow client has not taken yet: its thread wrote it to the connection's outbox (buddy.outbox) and
  went back to the pool; the loop sends the rest as the socket takes it, and drops a client that takes nothing
  for `server.send_timeout` seconds. The connection's next step (keep-alive, the next pipelined request, the
  close: `finish_request`) waits until the answer has gone.
- A parked request (buddy.parking): it waits on an identical one in flight, with no thread, until the fill is
  announced (or PARK_SECONDS pass), then runs again on a thread; a client that hangs up meanwhile is closed.
"""
from __future__ import annotations

import errno
import selectors
import socket
import time
from concurrent.futures import Future
from functools import partial
from typing import Any, Callable

from gunicorn.http import errors as http_errors
from gunicorn.workers.gthread import TConn

#: A parked request runs again at least this often (a leader that died announces nothing; its lock expires).
PARK_SECONDS = 1.0
PARKED = object()  # a thread's answer for a request it parked: its connection waits in the loop


class HeldConnections:
    """The loop's side of slow readers and parked requests, for a gthread worker (see the module's docstring)."""

    # The worker's, as gthread makes them (and DeadlineWorker.init_process, for the first two).
    writing: dict[TConn, None]  # connections whose answers the loop is sending
    parked: dict[TConn, float]  # parked requests -> when to run them again at the latest, in that order
    poller: selectors.BaseSelector
    method_queue: Any
    tpool: Any
    nr_conns: int
    log: Any
    finish_request: Callable[[TConn, Future], None]
    handle_request: Callable[[Any, TConn], Any]
    handle_error: Callable[..., None]
    _keepalive_after: Callable[[TConn, Any], Any]

    # -- writing answers to slow readers -----------------------------------------------------------------

    def _start_writing(self, conn: TConn) -> None:
        """The thread left bytes in the outbox (it asks through the method queue): send them as the client reads."""
        if conn in self.writing or conn.outbox.closed or not conn.outbox.pending:
            return
        self.writing[conn] = None
        self.poller.register(conn.sock, selectors.EVENT_WRITE, partial(self._on_writable, conn))

    def _on_writable(self, conn: TConn, _sock: Any) -> None:
        try:
            done = conn.outbox.flush()
        except OSError:  # the client is gone
            self._stop_writing(conn)
            return
        if done:
            self.poller.unregister(conn.sock)
            del self.writing[conn]
            fs = conn.__dict__.pop("finished", None)
            if fs is not None:  # its thread is done too: on to keep-alive, the next request, or the close
                self.finish_request(conn, fs)

    def _stop_writing(self, conn: TConn) -> None:
        """The client stopped reading (or left): drop the rest, close the connection once its thread is done."""
        conn.outbox.abort()
        self.poller.unregister(conn.sock)
        del self.writing[conn]
        if conn.__dict__.pop("finished", None) is not None:
            self.nr_conns -= 1
            conn.close()
        else:  # its thread still writes (a stream): its next write fails, then finish_request closes it
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- parked requests (buddy.parking) ------------------------------------------------------------------

    def _park(self, conn: TConn) -> None:
        """Keep the connection, no thread, until the fill its request follows is announced (or PARK_SECONDS)."""
        self.parked[conn] = time.monotonic() + PARK_SECONDS
        conn.parked.watch(partial(self.method_queue.defer, self._resume, conn))
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_parked_readable, conn))
        conn.watched = True

    def _on_parked_readable(self, conn: TConn, _sock: Any) -> None:
        """The client of a parked request hung up (then it is closed), or sent its next request (read later)."""
        try:
            gone = conn.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            gone = True
        if gone:
            self._unpark(conn)
            conn.__dict__.pop("parked", None)
            self.nr_conns -= 1
            conn.close()
        else:  # pipelined: it waits in the socket until this answer has gone
            self.poller.unregister(conn.sock)
            conn.watched = False

    def _unpark(self, conn: TConn) -> None:
        self.parked.pop(conn, None)
        conn.parked.unwatch()
        if conn.__dict__.pop("watched", False):
            self.poller.unregister(conn.sock)

    def _resume(self, conn: TConn) -> None:
        """Run a parked request again, on a thread (once, however many wake-ups asked)."""
        if conn not in self.parked:
            return
        self._unpark(conn)
        fs = self.tpool.submit(self._handle_again, conn)
        fs.add_done_callback(lambda fut: self.method_queue.defer(self.finish_request, conn, fut))

    def _handle_again(self, conn: TConn) -> Any:
        """gthread's `handle` for a request already read: the parked one."""
        req = conn.__dict__.pop("parked_request")
        try:
            conn.sock.setblocking(True)
            return self._keepalive_after(conn, self.handle_request(req, conn))
        except (StopIteration, http_errors.NoMoreData):
            pass
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                self.log.exception("Socket error processing request.")
        except Exception as exc:
            self.handle_error(req, conn.sock, conn.client, exc)
        return False
