"""The gunicorn worker of `gunicorn wsgi:app`: gthread, except that no thread waits for a slow client.

gunicorn's gthread worker gives a connection to a thread as soon as it is readable, and the thread then
blocks until the whole request head has arrived, with no deadline: a few hundred clients that send a byte a
second hold every thread, and cache hits queue behind them. Here the worker's main loop (its selector) reads
each head itself, without blocking, up to the blank line that ends it; only a complete head goes to the
thread pool, with the bytes already read. A head not complete `server.header_timeout` seconds after its first
chance to arrive (a new connection, or the next request on a kept-alive or pipelined one) closes the
connection. The thread reads the rest through a `DeadlineReader`: all reads of one request end by
`server.body_timeout` seconds after its head was parsed, however slowly the body trickles; of a body the app
left unread (a 401 before reading it, say), the thread drains only what has already arrived, never waiting.
(A body the app does read still holds its thread while it arrives, up to body_timeout.)

gthread's threads also write each answer themselves, blocking until the client has read it, and a request
waiting on an identical one in flight holds its thread too: a few hundred clients that never read, or a fan-out
of identical requests, hold every thread. Here the loop holds such connections without a thread (see
buddy.worker_held): the rest of an answer its client has not taken, closed after `server.send_timeout` seconds
without progress; and a parked request (buddy.parking), run again once the fill it follows is announced.

gthread also closes each finished connection in its main loop, waiting up to 2 s for the client to close
first (RFC 9112 9.6): a client that never closes stalls every connection of the worker for 2 s. Here that
lingering close is one more thing the loop watches, without blocking.

Stopping: on SIGTERM (`systemctl stop`, `kill`) the worker stops accepting, closes at once the connections that
carry no request (a head still arriving, a lingering close: nothing to answer there), lets the requests in
flight finish within gunicorn's graceful_timeout, and exits; on SIGQUIT (the master's answer to Ctrl-C) it exits
at once, cutting requests in flight. Either way it then leaves without waiting for threads still busy with a
request (which would keep it alive until the master SIGKILLs it) and without tearing the interpreter down object
by object: the app's shutdown (counters flushed, the embedded Redis left) and the logs' flush are all it does.

Overridden from ThreadWorker: `enqueue_req` (every way into the thread pool: accept, keep-alive, pipelined
leftovers), `handle_request` (sets the body and drain deadlines), `finish_request` (the lingering close),
`murder_pending` (the loop's sweep of expired connections, also during graceful shutdown), `_keepalive_after` (a
parked request keeps its connection), `wait_for_and_dispatch_events` (wakes at the next deadline), `run` and
`handle_quit` (how it leaves); and gunicorn's Response class is replaced in the worker's process by one that
sends the app's own Date and writes through the connection's outbox (buddy.worker_wire).
Everything else (keep-alive, max_requests, graceful shutdown, worker_connections, which counts these connections
too) is gthread's own.
"""
from __future__ import annotations

import logging
import os
import re
import selectors
import socket
import time
from collections import deque
from concurrent.futures import Future
from functools import partial
from typing import Any, Callable, Optional

from gunicorn.http import wsgi
from gunicorn.workers.gthread import TConn, ThreadWorker

from buddy import parking
from buddy.outbox import Outbox, SendBudget
from buddy.settings import load_settings
from buddy.worker_held import PARKED, HeldConnections
from buddy.worker_wire import DatedResponse, DeadlineReader, handling, head_limit

READ_SIZE = 64 * 1024
#: Bytes of unfinished heads one worker holds at most; a head that would grow past it is refused (431).
HEAD_BUDGET = 32 * 1024 * 1024
#: A bare LF ends no head, and gunicorn's parser refuses it without reading more: no need to wait.
BARE_LF = re.compile(rb"(?<!\r)\n")
TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n"
             b"Content-Type: text/plain\r\nContent-Length: 32\r\n\r\nRequest Header Fields Too Large\n")
#: gunicorn's own bounds for a graceful close (util.close_graceful).
LINGER_SECONDS = 2.0
LINGER_BYTES = 64 * 1024

Action = Callable[[TConn], None]


