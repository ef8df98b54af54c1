"""What goes over the wire to and from an upstream, through a real gunicorn worker: the path as received, a kept-alive
connection the upstream closes as it is reused, an answer framed two ways, a request body in a coding the proxy
does not take. Verdicts from the upstreams' own logs and the bytes each client got."""
from __future__ import annotations

import socket
import threading
from typing import Iterator

import pytest
import requests

from tests.support.processes import Gunicorn, RedisServer, SharedProxy
from tests.support.raw_upstream import LAST_CHUNK, RawUpstream, chunk, head
from tests.support.upstream_stub import UpstreamStub

pytestmark = pytest.mark.xdist_group("upstream-wire-proxy")


class ClosesKeptAlive:
    """An upstream that answers the first request of a connection and keeps it alive, then closes it when the next
    request on it arrives, without a byte of answer: what a keep-alive timeout looks like when it fires just as the
    proxy reuses the connection. Its log holds every request it read: (connection number, method, target)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.log: list[tuple[int, str, str]] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self.listener.settimeout(0.05)
        number = 0
        while not self._stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            number += 1
            threading.Thread(target=self._serve, args=(conn, number), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        with conn:
            conn.settimeout(10)
            buffered = b""
            for answered in range(2):
                while b"\r\n\r\n" not in buffered:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffered += data
                head_bytes, _, buffered = buffered.partition(b"\r\n\r\n")
                method, target = head_bytes.split(b" ")[:2]
                length = next((int(line.split(b":")[1]) for line in head_bytes.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(buffered) < length:
                    buffered += conn.recv(65536)
                buffered = buffered[length:]
                self.log.append((number, method.decode(), target.decode()))
                if answered:
                    return  # the second request on a connection: closed, unanswered
                body = f"connection {number}".encode()
                conn.sendall(head("200 OK", [("Content-Length", str(len(body)))], close=False) + body)

    def stop(self) -> None:
        self._stopping.set()
        self.listener.close()
        self._thread.join(5)


def both_framings(request, count):  # type: ignore[no-untyped-def]
    return [head("200 OK", [("Content-Length", "5"), ("Transfer-Encoding", "chunked")]), chunk(b"hello"), LAST_CHUNK]


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[UpstreamStub, RawUpstream, ClosesKeptAlive]]:
    stub, raw, closer = UpstreamStub(), RawUpstream({"/framed-twice": both_framings}), ClosesKeptAlive()
    yield stub, raw, closer
    stub.stop()
    raw.stop()
    closer.stop()


@pytest.fixture(scope="module")
def shared(module_gunicorn, redis_server: RedisServer, upstreams) -> Gunicorn:
    stub, raw, closer = upstreams
    mappings = {"up": {"upstream": stub.url}, "raw": {"upstream": raw.url}, "ka": {"upstream": closer.url}}
    return module_gunicorn({"domain_mappings": mappings}, env={"REDIS_URL": redis_server.url}, workers=1)


@pytest.fixture
def proxy(shared: Gunicorn, redis_url: str, upstreams) -> SharedProxy:
    for upstream in upstreams[:2]:
        upstream.clear()
    return SharedProxy(shared)


def test_the_path_is_sent_and_keyed_as_received(proxy: SharedProxy, upstreams) -> None:
    """RFC 3986 2.2: an escaped reserved character is data; `a%3Bb` and `a;b` are different resources."""
    stub = upstreams[0]
    for sent in ("/up/x/a%3Bb", "/up/x/a;b", "/up/x/a%3Bb%3Dc%26d", "/up/x/a%3bb"):
        requests.get(proxy.url + sent, timeout=10)
    assert stub.paths() == ["/x/a%3Bb", "/x/a;b", "/x/a%3Bb%3Dc%26d"]  # %3b is %3B: the same, and a hit
    assert requests.get(proxy.url + "/up/x/%7Ea", timeout=10).headers["X-Cache"] == "MISS"
    assert requests.get(proxy.url + "/up/x/~a", timeout=10).headers["X-Cache"] == "HIT"  # unreserved: decoded


def test_a_kept_alive_connection_closed_as_it_is_reused_is_retried_for_a_get_never_a_post(
        proxy: SharedProxy, upstreams) -> None:
    closer = upstreams[2]
    first = requests.get(proxy.url + "/ka/one", headers={"Cache-Control": "no-store"}, timeout=10)
    second = requests.get(proxy.url + "/ka/two", headers={"Cache-Control": "no-store"}, timeout=10)
    assert (first.status_code, second.status_code) == (200, 200)
    assert closer.log[-2:] == [(1, "GET", "/two"), (2, "GET", "/two")]  # closed unanswered, then sent again
    before = len(closer.log)
    posted = requests.post(proxy.url + "/ka/three", data=b"{}", timeout=10)  # reuses connection 2: closed
    assert posted.status_code == 502 and posted.json()["domain"] == "ka"
    assert [method for _, method, _ in closer.log[before:]] == ["POST"]  # never sent twice


def test_an_answer_framed_both_ways_is_a_broken_answer_and_never_stored(proxy: SharedProxy, upstreams) -> None:
    raw = upstreams[1]
    answers = [requests.get(proxy.url + "/raw/framed-twice", timeout=10) for _ in range(2)]
    assert [a.status_code for a in answers] == [502, 502] and raw.count("/framed-twice") == 2
    assert "Content-Length and Transfer-Encoding" in answers[0].json()["message"]


def test_a_request_body_in_a_transfer_coding_other_than_chunked_is_a_400(proxy: SharedProxy, upstreams) -> None:
    stub = upstreams[0]
    body = chunk(b"\x1f\x8b\x08\x00") + LAST_CHUNK
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"POST /up/coded HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: gzip, chunked\r\n"
                     b"Connection: close\r\n\r\n" + body)
        answer = b""
        while chunk_read := sock.recv(65536):
            answer += chunk_read
    assert answer.startswith(b"HTTP/1.1 400") and b"Transfer-Encoding 'gzip, chunked'" in answer
    assert stub.count("/coded") == 0
