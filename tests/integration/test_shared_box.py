"""One box, many users, against real gunicorn workers: only the proxy's own host names are answered (DNS
rebinding), wrong keys from one address are slowed for every worker and logged once, and a request with a body
is never answered from the body-less entry.

Two proxies serve the module: `open_box` (no key, the default) and `keyed_box` (key required, 5 wrong keys in a
row lock an address out, for at most 2 s). Their keys have a prefix of their own on the session's Redis, so that
this module's lock-outs of 127.0.0.1 never meet another module's requests."""
from __future__ import annotations

import json
import re
import socket
import time
from typing import Any

import pytest
import requests

from buddy import CachingProxy
from tests.integration.test_access_and_hostile_input import raw_exchange
from tests.support.ports import free_port
from tests.support.processes import Gunicorn, RedisServer
from tests.support.upstream_stub import UpstreamStub

pytestmark = pytest.mark.xdist_group("shared-box")
KEY = "team-proxy-key-0f1e2d3c4b5a69788796"
EVIL = {"Host": "evil.example"}


def config(stub: UpstreamStub, **sections: Any) -> dict:
    return {"domain_mappings": {"up": {"upstream": stub.url}}, "redis": {"prefix": "sharedbox:"}, **sections}


@pytest.fixture(scope="module")
def open_box(module_gunicorn, redis_server: RedisServer, stub: UpstreamStub) -> Gunicorn:
    proxy = module_gunicorn(config(stub, server={"allowed_hosts": ["team-box.example"]}),
                            env={"REDIS_URL": redis_server.url}, workers=2)
    proxy.wait_until_serving("/admin/health")
    return proxy


@pytest.fixture(scope="module")
def keyed_box(module_gunicorn, redis_server: RedisServer, stub: UpstreamStub) -> Gunicorn:
    security = {"require_secure_key": True, "secure_key": KEY, "max_key_failures": 5, "key_lockout_max_seconds": 2}
    proxy = module_gunicorn(config(stub, security=security), env={"REDIS_URL": redis_server.url}, workers=2)
    proxy.wait_until_serving(f"/admin/health?key={KEY}")  # a request without the key would be a refusal
    return proxy


@pytest.fixture
def upstream(stub: UpstreamStub) -> UpstreamStub:
    stub.clear()
    return stub


def get(url: str, **headers: str) -> requests.Response:
    # A new connection per call, so that calls spread over the workers.
    return requests.get(url, headers={"Connection": "close", **headers}, timeout=10)


def test_a_key_less_proxy_answers_a_foreign_name_on_no_route(open_box: Gunicorn, upstream: UpstreamStub) -> None:
    url = open_box.url
    assert get(f"{url}/up/hit").headers["X-Cache"] == "MISS"
    assert get(f"{url}/up/hit").headers["X-Cache"] == "HIT"
    attempts = [("GET", "/up/hit"), ("HEAD", "/up/hit"), ("GET", "/up/miss"), ("GET", "/admin/health"),
                ("GET", "/admin/metrics"), ("GET", "/metrics"), ("GET", "/admin/"), ("GET", "/admin/panel"),
                ("GET", "/"), ("POST", "/admin/offline/on"), ("DELETE", "/admin/cache"), ("POST", "/up/post")]
    for method, path in attempts:
        response = requests.request(method, url + path, timeout=10,
                                    headers={**EVIL, "X-Buddy-Action": "1", "Connection": "close"})
        assert response.status_code == 421, (method, path, response.status_code, response.text[:200])
        if method != "HEAD":
            assert response.json()["setting"] == "server.allowed_hosts", path
    assert upstream.paths() == ["/hit"]  # no miss went upstream
    assert get(f"{url}/up/hit").headers["X-Cache"] == "HIT"  # the cache was not cleared
    assert get(f"{url}/admin/health").json()["offline"] is False  # nor the proxy switched offline
    for host in (f"localhost:{open_box.port}", "LOCALHOST", f"[::1]:{open_box.port}", "team-box.example",
                 socket.gethostname(), "192.0.2.10"):
        assert get(f"{url}/up/hit", Host=host).headers["X-Cache"] == "HIT", host
        assert get(f"{url}/metrics", Host=host).status_code == 200, host
    line = next(line for line in open_box.log().splitlines() if "accepts Host:" in line)
    assert "localhost" in line and "team-box.example" in line and "127.0.0.1" in line


def test_with_the_key_required_a_foreign_name_is_refused_too(keyed_box: Gunicorn) -> None:
    assert get(f"{keyed_box.url}/up/k", **{"X-API-Buddy-Key": KEY}).status_code == 200
    refused = get(f"{keyed_box.url}/up/k", **{"X-API-Buddy-Key": KEY}, **EVIL)
    assert refused.status_code == 421 and refused.json()["host"] == "evil.example"


