"""Access keys and hostile input against real gunicorn workers, an upstream that records everything, DEBUG logs."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import requests

from tests.support.processes import ROOT
from tests.support.upstream_stub import UpstreamStub

KEY = "team-proxy-key-0f1e2d3c4b5a69788796"
DEBUG_LOGS = ("--log-level", "debug", "--access-logfile", "-",
              "--access-logformat", '%(h)s "%(r)s" %(s)s %(U)s %(q)s %({x-api-buddy-key}i)s %({authorization}i)s')


def secured(upstream: UpstreamStub, key: str | None = KEY) -> dict:
    return {"domain_mappings": {"up": {"upstream": upstream.url}},
            "security": {"require_secure_key": True, "secure_key": key}, "logging": {"level": "DEBUG"}}


def recorded(upstream: UpstreamStub) -> str:
    return repr([(s.method, s.path, s.raw_headers, s.body) for s in upstream.log])


def raw_exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except socket.timeout:
            pass
    return b"".join(chunks)


def test_every_placement_works_and_the_key_is_nowhere(gunicorn, redis_url, upstream) -> None:
    proxy = gunicorn(secured(upstream), env={"REDIS_URL": redis_url}, workers=2, extra_args=DEBUG_LOGS)
    attempts = [
        ({"X-API-Buddy-Key": KEY}, "/up/a?x=1"),
        ({"Authorization": f"Bearer {KEY}"}, "/up/b?x=1"),
        ({}, f"/up/c?x=1&key={KEY}"),
        ({}, f"/{KEY}/up/d?x=1"),
    ]
    for headers, path in attempts:
        response = requests.get(proxy.url + path, headers=headers, timeout=10)
        assert response.status_code == 200, (path, response.text)
        assert KEY not in response.text
    assert upstream.paths() == ["/a?x=1", "/b?x=1", "/c?x=1", "/d?x=1"]
    wrong = requests.get(f"{proxy.url}/up/e", headers={"X-API-Buddy-Key": "not-it"}, timeout=10)
    missing = requests.post(f"{proxy.url}/up/f", data=b"x", timeout=10)
    assert (wrong.status_code, missing.status_code) == (401, 401)
    assert upstream.count() == 4
    assert KEY not in recorded(upstream)
    proxy.stop()
    log = proxy.log()
    assert '"GET /' in log and "/up/d?x=1" in log  # the access log really was on, at DEBUG
    assert KEY not in log


def test_a_generated_key_works_on_every_worker_and_survives_restart(gunicorn, redis_url, upstream) -> None:
    env = {"REDIS_URL": redis_url}
    proxy = gunicorn(secured(upstream, key=None), env=env, workers=3, extra_args=DEBUG_LOGS)
    deadline = time.monotonic() + 30
    while True:  # `key` reads the key the first worker to boot generated; it never makes one up itself
        printed = subprocess.run([sys.executable, "-m", "flask", "buddy", "key"], cwd=ROOT, env=proxy.env,
                                 capture_output=True, text=True, timeout=60)
        if printed.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    key = printed.stdout.strip()
    assert printed.returncode == 0 and len(key) >= 32 and printed.stdout == key + "\n"
    # First, before any worker has needed the key: gunicorn logs this request line at DEBUG.
    assert requests.get(f"{proxy.url}/{key}/up/prefixed", timeout=10).status_code == 200
    statuses = [requests.get(f"{proxy.url}/up/w{i}", headers={"X-API-Buddy-Key": key, "Connection": "close"},
                             timeout=10).status_code for i in range(12)]
    assert statuses == [200] * 12
    proxy.stop()
    assert key not in proxy.log()  # not even in the first request line a worker logs at DEBUG
    again = gunicorn(secured(upstream, key=None), env=env, workers=1)
    assert requests.get(f"{again.url}/up/w0", headers={"X-API-Buddy-Key": key}, timeout=10).status_code == 200


def test_hostile_requests_get_4xx_and_the_worker_stays_healthy(gunicorn, redis_url, upstream) -> None:
    proxy = gunicorn({"domain_mappings": {"up": {"upstream": upstream.url}},
                      "server": {"max_request_body": 1000, "body_timeout": 1}},
                     env={"REDIS_URL": redis_url}, workers=1)
    host = f"Host: 127.0.0.1:{proxy.port}\r\n"
    cases = {
        "nul in path": b"GET /up/a%00b HTTP/1.1\r\n" + host.encode() + b"Connection: close\r\n\r\n",
        "raw nul": b"GET /up/a\x00b HTTP/1.1\r\n" + host.encode() + b"Connection: close\r\n\r\n",
        "bad percent": b"GET /up/%zz HTTP/1.1\r\n" + host.encode() + b"Connection: close\r\n\r\n",
        "overlong line": b"GET /up/" + b"a" * 20000 + b" HTTP/1.1\r\n" + host.encode() + b"\r\n",
        "overlong header": b"GET /up/a HTTP/1.1\r\n" + host.encode() + b"X-Big: " + b"b" * 20000 + b"\r\n\r\n",
        "non-numeric length": b"POST /up/a HTTP/1.1\r\n" + host.encode() + b"Content-Length: abc\r\n\r\n",
        "body too large": b"POST /up/a HTTP/1.1\r\n" + host.encode() + b"Content-Length: 5000\r\n"
                          b"Connection: close\r\n\r\n" + b"x" * 5000,
        "chunked too large": b"POST /up/a HTTP/1.1\r\n" + host.encode() + b"Transfer-Encoding: chunked\r\n"
                             b"Connection: close\r\n\r\n" + (b"400\r\n" + b"y" * 1024 + b"\r\n") * 3 + b"0\r\n\r\n",
        "lying length": b"POST /up/a HTTP/1.1\r\n" + host.encode() + b"Content-Length: 100\r\n\r\nonly ten b",
        "absolute form": b"GET http://127.0.0.1:1/up/a HTTP/1.1\r\n" + host.encode() + b"Connection: close\r\n\r\n",
        "connect": b"CONNECT 127.0.0.1:22 HTTP/1.1\r\n" + host.encode() + b"Connection: close\r\n\r\n",
        "traversal": b"GET /up/..%2f..%2fetc/passwd HTTP/1.1\r\n" + host.encode() + b"Connection: close\r\n\r\n",
    }
    for name, data in cases.items():
        answer = raw_exchange(proxy.port, data)
        status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else None
        assert status is not None and 400 <= status < 500, (name, answer[:200])
        if b"Content-Type: application/json" in answer:
            assert b'"error"' in answer, name
    chunked = raw_exchange(proxy.port, b"POST /up/chunked HTTP/1.1\r\n" + host.encode() +
                           b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert chunked.startswith(b"HTTP/1.1 200")
    assert [s.body for s in upstream.log] == [b"hello"]  # nothing hostile reached the upstream
    healthy = requests.get(f"{proxy.url}/up/after", timeout=10)
    assert healthy.status_code == 200 and healthy.headers["X-Cache"] == "MISS"
    assert "Traceback" not in proxy.log()
    assert "Booting worker" in proxy.log() and proxy.log().count("Booting worker") == 1  # no worker died
    health = requests.get(f"{proxy.url}/admin/health", timeout=10).json()
    assert health["status"] == "ok" and health["pid"] != proxy.process.pid  # the worker's own threads, all well
    threads = {kind: (shown["state"], shown.get("restarts", 0)) for kind, shown in health["threads"].items()}
    assert threads == {"wakeup": ("alive", 0), "metrics": ("alive", 0), "lock_keeper": ("alive", 0),
                       "upstream_watchdog": ("alive", 0), "redis_probe": ("idle", 0), "refreshers": ("idle", 0),
                       "key_failures": ("idle", 0), "malloc_trim": ("alive", 0)}


def test_starting_on_loopback_without_a_key_does_not_warn(gunicorn, redis_url, upstream) -> None:
    proxy = gunicorn({"domain_mappings": {"up": {"upstream": upstream.url}}}, env={"REDIS_URL": redis_url})
    requests.get(f"{proxy.url}/up/x", timeout=10)
    assert "without an access key" not in proxy.log()
