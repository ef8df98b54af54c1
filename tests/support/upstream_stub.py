"""A counting upstream on 127.0.0.1: every request it receives is logged with its start time, headers and body.

The start time is when the kernel received the request's first byte (SO_TIMESTAMPNS, read with MSG_PEEK before
the request is parsed): the upstream's own clock, which a busy machine cannot shift by delaying this stub's
threads. (Where the kernel gives no timestamp, the time that first byte could be read, still before parsing.)

Routes (anything else echoes the request as JSON):
  /status/<code>      answers with that status
  /slow/<ms>          sleeps, then echoes
  /cookie             sets a cookie
  /gzip               a gzip-encoded JSON body (Content-Encoding: gzip)
  /looks-gzip         gzip bytes served as application/gzip with no Content-Encoding
  /big/<n>            n bytes of body
  /noise/<n>          n bytes that do not compress (the same for the same n), as application/octet-stream
  /redirect           302 to /target on this same server
  /negotiate          answers by the request's Accept (JSON when it names application/json, else HTML), and
                      shows the Accept-Language and Content-Type it received (null when absent)
Any route also takes `?sleep=<ms>`: the stub waits that long before it answers; /status also takes
`?retry_after=<value>`, sent back as its Retry-After header.
The echo (and any route) also takes, repeatable:
  `?h=<Name>:<value>`   an extra response header; the value is percent-decoded byte for byte
                      (`h=Retry-After:%C2%B2` sends the two UTF-8 bytes of a superscript two)
  `?echo=<Name>`        the echo body gets `"echo": {"<Name>": <value received, or null>}`
A stub made with `UpstreamStub(name="B")` adds `"upstream": "B"` to its echo and sends `X-Upstream-Name: B`.
"""
from __future__ import annotations

import gzip
import json
import random
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux's value; also the control message's type
WORDS = "dog cat animal pet mammal wolf bark tail fur loyal house garden run play food bone puppy leash".split()


def conceptnet_json(seed: int | str, node_id: str) -> bytes:
    """About 2 KB of ConceptNet-shaped JSON, the same for the same seed (benches and memory tests)."""
    rng = random.Random(seed)
    edges = [{"@id": f"/a/[/r/{rel}/,/c/en/{a}/,/c/en/{b}/]", "rel": {"@id": f"/r/{rel}", "label": rel},
              "start": {"@id": f"/c/en/{a}", "label": a}, "end": {"@id": f"/c/en/{b}", "label": b},
              "weight": round(rng.uniform(0.1, 12), 3), "surfaceText": f"[[{a}]] is related to [[{b}]]"}
             for a, b, rel in ((rng.choice(WORDS), rng.choice(WORDS), rng.choice(["IsA", "HasA", "UsedFor"]))
                               for _ in range(9))]
    return json.dumps({"@id": node_id, "edges": edges, "seed": rng.getrandbits(64)}).encode()


