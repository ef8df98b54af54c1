"""Issue 10, item 1: slow clients cannot take every thread. Real gunicorn workers (buddy.worker via
gunicorn.conf.py), a real redis-server, raw sockets that trickle their heads and bodies."""
from __future__ import annotations

import select
import socket
import threading
import time
from typing import Any

import requests

from tests.support.upstream_stub import UpstreamStub

SMALL = ("--threads", "8")  # one worker with 8 threads: 8 stuck connections would starve it


def config(upstream: UpstreamStub, **server: Any) -> dict:
    return {"domain_mappings": {"up": {"upstream": upstream.url}}, "server": server}


def warm(base: str, path: str) -> None:
    """The first request waits for the worker to boot and stores the entry; the second is a hit."""
    assert requests.get(base + path, timeout=30).status_code == 200
    assert requests.get(base + path, timeout=10).headers["X-Cache"] == "HIT"


def head(port: int, path: str, *extra: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Trickle:
    """`count` connections that send `data` one byte every `interval` seconds from one thread."""

    def __init__(self, port: int, count: int, data: bytes, interval: float) -> None:
        self.socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]
        self.data, self.interval = data, interval
        self.sent = 0
        self.closed_by_server = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and self.sent < len(self.data):
            for sock in list(self.socks):
                try:
                    sock.send(self.data[self.sent:self.sent + 1])
                except OSError:
                    self.socks.remove(sock)
                    self.closed_by_server += 1
            self.sent += 1
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        for sock in self.socks:
            sock.close()


# A deadline that closes a connection is a feature about time, so these tests keep time bounds: exact below (the
# server cannot close before its deadline, counted from a moment after `since`) and generous above (several times
# the expected 1 to 1.2 s, so that a busy machine cannot fail them; no deadline at all would trickle for 20 s and more).
GENEROUS = 5.0


def closed_after(sock: socket.socket, trickle: bytes, interval: float, limit: float = 8,
                 since: float | None = None) -> tuple[float, bytes]:
    """Send `trickle` a byte every `interval` s until the server closes; (seconds it took from `since`, by default
    from now, bytes it sent back)."""
    started = time.monotonic() if since is None else since
    answer = b""
    for byte in trickle:
        if time.monotonic() - started > limit:
            break
        readable, _, _ = select.select([sock], [], [], interval)
        if readable:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return time.monotonic() - started, answer
            if not chunk:
                return time.monotonic() - started, answer
            answer += chunk
            continue
        try:
            sock.send(bytes([byte]))
        except OSError:  # reset: the server closed, and said so when our byte arrived
            return time.monotonic() - started, answer
    return float("inf"), answer


