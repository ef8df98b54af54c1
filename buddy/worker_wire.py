"""What the worker's threads read requests from and write answers to (buddy.worker).

`DeadlineReader`: the client's socket, every read of one request ending by one deadline. `DatedResponse`:
gunicorn's Response, sending the app's own Date and writing through the connection's outbox (buddy.outbox), which
the thread handling a request names in `handling.conn`.
"""
from __future__ import annotations

import socket
import threading
import time
from typing import Any

from gunicorn.http import wsgi
from gunicorn.http.message import DEFAULT_MAX_HEADERFIELD_SIZE, MAX_HEADERS, MAX_REQUEST_LINE

from buddy.outbox import Outbox

handling = threading.local()  # .conn: the connection whose request this thread is answering


class DeadlineReader:
    """What the request parser reads from: the client's socket, with every read ending by one deadline."""

    __slots__ = ("sock", "deadline")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline

    def recv(self, size: int) -> bytes:
        prior = self.sock.gettimeout()
        # Past the deadline, a timeout of 0: what has arrived already, never a wait.
        self.sock.settimeout(max(0.0, self.deadline - time.monotonic()))
        try:
            return self.sock.recv(size)
        except BlockingIOError:
            raise socket.timeout("the client did not send the request in time") from None
        finally:
            self.sock.settimeout(prior)


def head_limit(cfg: Any) -> int:
    """The most head bytes gunicorn's own parser reads before refusing: request line plus header fields."""
    line = cfg.limit_request_line if 0 < cfg.limit_request_line < MAX_REQUEST_LINE else MAX_REQUEST_LINE
    fields = cfg.limit_request_fields if 0 < cfg.limit_request_fields <= MAX_HEADERS else MAX_HEADERS
    size = cfg.limit_request_field_size if cfg.limit_request_field_size > 0 else DEFAULT_MAX_HEADERFIELD_SIZE
    return line + 2 + fields * (size + 2) + 4


class DatedResponse(wsgi.Response):
    """gunicorn's response, except that a Date the app sends is the one sent: a stored answer keeps its own Date
    (RFC 9111 4.2.3; gunicorn drops an application's Date and sends the time of sending)."""

    app_date: str | None = None

    def __init__(self, req: Any, sock: socket.socket, cfg: Any) -> None:
        super().__init__(req, sock, cfg)
        conn = getattr(handling, "conn", None)
        if conn is not None and conn.sock is sock and conn.outbox is not None:
            self.sock = conn.outbox  # what the client does not take at once, the worker's loop sends

    def sendfile(self, respiter: Any) -> bool:
        # Straight to the socket, a file would overtake bytes still in the outbox: gunicorn then writes it in parts.
        return not isinstance(self.sock, Outbox) and bool(super().sendfile(respiter))

    def process_headers(self, headers: list[tuple[str, str]]) -> None:
        dated = [value for name, value in headers if name.lower() == "date"]
        super().process_headers([(name, value) for name, value in headers if name.lower() != "date"])
        if dated and wsgi.HEADER_VALUE_RE.fullmatch(dated[-1]):
            self.app_date = dated[-1].strip(" \t")

    def default_headers(self) -> list[str]:
        headers: list[str] = super().default_headers()
        if self.app_date is not None:
            headers = [f"Date: {self.app_date}\r\n" if line.startswith("Date: ") else line for line in headers]
        return headers