def test_wrong_keys_are_slowed_for_every_worker_the_right_one_waits_then_works_and_one_line_is_logged(
        keyed_box: Gunicorn, redis_server: RedisServer) -> None:
    wrong, right = {"X-API-Buddy-Key": "a-guess-a-guess-a-guess"}, {"X-API-Buddy-Key": KEY}
    since = keyed_box.log_size()
    answers = [get(f"{keyed_box.url}/up/guessed", **wrong) for _ in range(40)]
    # Each on a new connection, spread over both workers: still only 4 refused as wrong, then 429 for all.
    assert [a.status_code for a in answers] == [401] * 4 + [429] * 36
    assert all(1 <= int(a.headers["Retry-After"]) <= 2 for a in answers[4:])
    assert answers[4].json()["error"] == "too many wrong access keys"
    time.sleep(int(answers[-1].headers["Retry-After"]))  # this lock-out is over: the next wrong key makes one
    with requests.Session() as session:  # one connection, so one worker, which this refusal tells of it
        assert session.get(f"{keyed_box.url}/up/k", headers=wrong, timeout=10).status_code == 429
        locked = session.get(f"{keyed_box.url}/up/k", headers=right, timeout=10)
        assert locked.status_code == 429  # the right key is not tried while the address is locked out
        time.sleep(int(locked.headers["Retry-After"]))
    # A new connection: after that sleep the worker may be closing the idle kept-alive one (its keepalive timeout).
    assert get(f"{keyed_box.url}/up/k", **right).status_code == 200
    lines = [line for line in keyed_box.log(since).splitlines() if "refused" in line]
    assert len(lines) == 1 and "missing or wrong access key" in lines[0], lines
    assert KEY not in keyed_box.log(since) and "a-guess" not in keyed_box.log(since)
    stored = redis_server.client().hgetall("sharedbox:key_failures:127.0.0.1")
    assert int(stored[b"unlogged"]) == 41  # the rest of the refusals, for the next line (a minute on)


def body_exchange(port: int, method: str, framing: bytes, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    head = f"{method} /up/body HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n".encode()
    answer = raw_exchange(port, head + framing + b"\r\n" + body)
    status_line, _, rest = answer.partition(b"\r\n")
    headers, _, content = rest.partition(b"\r\n\r\n")
    fields = dict(line.decode().split(": ", 1) for line in headers.split(b"\r\n") if b": " in line)
    return int(status_line.split()[1]), fields, content


def test_a_request_with_a_body_is_never_answered_from_the_body_less_entry(
        open_box: Gunicorn, upstream: UpstreamStub) -> None:
    port = open_box.port
    assert body_exchange(port, "GET", b"")[1]["X-Cache"] == "MISS"
    assert body_exchange(port, "GET", b"")[1]["X-Cache"] == "HIT"  # the body-less entry, from the hit path
    status, fields, content = body_exchange(port, "GET", b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n")
    assert (status, fields["X-Cache"], json.loads(content)["body"]) == (200, "MISS", "hello")
    status, fields, content = body_exchange(port, "GET", b"Content-Length: 5\r\n", b"hello")
    assert (status, fields["X-Cache"], json.loads(content)["body"]) == (200, "HIT", "hello")
    status, fields, _ = body_exchange(port, "HEAD", b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n")
    assert (status, fields["X-Cache"], fields["X-Upstream-Count"]) == (200, "HIT", "2")  # the entry with the body
    # A chunked body that is empty is no body to the view: the body-less entry, as the view keys it.
    status, fields, content = body_exchange(port, "GET", b"Transfer-Encoding: chunked\r\n", b"0\r\n\r\n")
    assert (status, fields["X-Cache"], json.loads(content)["body"]) == (200, "HIT", "")
    for odd in (b"Transfer-Encoding: identity\r\n", b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n",
                b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"):
        assert body_exchange(port, "GET", odd, b"5\r\nhello\r\n0\r\n\r\n")[0] == 400, odd
    assert [(s.method, s.body) for s in upstream.log] == [("GET", b""), ("GET", b"hello")]


def test_the_embedded_api_answers_only_its_own_names_too(redis_url: str, upstream: UpstreamStub,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    proxy = CachingProxy({**config(upstream), "server": {"port": port}, "redis": {"url": redis_url},
                          "logging": {"enable_console": False}})
    with proxy:
        assert requests.get(f"http://127.0.0.1:{port}/up/x", timeout=10).status_code == 200
        refused = requests.get(f"http://127.0.0.1:{port}/up/x", headers=EVIL, timeout=10)
        assert refused.status_code == 421 and refused.json()["error"] == "misdirected request"
    assert any(re.match(r"accepts Host: .*localhost", r.getMessage()) for r in caplog.records)