def read_response(stream: Any) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length from a buffered socket file."""
    status = int(stream.readline().split(b" ", 2)[1])
    headers = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, stream.read(int(headers.get("content-length", "0")))


def test_hits_keep_answering_while_400_connections_trickle_their_headers(gunicorn, redis_url, upstream) -> None:
    proxy = gunicorn(config(upstream, header_timeout=30), env={"REDIS_URL": redis_url}, workers=1, extra_args=SMALL)
    warm(proxy.url, "/up/hit")
    slow = Trickle(proxy.port, 400, head(proxy.port, "/up/slow", "X-Pad: " + "a" * 200), interval=0.5)
    try:
        time.sleep(1.5)  # every slow connection has been accepted and has sent a few bytes
        session = requests.Session()  # keep-alive hits, and new connections in between
        answers = []
        # Counted, not timed: 20 hits answered (a worker whose threads the trickles held would answer none before
        # header_timeout closed them, 30 s on), each within a generous bound, while all 400 stayed open.
        while len(answers) < 20:
            if len(answers) % 2:
                answers.append(session.get(f"{proxy.url}/up/hit", timeout=GENEROUS))
            else:
                answers.append(requests.get(f"{proxy.url}/up/hit", timeout=GENEROUS, headers={"Connection": "close"}))
        assert {(a.status_code, a.headers["X-Cache"]) for a in answers} == {(200, "HIT")}
        assert slow.closed_by_server == 0 and len(slow.socks) == 400  # they were really open all along
    finally:
        slow.stop()
    assert upstream.paths() == ["/hit"]  # no slow head ever became a request


def test_a_head_that_misses_header_timeout_is_closed_for_a_new_or_a_reused_connection(
    gunicorn, redis_url, upstream
) -> None:
    proxy = gunicorn(config(upstream, header_timeout=1), env={"REDIS_URL": redis_url}, workers=1, extra_args=SMALL)
    warm(proxy.url, "/up/a")
    request = head(proxy.port, "/up/a", "X-Pad: " + "a" * 100)  # 130 bytes: 26 s at a byte every 0.2 s
    idle_started = time.monotonic()  # header_timeout counts from the accept, after this
    idle = socket.create_connection(("127.0.0.1", proxy.port))  # connects and says nothing
    connecting = time.monotonic()
    with socket.create_connection(("127.0.0.1", proxy.port)) as new:
        took, answer = closed_after(new, request, interval=0.2, since=connecting)
    assert answer == b"" and 1.0 <= took < GENEROUS, (took, answer)
    readable, _, _ = select.select([idle], [], [], 8)
    assert readable and idle.recv(1) == b""
    assert 1.0 <= time.monotonic() - idle_started < GENEROUS
    idle.close()
    with socket.create_connection(("127.0.0.1", proxy.port)) as reused:
        reused.sendall(request)  # a whole request first: the next one on this connection trickles
        status, _, _ = read_response(reused.makefile("rb"))
        assert status == 200
        # from the next request's first byte, sent after this call begins
        took, answer = closed_after(reused, request, interval=0.2)
    assert answer == b"" and 1.0 <= took < GENEROUS, (took, answer)
    assert requests.get(f"{proxy.url}/up/a", timeout=5).headers["X-Cache"] == "HIT"


def test_a_body_that_misses_body_timeout_gets_400_and_never_reaches_the_upstream(gunicorn, redis_url, upstream) -> None:
    proxy = gunicorn(config(upstream, body_timeout=1), env={"REDIS_URL": redis_url}, workers=1, extra_args=SMALL)
    warm(proxy.url, "/up/warm")
    host = f"Host: 127.0.0.1:{proxy.port}\r\n"
    framings = {
        "content-length": (b"POST /up/post HTTP/1.1\r\n" + host.encode() + b"Content-Length: 100\r\n\r\n", b"x" * 100),
        "chunked": (b"POST /up/post HTTP/1.1\r\n" + host.encode() + b"Transfer-Encoding: chunked\r\n\r\n",
                    b"".join(b"1\r\nx\r\n" for _ in range(20)) + b"0\r\n\r\n"),
    }
    for name, (request_head, body) in framings.items():
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sending = time.monotonic()  # body_timeout counts from when the head was parsed, after this
            sock.sendall(request_head)
            took, answer = closed_after(sock, body, interval=0.3, since=sending)
        # each byte alone arrives well inside body_timeout; the whole body (30 s and more) cannot
        assert 1.0 <= took < GENEROUS, (name, took, answer[:200])
        assert answer == b"" or answer.startswith(b"HTTP/1.1 400"), (name, answer[:200])
    assert upstream.paths() == ["/warm"]  # no part of a late body was sent anywhere
    fast = requests.post(f"{proxy.url}/up/post", data=b"x" * 100, timeout=5)
    assert fast.status_code == 200 and fast.json()["body"] == "x" * 100


def test_clients_that_never_close_do_not_stall_the_worker(gunicorn, redis_url, upstream) -> None:
    """gthread closes a finished connection in its main loop, waiting up to 2 s for the client to close too."""
    proxy = gunicorn(config(upstream), env={"REDIS_URL": redis_url}, workers=1, extra_args=SMALL)
    warm(proxy.url, "/up/hit")
    # The Accept that `warm` (requests) sent, which is part of the key: these are hits too, not 20 misses waiting
    # on one leader (where the worker's cap on waiters may answer stubborn[0] with a 429).
    request = head(proxy.port, "/up/hit", "Accept: */*", "Connection: close")
    stubborn = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(20)]
    try:
        for sock in stubborn:
            sock.sendall(request)  # answered, then never read and never closed
        time.sleep(0.5)
        hits = [requests.get(f"{proxy.url}/up/hit", timeout=1, headers={"Connection": "close"}) for _ in range(10)]
        assert {(r.status_code, r.headers["X-Cache"]) for r in hits} == {(200, "HIT")}
        stubborn[0].settimeout(5)
        answer = stubborn[0].recv(65536)
        assert answer.startswith(b"HTTP/1.1 200") and b"X-Cache: HIT" in answer  # answered all the same
    finally:
        for sock in stubborn:
            sock.close()


def test_keep_alive_pipelined_split_and_odd_but_valid_requests_still_work(gunicorn, redis_url, upstream) -> None:
    proxy = gunicorn(config(upstream, header_timeout=10), env={"REDIS_URL": redis_url}, workers=1, extra_args=SMALL)
    warm(proxy.url, "/up/k")
    port = proxy.port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        stream = sock.makefile("rb")
        for _ in range(3):  # keep-alive: one request after another on one connection
            sock.sendall(head(port, "/up/k"))
            assert read_response(stream)[0] == 200
        # pipelined: three requests (one with a body) in one write, three answers in order
        post = (f"POST /up/p HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 5\r\n\r\nhello").encode()
        sock.sendall(head(port, "/up/k?n=1") + post + head(port, "/up/k?n=2"))
        answers = [read_response(stream) for _ in range(3)]
        assert [a[0] for a in answers] == [200, 200, 200]
        assert b'"body": "hello"' in answers[1][2] and b"n=2" in answers[2][2]
        # a head split over several writes, each pause well inside header_timeout, and a leading empty line
        for piece in (b"\r\nGET /up/k?n=3 HT", b"TP/1.1\r\nHost: 127.0.0.1", f":{port}\r\n\r".encode(), b"\n"):
            sock.sendall(piece)
            time.sleep(0.3)
        assert read_response(stream)[0] == 200
        # a head and part of the next one in one write, the rest later
        sock.sendall(head(port, "/up/k?n=4") + b"GET /up/k?n=5 HTTP/1.1\r\n")
        assert read_response(stream)[0] == 200
        time.sleep(0.3)
        sock.sendall(f"Host: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        status, headers, _ = read_response(stream)
        assert status == 200 and headers.get("connection") == "close"
        assert sock.recv(1) == b""
        stream.close()  # the socket really closes only once its file is closed too
    # Invalid heads are still refused at once, not after header_timeout: the answer says so (a head that misses its
    # deadline is closed without a word), and it comes long before the 10 s deadline (a generous bound: at once
    # means milliseconds).
    with socket.create_connection(("127.0.0.1", port), timeout=8) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /up/k HTTP/1.1\nHost: x\n")  # bare LF: never a complete head by CRLF
        assert sock.recv(100).startswith(b"HTTP/1.1 400") and time.monotonic() - started < GENEROUS
    with socket.create_connection(("127.0.0.1", port), timeout=8) as sock:
        started = time.monotonic()  # more header bytes than gunicorn accepts (100 fields), no end in sight
        sock.sendall(b"GET /up/k HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 8000) for i in range(110)))
        assert sock.recv(100).startswith(b"HTTP/1.1 431") and time.monotonic() - started < GENEROUS
    assert [p for p in upstream.paths() if p.startswith("/p")] == ["/p"]


# -- clients that read their answers slowly, or never (issue 22, item 2) -----------------------------------------

BIG = 8 * 1024 * 1024  # more than the kernel buffers hold (Linux: up to 4 MB sending, 4 KB here receiving)


def big_body(size: int) -> bytes:
    """The upstream stub's /big/<size> body."""
    return (b"0123456789abcdef" * (size // 16 + 1))[:size]


def slow_reader(port: int, request: bytes) -> socket.socket:
    """A client with a small receive buffer that sends `request` and then reads only when told."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(request)
    return sock


def read_all(sock: socket.socket, limit: float, pause: float = 0.0, size: int = 65536) -> tuple[bytes, bool]:
    """Everything the server sends until it closes, read `size` bytes at a time with `pause` between reads;
    (bytes, True if the server closed before `limit` seconds)."""
    got = bytearray()
    deadline = time.monotonic() + limit
    sock.settimeout(1)
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(size)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return bytes(got), True
        if not chunk:
            return bytes(got), True
        got += chunk
        time.sleep(pause)
    return bytes(got), False


def test_clients_that_never_read_a_large_answer_hold_no_thread_and_are_closed_after_send_timeout(
    gunicorn, redis_url, upstream
) -> None:
    proxy = gunicorn(config(upstream, send_timeout=2), env={"REDIS_URL": redis_url}, workers=1,
                     extra_args=("--threads", "4"))
    warm(proxy.url, "/up/hit")
    warm(proxy.url, f"/up/big/{BIG}")
    stalled = [slow_reader(proxy.port, head(proxy.port, f"/up/big/{BIG}", "Accept: */*")) for _ in range(12)]
    try:
        time.sleep(0.5)  # each of them has its answer, three times more of them than threads
        hits = [requests.get(f"{proxy.url}/up/hit", timeout=5, headers={"Connection": "close"}) for _ in range(10)]
        assert {(r.status_code, r.headers["X-Cache"]) for r in hits} == {(200, "HIT")}
        time.sleep(3)  # past send_timeout: each has taken nothing since its receive buffer filled
        for sock in stalled:
            got, closed = read_all(sock, limit=10)
            assert closed and got.startswith(b"HTTP/1.1 200") and len(got) < BIG  # cut short, then closed
    finally:
        for sock in stalled:
            sock.close()
    assert upstream.paths() == ["/hit", f"/big/{BIG}"]  # they were hits


def test_a_slow_reader_gets_every_byte_of_each_pipelined_answer_and_its_connection_stays_usable(
    gunicorn, redis_url, upstream
) -> None:
    # Over max_cache_response_size, /big/3145728 streams from the upstream as the client reads; /big/2097152 is a
    # cached answer left to the worker's loop; one thread, busy with neither while the client dawdles.
    cached, streamed = 2 * 1024 * 1024, 3 * 1024 * 1024
    proxy = gunicorn({**config(upstream), "cache": {"max_cache_response_size": cached}}, env={"REDIS_URL": redis_url},
                     workers=1, extra_args=("--threads", "2"))
    warm(proxy.url, "/up/hit")
    warm(proxy.url, f"/up/big/{cached}")
    sock = slow_reader(proxy.port, head(proxy.port, f"/up/big/{cached}", "Accept: */*")
                       + head(proxy.port, f"/up/big/{streamed}", "Accept: */*"))
    try:
        time.sleep(0.3)
        hit = requests.get(f"{proxy.url}/up/hit", timeout=5, headers={"Connection": "close"})
        assert hit.headers["X-Cache"] == "HIT"
        stream = sock.makefile("rb")
        sock.settimeout(30)
        answers = []
        for _ in range(2):
            status, headers, body = read_response(stream)
            answers.append((status, headers["x-cache"], body))
            time.sleep(0.2)
        assert answers == [(200, "HIT", big_body(cached)), (200, "MISS", big_body(streamed))]
        sock.sendall(head(proxy.port, "/up/hit", "Accept: */*"))  # the same connection, kept alive
        status, headers, body = read_response(stream)
        assert (status, headers["x-cache"]) == (200, "HIT") and body == hit.content
    finally:
        sock.close()