@dataclass
class Seen:
    """One request as the upstream saw it."""

    started: float
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    raw_headers: list[tuple[str, str]] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes; no 40 ms delayed-ACK stall
    server: "_Server"

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    def setup(self) -> None:
        super().setup()
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        except OSError:
            pass

    def handle_one_request(self) -> None:
        self.arrived = self._arrival()
        super().handle_one_request()

    def _arrival(self) -> float | None:
        """When the kernel received the next request's first byte; without a kernel timestamp, the time that byte
        could first be read (before the request line is parsed); None for a connection that closed. The proxy
        never pipelines, so nothing of the next request is buffered in rfile yet."""
        try:
            data, ancillary, _, _ = self.connection.recvmsg(1, socket.CMSG_SPACE(16), socket.MSG_PEEK)
        except OSError:
            return None
        read_at = time.time()
        for level, kind, stamp in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(stamp) >= 16:
                seconds, nanoseconds = struct.unpack("qq", stamp[:16])
                return seconds + nanoseconds / 1e9
        return read_at if data else None

    def _handle(self) -> None:
        started = self.arrived or time.time()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        seen = Seen(started, self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body,
                    list(self.headers.items()))
        with self.server.lock:
            self.server.log.append(seen)
            count = len(self.server.log)
        self.server.stub.respond(self, seen, count)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # a burst of new proxy connections must not overflow the listen backlog
    log: list[Seen]
    lock: threading.Lock
    stub: "UpstreamStub"

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client (the proxy) that hangs up early is routine here, not worth a traceback."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class UpstreamStub:
    """Start with `UpstreamStub()`; `.url`, `.log` (list of Seen), `.paths()`, `.stop()`."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.log = []
        self.server.lock = threading.Lock()
        self.server.stub = self
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def log(self) -> list[Seen]:
        with self.server.lock:
            return list(self.server.log)

    def paths(self) -> list[str]:
        return [seen.path for seen in self.log]

    def count(self, path_prefix: str = "") -> int:
        return sum(1 for seen in self.log if seen.path.startswith(path_prefix))

    def clear(self) -> None:
        with self.server.lock:
            self.server.log.clear()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def respond(self, handler: _Handler, seen: Seen, count: int) -> None:
        path, _, query = seen.path.partition("?")
        parts = path.strip("/").split("/")
        sleep = dict(p.split("=", 1) for p in query.split("&") if p.startswith("sleep=")).get("sleep")
        if sleep:
            time.sleep(int(sleep) / 1000)
        headers: list[tuple[str, str]] = [("Content-Type", "application/json")]
        status = 200
        options = [p.split("=", 1) for p in query.split("&") if "=" in p]
        echo: dict[str, Any] = {
            "method": seen.method, "path": seen.path, "body": seen.body.decode("latin-1"), "n": count
        }
        echoed = [unquote(value) for key, value in options if key == "echo"]
        if echoed:
            echo["echo"] = {name: seen.headers.get(name.lower()) for name in echoed}
        extra: list[tuple[str, str]] = []  # sent after the route's own headers, whatever the route
        if self.name is not None:
            echo["upstream"] = self.name
            extra.append(("X-Upstream-Name", self.name))
        for key, value in options:
            if key == "h" and ":" in value:
                name, _, header_value = value.partition(":")
                extra.append((unquote(name), unquote(header_value, encoding="latin-1")))
        body = json.dumps(echo).encode()
        if parts[0] == "status" and len(parts) > 1:
            status = int(parts[1])
            body = json.dumps({"status": status, "n": count}).encode()
            retry_after = dict(p.split("=", 1) for p in query.split("&") if "=" in p).get("retry_after")
            if retry_after is not None:
                headers.append(("Retry-After", retry_after))
        elif parts[0] == "slow" and len(parts) > 1:
            time.sleep(int(parts[1]) / 1000)
        elif parts[0] == "cookie":
            headers += [("Set-Cookie", f"session=secret{count}; Path=/"), ("Set-Cookie", "other=1")]
        elif parts[0] == "gzip":
            body = gzip.compress(json.dumps({"compressed": True, "n": count}).encode())
            headers.append(("Content-Encoding", "gzip"))
        elif parts[0] == "looks-gzip":
            body = gzip.compress(b"this is a file that happens to be gzip")
            headers = [("Content-Type", "application/gzip")]
        elif parts[0] == "big" and len(parts) > 1:
            body = (b"0123456789abcdef" * (int(parts[1]) // 16 + 1))[: int(parts[1])]
            headers = [("Content-Type", "application/octet-stream")]
        elif parts[0] == "noise" and len(parts) > 1:
            body = random.Random(int(parts[1])).randbytes(int(parts[1]))
            headers = [("Content-Type", "application/octet-stream")]
        elif parts[0] == "negotiate":
            accept = seen.headers.get("accept") or ""
            found = {"accept": seen.headers.get("accept"), "lang": seen.headers.get("accept-language"),
                     "content_type": seen.headers.get("content-type"), "n": count}
            if "application/json" in accept:
                body = json.dumps({"format": "json", **found}).encode()
            else:
                body = f"<html><body>format=html {json.dumps(found)}</body></html>".encode()
                headers = [("Content-Type", "text/html; charset=utf-8")]
        elif parts[0] == "redirect":
            status = 302
            headers.append(("Location", f"{self.url}/target"))
        handler.send_response(status)
        for name, value in headers + extra:
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("X-Upstream-Count", str(count))
        handler.end_headers()
        if seen.method != "HEAD":
            handler.wfile.write(body)