class DeadlineWorker(HeldConnections, ThreadWorker):
    """gthread whose main loop reads request heads and closes connections: `buddy.worker.DeadlineWorker`."""

    def init_process(self) -> None:
        # The settings the app loads in this same process (BUDDY_CONFIG, then the environment): gunicorn's cfg
        # knows none of these.
        server = load_settings().server
        self.header_timeout: float = server.header_timeout
        self.body_timeout: float = server.body_timeout
        self.send_timeout: float = server.send_timeout
        self.send_budget = SendBudget(server.send_buffer)
        self.writing: dict[TConn, None] = {}  # connections whose answers the loop is sending
        self.parked: dict[TConn, float] = {}  # parked requests -> when to run them again at the latest (in order)
        self.head_limit = head_limit(self.cfg)
        self.head_bytes = 0
        self.heads: deque[TConn] = deque()  # reading a head; deadlines in order, as they are now + a constant
        self.closing: deque[TConn] = deque()  # half-closed, waiting for the client to close
        # TLS, the PROXY protocol and HTTP/2 prior knowledge start with bytes that are not an HTTP/1 head:
        # with those on, connections go to a thread at once, as in gthread.
        self.reads_heads = (not self.cfg.is_ssl and getattr(self.cfg, "proxy_protocol", "off") in ("off", False)
                            and getattr(self.cfg, "http2_cleartext", None) not in ("prior-knowledge", "both"))
        wsgi.Response = DatedResponse  # type: ignore[misc]  # what gthread's handle_request makes (wsgi.create)
        super().init_process()  # ends in run(), which returns once the worker is stopped (in flight answered)
        self._leave()  # a worker that booted and stopped: nothing else to wait for

    # -- overrides -------------------------------------------------------------------------------------

    def enqueue_req(self, conn: TConn) -> None:
        """Every way into the thread pool comes here: first the whole head, read by this loop."""
        if getattr(conn, "head_done", False) or not self.reads_heads:
            conn.head_done = False  # the next request on this connection starts with its head again
            super().enqueue_req(conn)
            return
        pending = conn.parser.unreader.take_buffered() if conn.parser is not None else b""  # pipelined
        conn.head = bytearray(pending)
        conn.deadline = time.monotonic() + self.header_timeout
        self.head_bytes += len(pending)
        conn.sock.setblocking(False)
        action = self._read_head(conn)
        if action is not None:
            action(conn)
        else:
            self._watch(self.heads, conn, self._on_head_readable)

    def handle_request(self, req: Any, conn: TConn) -> bool:
        """The head is parsed: its body must arrive by the body deadline, and of what the app left unread, the
        drain after it takes only what has arrived."""
        reader = getattr(getattr(conn.parser, "unreader", None), "sock", None)
        if not isinstance(reader, DeadlineReader):
            return super().handle_request(req, conn)
        reader.deadline = time.monotonic() + self.body_timeout
        if getattr(conn, "outbox", None) is None:
            conn.outbox = Outbox(conn.sock, self.send_budget, self.send_timeout,
                                 partial(self.method_queue.defer, self._start_writing, conn))
        handling.conn = conn
        try:
            with parking.running(parkable=self.alive, resumed=conn.__dict__.pop("parked", None)):
                keepalive = super().handle_request(req, conn)
        except parking.Parked as parked:  # no answer yet: the loop keeps the connection (see _park)
            conn.parked, conn.parked_request = parked, req
            return PARKED  # type: ignore[return-value]
        finally:
            handling.conn = None
        # gthread then drains a body the app left unread (a 401 before reading it, say) to keep the connection.
        # Only what has arrived already: a client still sending it is closed instead (by this loop, see _linger).
        reader.deadline = time.monotonic()
        return keepalive

    def _keepalive_after(self, conn: TConn, keepalive: Any) -> Any:
        return PARKED if keepalive is PARKED else super()._keepalive_after(conn, keepalive)

    def finish_request(self, conn: TConn, fs: Future) -> None:
        if not fs.cancelled() and fs.exception() is None and fs.result() is PARKED:
            self._park(conn)
            return
        outbox: Outbox | None = getattr(conn, "outbox", None)
        if outbox is not None and outbox.closed:  # closed by this loop while its thread was still writing
            self.nr_conns -= 1
            conn.close()
            return
        if outbox is not None and outbox.pending:  # the rest of its answer first: then this, from _on_writable
            conn.finished = fs
            self._start_writing(conn)
            return
        if not fs.cancelled() and fs.exception() is None and not fs.result():
            self._linger(conn)  # gthread would close it gracefully here, blocking this loop up to 2 s
        else:
            super().finish_request(conn, fs)

    def murder_pending(self) -> None:
        """gthread's sweep of idle connections, plus heads and closes past their deadline (all of them once the
        worker is stopping: none carries a request to finish), and clients that stopped reading their answers."""
        super().murder_pending()
        now = time.monotonic() if self.alive else float("inf")  # stopping: every parked request runs now
        while self.parked and next(iter(self.parked.values())) <= now:
            self._resume(next(iter(self.parked)))
        now = time.monotonic()
        for conn in [conn for conn in self.writing if conn.outbox.deadline <= now]:
            self.log.debug("closing %s: it took nothing of its answer in %g s", conn.client, self.send_timeout)
            self._stop_writing(conn)
        now = time.monotonic() if self.alive else float("inf")
        for queue in (self.heads, self.closing):
            while queue and queue[0].deadline <= now:
                conn = queue.popleft()
                self.poller.unregister(conn.sock)
                if queue is self.heads:
                    self.log.debug("closing %s: no whole request head in %g s", conn.client, self.header_timeout)
                self._close(conn)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        for queue in (self.heads, self.closing):  # wake at the next deadline, not up to a second after it
            if queue:
                timeout = min(timeout, max(0.0, queue[0].deadline - time.monotonic()))
        if self.parked:
            timeout = min(timeout, max(0.0, next(iter(self.parked.values())) - time.monotonic()))
        super().wait_for_and_dispatch_events(timeout)

    def handle_quit(self, sig: int, frame: Any) -> None:
        """SIGQUIT, which the master sends on Ctrl-C: leave now."""
        self.alive = False
        self.cfg.worker_int(self)
        self._leave()

    def _leave(self) -> None:
        """Exit now, as gunicorn's own exit path would say (its log line), once the app is shut down."""
        from buddy.lifecycle import close_all  # the app's package, loaded in this worker by now

        self.log.info("Worker exiting (pid: %s)", self.pid)
        try:
            close_all()  # every app of this process: threads stopped, counters flushed, embedded Redis left
        finally:
            self.tmp.close()
            logging.shutdown()
            os._exit(0)

    # -- reading heads ---------------------------------------------------------------------------------

    def _read_head(self, conn: TConn) -> Optional[Action]:
        """Read what the client has sent, without blocking; None while the head is incomplete."""
        head: bytearray = conn.head
        scanned = 0
        while True:
            if head.find(b"\r\n\r\n", max(0, scanned - 3)) >= 0 or BARE_LF.search(head, max(0, scanned - 1)):
                return self._hand_off  # complete, or one the parser refuses without another read
            if len(head) > self.head_limit or (head and self.head_bytes > HEAD_BUDGET):
                return self._refuse  # gunicorn would refuse it too, or unfinished heads fill the budget
            scanned = len(head)
            try:
                chunk = conn.sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError:
                return self._close
            if not chunk:  # the client left, between requests or mid-head: nothing to answer
                return self._close
            head += chunk
            self.head_bytes += len(chunk)

    def _on_head_readable(self, conn: TConn, _sock: Any) -> None:
        action = self._read_head(conn)
        if action is not None:
            self._unwatch(self.heads, conn)
            action(conn)

    def _hand_off(self, conn: TConn) -> None:
        """To the thread pool, the head's bytes in the parser's buffer, the parser reading under a deadline."""
        head = self._forget_head(conn)
        conn.init()  # plain HTTP/1 here: only makes the parser, once per connection; no I/O
        unreader = conn.parser.unreader
        if isinstance(unreader.sock, DeadlineReader):
            unreader.sock.deadline = conn.deadline
        else:
            unreader.sock = DeadlineReader(conn.sock, conn.deadline)
        unreader.unread(head)
        conn.head_done = True
        self.enqueue_req(conn)

    def _refuse(self, conn: TConn) -> None:
        self._forget_head(conn)
        try:
            conn.sock.send(TOO_LARGE)
        except OSError:
            pass
        self._linger(conn)

    def _forget_head(self, conn: TConn) -> bytes:
        head = bytes(getattr(conn, "head", None) or b"")
        self.head_bytes -= len(head)
        conn.head = None
        return head

    # -- closing ---------------------------------------------------------------------------------------

    def _linger(self, conn: TConn) -> None:
        """Half-close, discard what the client still sends, close when it does (or after LINGER_SECONDS)."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
            conn.sock.setblocking(False)
        except OSError:
            self._close(conn)
            return
        conn.deadline = time.monotonic() + LINGER_SECONDS
        conn.drained = 0
        if self._drain(conn) or not self.alive:  # stopping: what the client sent already is drained, no waiting
            self._close(conn)
        else:
            self._watch(self.closing, conn, self._on_closing_readable)

    def _drain(self, conn: TConn) -> bool:
        """True once the client has closed (or sent too much, or failed)."""
        while conn.drained < LINGER_BYTES:
            try:
                data = conn.sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                return True
            if not data:
                return True
            conn.drained += len(data)
        return True

    def _on_closing_readable(self, conn: TConn, _sock: Any) -> None:
        if self._drain(conn):
            self._unwatch(self.closing, conn)
            self._close(conn)

    def _close(self, conn: TConn) -> None:
        self._forget_head(conn)
        self.nr_conns -= 1
        conn.close()

    # -- the selector ----------------------------------------------------------------------------------

    def _watch(self, queue: deque, conn: TConn, callback: Callable[[TConn, Any], None]) -> None:
        queue.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(callback, conn))

    def _unwatch(self, queue: deque, conn: TConn) -> None:
        self.poller.unregister(conn.sock)
        queue.remove(conn)
