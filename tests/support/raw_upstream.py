"""A raw-socket upstream on 127.0.0.1 for byte-level misbehaviour the http.server stub cannot produce.

`RawUpstream(routes)`: `routes` maps a path prefix (longest match wins) to `script(request, count)`, which
returns the steps of the answer, played in order on the connection:
  bytes                 sent as they are (build them with `head()`, `chunk()`, `LAST_CHUNK`)
  float / int           a pause of that many seconds
  RESET                 the connection is aborted with a TCP reset instead of a clean close
After the last step the connection is closed (one request per connection). A request that matches no
route gets a small 404. Every request is logged (`.log`, `.count(prefix)`, `.clear()`) before its answer starts.
"""
from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Union

RESET = object()
LAST_CHUNK = b"0\r\n\r\n"
Step = Union[bytes, float, int, object]


@dataclass
class RawRequest:
    """One request as the raw upstream read it."""

    started: float
    method: str
    target: str
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def path(self) -> str:
        return self.target


Script = Callable[[RawRequest, int], Iterable[Step]]


def head(status: str = "200 OK", headers: Iterable[tuple[str, str]] = (), close: bool = True) -> bytes:
    """A status line and headers, latin-1 encoded; `close` adds `Connection: close`."""
    lines = [f"HTTP/1.1 {status}", *(f"{name}: {value}" for name, value in headers)]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


def pattern(size: int) -> bytes:
    """`size` bytes of a recognisable, position-dependent pattern."""
    block = b"".join(b"%08d|" % i for i in range(size // 9 + 1))
    return block[:size]


class RawUpstream:
    def __init__(self, routes: dict[str, Script]) -> None:
        self.routes = dict(routes)
        self._log: list[RawRequest] = []
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._stopping = threading.Event()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    @property
    def log(self) -> list[RawRequest]:
        with self._lock:
            return list(self._log)

    def count(self, prefix: str = "") -> int:
        return sum(1 for seen in self.log if seen.target.startswith(prefix))

    def clear(self) -> None:
        """Forget the requests seen so far (one upstream shared by several tests); counts start again at 1."""
        with self._lock:
            self._log.clear()

    def stop(self) -> None:
        self._stopping.set()
        self._acceptor.join(5)
        self.listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:  # unblock handlers that are mid-script or mid-read
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in list(self._threads):
            thread.join(5)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.add(conn)
        reset = False
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(10)
            request = self._read_request(conn)
            if request is None:
                return
            with self._lock:
                self._log.append(request)
                count = len(self._log)
            script = self._route(request.target)
            steps: Iterable[Step] = (
                script(request, count) if script else [head("404 Not Found", [("Content-Length", "9")]), b"not found"]
            )
            for step in steps:
                if self._stopping.is_set():
                    break
                if step is RESET:
                    reset = True
                    break
                if isinstance(step, (bytes, bytearray)):
                    conn.sendall(step)
                else:
                    self._stopping.wait(float(step))  # type: ignore[arg-type]
        except OSError:
            pass  # the proxy hung up: routine
        finally:
            with self._lock:
                self._conns.discard(conn)
            try:
                if reset:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            conn.close()

    def _route(self, target: str) -> Script | None:
        path = target.split("?", 1)[0]
        matches = [prefix for prefix in self.routes if path.startswith(prefix)]
        return self.routes[max(matches, key=len)] if matches else None

    @staticmethod
    def _read_request(conn: socket.socket) -> RawRequest | None:
        data = b""
        while b"\r\n\r\n" not in data:
            part = conn.recv(65536)
            if not part:
                return None
            data += part
            if len(data) > 1_000_000:
                return None
        started = time.time()
        raw_head, _, rest = data.partition(b"\r\n\r\n")
        lines = raw_head.decode("latin-1").split("\r\n")
        method, target, _version = (lines[0].split(" ", 2) + ["", ""])[:3]
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length") or 0)
        while len(rest) < length:
            part = conn.recv(65536)
            if not part:
                break
            rest += part
        return RawRequest(started, method, target, headers, rest[:length])
