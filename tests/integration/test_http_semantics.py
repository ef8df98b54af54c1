"""Issue 9, item by item: the proxy never hands a client an answer the upstream would not have given it, nor a
broken body that looks complete. Real gunicorn workers on a real redis-server; every verdict comes from the
upstream's own request log and the bytes the client received.

Most tests share one proxy (`proxy`): `/up/` is the counting stub (`upstream`), `/lax/` the same stub with
upstream Cache-Control ignored, `/raw/` a raw-socket upstream (`raw`) whose routes misbehave byte by byte. Each
test starts from an empty Redis and empty upstream logs. Tests that need other settings start their own.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs, urljoin, urlsplit

import pytest
import requests

from tests.support.ports import free_port
from tests.support.processes import ROOT, Gunicorn, RedisServer, SharedProxy, stop_group
from tests.support.raw_upstream import LAST_CHUNK, RESET, RawRequest, RawUpstream, chunk, head, pattern
from tests.support.upstream_stub import UpstreamStub

KB = 1024


def mapping(url: str, **extra: Any) -> dict[str, Any]:
    return {"upstream": url, "connect_timeout": 1, "read_timeout": 3, **extra}


def config(mappings: dict[str, dict[str, Any]], **sections: Any) -> dict[str, Any]:
    return {"domain_mappings": mappings, **sections}


def get(url: str, headers: dict[str, str] | None = None, **kwargs: Any) -> requests.Response:
    """One request on its own connection (so that calls spread over the workers)."""
    return requests.get(url, headers={"Connection": "close", **(headers or {})}, timeout=15, **kwargs)


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> requests.Response:
    return requests.post(url, data=body, headers={"Connection": "close", **(headers or {})}, timeout=15)


def x_cache(response: requests.Response) -> list[str]:
    """Every X-Cache header the client received, as sent (requests would join repeated ones with ', ')."""
    return response.raw.headers.getlist("X-Cache")


def concurrently(calls: list[Callable[[], Any]]) -> list[Any]:
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return [f.result() for f in [pool.submit(call) for call in calls]]


def read_body(url: str, read_timeout: float = 4.0) -> tuple[requests.Response, bytes, str]:
    """GET on a keep-alive connection, as an ordinary client would, and read the whole body.

    The verdict is what such a client can tell: "ended" (the body ended the HTTP way; `body` is what came),
    "broken" (the client library raised: no terminating chunk, a Content-Length not met, a reset), or "hung"
    (nothing more came for `read_timeout` seconds and the connection stayed open).
    """
    response = requests.get(url, stream=True, timeout=(5, read_timeout))
    try:
        return response, response.content, "ended"
    except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError):
        return response, b"", "broken"
    except requests.exceptions.ConnectionError as exc:  # requests reports a read timeout mid-body this way
        return response, b"", "hung" if "timed out" in str(exc).lower() else "broken"
    finally:
        response.close()


SHARED_CACHE = {"max_cache_response_size": 64 * KB, "max_relay_size": 128 * KB}


def raw_routes() -> dict[str, Any]:
    """What the shared raw upstream answers, by path prefix (the scripts are defined with their tests)."""
    return {
        "/tenant/": tenant_answer,
        "/odd/": odd_answer,
        "/gzip-cut": truncated_gzip,
        "/small/chunked-cut": chunked_then_cut(3000, piece=1000),
        "/small/chunked-reset": chunked_then_cut(3000, end=RESET, piece=1000),
        "/small/length-cut": length_then_cut(5000, 3000),
        "/big/chunked-cut": chunked_then_cut(200 * KB),
        "/big/chunked-reset": chunked_then_cut(200 * KB, end=RESET),
        "/big/length-cut": length_then_cut(300 * KB, 200 * KB),
        "/whole-chunked": slow_whole_body(512 * KB, chunked=True),
        "/whole-length": slow_whole_body(512 * KB, chunked=False),
        "/relay-cut": chunked_then_cut(100 * KB, pause=0.5),  # over the cache size, under the relay's
        "/evil": control_character_in_status_line,
    }


# Under pytest-xdist the module runs on one worker, so that its shared proxy starts once.
pytestmark = pytest.mark.xdist_group("http-semantics-proxy")


@pytest.fixture(scope="module")
def stubs() -> Iterator[tuple[UpstreamStub, RawUpstream]]:
    stub, raw = UpstreamStub(), RawUpstream(raw_routes())
    yield stub, raw
    stub.stop()
    raw.stop()


@pytest.fixture(scope="module")
def shared(module_gunicorn, redis_server: RedisServer, stubs) -> Gunicorn:
    stub, raw = stubs
    mappings = {"up": mapping(stub.url), "lax": mapping(stub.url, respect_upstream_cache_control=False),
                "raw": mapping(raw.url)}
    return module_gunicorn(config(mappings, cache=SHARED_CACHE), env={"REDIS_URL": redis_server.url})


@pytest.fixture
def upstream(stubs) -> UpstreamStub:
    """This module's counting stub, shared by its tests (and the upstream of `/up/` and `/lax/`), log emptied."""
    stubs[0].clear()
    return stubs[0]


@pytest.fixture
def raw(stubs) -> RawUpstream:
    """The raw upstream of `/raw/` on the shared proxy, log emptied."""
    stubs[1].clear()
    return stubs[1]


@pytest.fixture
def proxy(shared, redis_url: str, upstream: UpstreamStub, raw: RawUpstream) -> SharedProxy:
    """The shared proxy for one test: Redis emptied (`redis_url` flushes it), upstream logs emptied."""
    return SharedProxy(shared)


# -- 1. a mapping's upstream is part of the key: tests/unit/test_proxy_flow.py (two apps on one Redis) ----------



# -- 2. the key describes what was sent upstream (Connection-listed headers are not sent) -----------------------


def test_a_vary_header_named_in_connection_does_not_poison_the_keyed_entry(proxy, upstream) -> None:

    # Accept
    dropped = get(f"{proxy.url}/up/negotiate", {"Accept": "application/json", "Connection": "Accept"})
    sent = upstream.log[-1].headers.get("accept")
    assert sent in (None, "*/*"), f"a Connection-listed Accept reached the upstream: {sent!r}"
    assert dropped.headers["Content-Type"].startswith("text/html")  # the upstream's default, for no Accept
    json_client = get(f"{proxy.url}/up/negotiate", {"Accept": "application/json"})
    assert upstream.count("/negotiate") == 2, "the JSON client was answered from the entry stored without Accept"
    assert json_client.headers["Content-Type"] == "application/json" and json_client.json()["format"] == "json"

    # Accept-Language
    get(f"{proxy.url}/up/negotiate?l=1", {"Accept-Language": "de", "Connection": "Accept-Language"})
    assert upstream.log[-1].headers.get("accept-language") is None
    german = get(f"{proxy.url}/up/negotiate?l=1", {"Accept-Language": "de"})
    assert upstream.count("/negotiate?l=1") == 2
    assert '"lang": "de"' in german.text and x_cache(german) == ["MISS"]

    # Content-Type on a POST
    body = b'{"q": 1}'
    post(f"{proxy.url}/up/negotiate?c=1", body, {"Content-Type": "application/json", "Connection": "Content-Type"})
    assert upstream.log[-1].headers.get("content-type") is None
    typed = post(f"{proxy.url}/up/negotiate?c=1", body, {"Content-Type": "application/json"})
    assert upstream.count("/negotiate?c=1") == 2
    assert '"content_type": "application/json"' in typed.text and x_cache(typed) == ["MISS"]


# -- 3. upstream Cache-Control: private / no-store and Vary ------------------------------------------------------


def test_private_no_store_and_vary_star_answers_are_not_stored(proxy, upstream) -> None:
    for path in ("/p?h=Cache-Control:private", "/ns?h=Cache-Control:no-store",
                 "/pm?h=Cache-Control:private,%20max-age=600", "/star?h=Vary:*"):
        answers = [get(f"{proxy.url}/up{path}") for _ in range(2)]
        assert [r.status_code for r in answers] == [200, 200]
        assert upstream.count(path.split("?")[0] + "?") == 2, f"{path}: the second request was served from the cache"
        assert x_cache(answers[1]) == ["MISS"]


def test_vary_named_request_headers_get_their_own_entries(proxy, upstream) -> None:
    url = f"{proxy.url}/up/tenant?h=Vary:X-Tenant&echo=X-Tenant"
    a, b, a_again = (get(url, {"X-Tenant": tenant}) for tenant in ("a", "b", "a"))
    assert a.json()["echo"] == {"X-Tenant": "a"}
    assert b.json()["echo"] == {"X-Tenant": "b"}, "tenant b was served tenant a's answer"
    assert a_again.json()["echo"] == {"X-Tenant": "a"} and x_cache(a_again) == ["HIT"]
    assert upstream.count("/tenant") == 2


def test_a_mapping_can_opt_out_of_upstream_cache_control(proxy, upstream) -> None:
    first, second = (get(f"{proxy.url}/lax/p?h=Cache-Control:private") for _ in range(2))  # lax: the opted-out one
    assert x_cache(second) == ["HIT"] and second.content == first.content
    assert upstream.count("/p") == 1


def test_concurrent_requests_to_a_slow_vary_answer_each_get_their_tenants_body(proxy, upstream) -> None:
    url = f"{proxy.url}/up/slow-tenant?sleep=400&h=Vary:X-Tenant&echo=X-Tenant"
    tenants = ["a", "b", "a", "b", "a", "b"]
    answers = concurrently([lambda t=t: get(url, {"X-Tenant": t}) for t in tenants])
    assert [r.status_code for r in answers] == [200] * 6
    assert [r.json()["echo"]["X-Tenant"] for r in answers] == tenants


def test_concurrent_requests_to_a_slow_private_answer_never_get_someone_elses(proxy, upstream) -> None:
    url = f"{proxy.url}/up/mine?sleep=400&h=Cache-Control:private&echo=Cookie"
    cookies = [f"session=user{i}" for i in range(4)]
    answers = concurrently([lambda c=c: get(url, {"Cookie": c}) for c in cookies])
    assert [r.status_code for r in answers] == [200] * 4
    assert [r.json()["echo"]["Cookie"] for r in answers] == cookies


def tenant_answer(request: RawRequest, count: int):
    """An over-size (~80 KB, over the shared proxy's 64 KB) answer, a second in coming, that is one tenant's: by
    Vary, or by a private field."""
    tenant = request.headers.get("x-tenant", "none")
    body = (f"tenant={tenant};" * 6000).encode()
    if "private-field" in request.target:
        extra = [("Cache-Control", 'private="X-Session"'), ("X-Session", f"session-of-{tenant}")]
    else:
        extra = [("Vary", "X-Tenant")]
    yield 1.0
    yield head(headers=[("Content-Type", "text/plain"), *extra, ("Content-Length", str(len(body)))])
    yield body


@pytest.mark.parametrize("path", ["vary", "private-field"])
def test_an_oversize_answer_relayed_to_waiting_requests_is_never_another_tenants(proxy, raw, path) -> None:
    def ask(tenant: str, delay: float) -> requests.Response:
        time.sleep(delay)
        return get(f"{proxy.url}/raw/tenant/{path}", {"X-Tenant": tenant})

    answers = concurrently([lambda: ask("alice", 0), lambda: ask("bob", 0.3), lambda: ask("carol", 0.35)])
    for tenant, answer in zip(("alice", "bob", "carol"), answers):
        assert answer.status_code == 200
        if path == "vary":
            assert answer.content.startswith(f"tenant={tenant};".encode()), (tenant, answer.content[:20])
        else:
            assert answer.headers.get("X-Session") in (None, f"session-of-{tenant}"), (tenant, answer.headers)


def odd_answer(request: RawRequest, count: int):
    """Answers an upstream should never send, each of which once became a 500 or a stored broken answer."""
    name = request.target.rsplit("/", 1)[-1]
    headers = {
        "retry-after-digits": [("Retry-After", "9" * 5000)],
        "retry-after-year": [("Retry-After", "Mon, 01 Jan 99999999999 00:00:00 GMT")],
        "superscript-length": [("Content-Length", "\xb9")],
        "bad-ipv6-location": [("Location", "http://[::1/x")],
        "latin1-location": [("Location", "/caf\xe9")],
        "bad-port-location": [("Location", "http://127.0.0.1:99999999/x")],
    }[name]
    status = "200 OK"
    if name.startswith("retry-after"):
        status = "503 Service Unavailable"
    elif "location" in name:
        status = "302 Found"
    body = b'{"ok": true}'
    if name != "superscript-length":
        headers.append(("Content-Length", str(len(body))))
    yield head(status, headers=[("Content-Type", "application/json"), *headers])
    yield body


@pytest.mark.parametrize("name", ["retry-after-digits", "retry-after-year", "superscript-length",
                                  "bad-ipv6-location", "latin1-location", "bad-port-location"])
def test_an_odd_upstream_header_is_never_a_500(proxy, raw, name) -> None:
    answer = get(f"{proxy.url}/raw/odd/{name}")
    assert answer.status_code in (200, 302, 502, 503), (answer.status_code, answer.content[:200])
    assert x_cache(answer) == ["MISS"]
    assert "Traceback" not in proxy.log()


def truncated_gzip(request: RawRequest, count: int):
    """A gzip body whose end is marked only by closing the connection, cut before the gzip stream ends."""
    import gzip as gzip_module

    whole = gzip_module.compress(b'{"items": [' + b"1, " * 2000 + b"1]}")
    yield head(headers=[("Content-Type", "application/json"), ("Content-Encoding", "gzip")])
    yield whole[: len(whole) // 2]


def test_a_compressed_body_cut_short_is_a_502_and_never_stored(proxy, raw) -> None:
    answers = [get(f"{proxy.url}/raw/gzip-cut") for _ in range(2)]
    assert [a.status_code for a in answers] == [502, 502]
    assert answers[0].json()["domain"] == "raw"
    assert raw.count("/gzip-cut") == 2


# -- 4. a body the upstream breaks off never reaches a client as complete -----------------------------------------

CHUNKED = [("Content-Type", "application/octet-stream"), ("Transfer-Encoding", "chunked")]


def chunked_then_cut(size: int, end: object = None, pause: float = 0.0, piece: int = 16 * KB):
    """A chunked body of `size` bytes with no terminating chunk; the connection then closes (or resets)."""
    def script(request: RawRequest, count: int):
        yield pause
        yield head(headers=CHUNKED, close=False)
        data = pattern(size)
        for start in range(0, size, piece):
            yield chunk(data[start:start + piece])
        if end is not None:
            yield end
    return script


def length_then_cut(declared: int, sent: int):
    def script(request: RawRequest, count: int):
        yield head(headers=[("Content-Type", "application/octet-stream"), ("Content-Length", str(declared))])
        yield pattern(sent)
    return script


def slow_whole_body(size: int, chunked: bool, pause: float = 0.5, piece: int = 32 * KB, gap: float = 0.01):
    """A complete body, after `pause` (so that identical requests coalesce) and in pieces with small gaps."""
    def script(request: RawRequest, count: int):
        yield pause
        framing = [("Transfer-Encoding", "chunked")] if chunked else [("Content-Length", str(size))]
        yield head(headers=[("Content-Type", "application/octet-stream"), *framing])
        data = pattern(size)
        for start in range(0, size, piece):
            yield chunk(data[start:start + piece]) if chunked else data[start:start + piece]
            yield gap
        if chunked:
            yield LAST_CHUNK
    return script


def test_a_small_body_broken_off_is_a_502_and_never_stored(proxy, raw) -> None:
    for path in ("/small/chunked-cut", "/small/chunked-reset", "/small/length-cut"):
        response = get(f"{proxy.url}/raw{path}")
        assert response.status_code == 502, f"{path}: {response.status_code} {response.content[:80]!r}"
        assert response.headers["Content-Type"] == "application/json" and response.json()["domain"] == "raw"
        get(f"{proxy.url}/raw{path}")
        assert raw.count(path) == 2, f"{path}: the broken body was stored"


def test_an_oversize_body_broken_off_is_cut_off_for_the_client(proxy, raw) -> None:
    outcomes = {}
    for path in ("/big/chunked-cut", "/big/chunked-reset", "/big/length-cut"):
        response, body, outcome = read_body(f"{proxy.url}/raw{path}")
        outcomes[path] = outcome if outcome != "ended" else f"ended cleanly after {len(body)} bytes"
    assert outcomes == dict.fromkeys(outcomes, "broken")


def test_coalesced_followers_of_an_oversize_relay_never_get_a_short_body_that_ends_cleanly(proxy, raw) -> None:
    size = 512 * KB
    for path in ("/whole-chunked", "/whole-length"):
        results = concurrently([lambda: read_body(f"{proxy.url}/raw{path}")] * 3)
        verdicts = [(r.headers.get("X-Cache"), outcome, len(body)) for r, body, outcome in results]
        leaders = [(body, outcome) for r, body, outcome in results if r.headers.get("X-Cache") == "MISS"]
        followers = [v for v in verdicts if v[0] == "COALESCED"]
        assert len(leaders) == 1 and leaders[0] == (pattern(size), "ended"), (path, verdicts)
        assert followers, f"{path}: nothing coalesced, nothing tested: {verdicts}"
        for _, outcome, length in followers:
            assert outcome == "broken" or (outcome == "ended" and length == size), (path, verdicts)
        assert raw.count(path) == 1


def test_when_the_leaders_upstream_breaks_off_an_oversize_body_followers_see_a_broken_body(proxy, raw) -> None:
    results = concurrently([lambda: read_body(f"{proxy.url}/raw/relay-cut")] * 3)
    verdicts = [(r.headers.get("X-Cache"), outcome, len(body)) for r, body, outcome in results]
    assert "COALESCED" in [v[0] for v in verdicts], f"nothing coalesced, nothing tested: {verdicts}"
    assert [v[1] for v in verdicts] == ["broken"] * 3, verdicts
    assert raw.count("/relay-cut") == 1


# -- 5. Retry-After ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["%C2%B2", "%B2"], ids=["utf8-superscript-two", "latin1-superscript-two"])
def test_an_odd_retry_after_is_a_429_shared_by_one_upstream_call(proxy, upstream, spelling) -> None:
    url = f"{proxy.url}/up/status/429?sleep=500&h=Retry-After:{spelling}"
    answers = concurrently([lambda: get(url)] * 6)
    assert [r.status_code for r in answers] == [429] * 6
    assert upstream.count("/status/429") == 1


def test_max_upstream_pause_caps_what_an_upstream_retry_after_imposes(gunicorn, redis_url, upstream) -> None:
    # A pause longer than progressive_max_delay is refused at once (429); so a 200 right after the 429, once its
    # slot came, shows that the 30-day pause was cut to at most max_upstream_pause. No sleep needed.
    throttling = {"max_upstream_pause": 1, "progressive_max_delay": 2}
    proxy = gunicorn(config({"up": mapping(upstream.url)}, throttling=throttling), env={"REDIS_URL": redis_url})
    assert get(f"{proxy.url}/up/status/429?retry_after=2592000").status_code == 429
    later = get(f"{proxy.url}/up/later")
    assert later.status_code == 200 and upstream.count("/later") == 1, later.content[:200]


# -- 6. coalesce budgets -----------------------------------------------------------------------------------------


def run_until_refused(
    tmp_path: Path, config_: dict[str, Any], env: dict[str, str], wait: float = 30
) -> tuple[int | None, str]:
    """Start gunicorn and wait for it to exit; (None, output) if it came up and listened instead."""
    port = free_port()
    config_path = tmp_path / "refused.json"
    config_path.write_text(json.dumps(config_))
    full_env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "BUDDY_CONFIG", "BUDDY_DATA_DIR")}
    full_env.update(env, BUDDY_CONFIG=str(config_path))
    out_path = tmp_path / "refused.log"
    with open(out_path, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", f"127.0.0.1:{port}", "-w", "1",
             "wsgi:app"],
            cwd=ROOT, env=full_env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + wait
            while process.poll() is None and time.monotonic() < deadline:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                        break  # it started: not refused
                except OSError:
                    time.sleep(0.05)
        finally:
            code = process.poll()
            stop_group(process)
    return code, out_path.read_text(errors="replace")


def test_a_coalesce_timeout_shorter_than_a_leaders_budget_is_refused(tmp_path, redis_url, upstream) -> None:
    bad = config({"up": mapping(upstream.url)}, cache={"coalesce_timeout_seconds": 5},
                 throttling={"progressive_max_delay": 30})
    code, output = run_until_refused(tmp_path, bad, {"REDIS_URL": redis_url})
    assert code not in (None, 0), f"gunicorn started with a coalesce timeout its leaders may outlast:\n{output}"
    assert "cache.coalesce_timeout_seconds" in output and "throttling.progressive_max_delay" in output, output


def test_followers_wait_for_a_leader_that_waits_for_its_rate_limit_slot(gunicorn, redis_url, upstream) -> None:
    proxy = gunicorn(config({"up": mapping(upstream.url, max_requests_per_second=1)},
                            throttling={"progressive_max_delay": 4}), env={"REDIS_URL": redis_url})
    assert get(f"{proxy.url}/up/first").status_code == 200  # takes this second's slot
    answers = concurrently([lambda: get(f"{proxy.url}/up/second?sleep=1500")] * 4)
    assert [r.status_code for r in answers] == [200] * 4, [(r.status_code, r.content[:100]) for r in answers]
    assert upstream.count("/second") == 1


# -- 7. smaller wrong answers ------------------------------------------------------------------------------------


def control_character_in_status_line(request: RawRequest, count: int):
    yield (b"HTTP/1.1 200 OK\rX-Evil: 1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
           b"Connection: close\r\n\r\n{}")


def test_a_status_line_with_a_control_character_is_a_502_and_never_stored(proxy, raw) -> None:
    first = get(f"{proxy.url}/raw/evil")
    assert first.status_code == 502 and first.headers["Content-Type"] == "application/json", first.content[:200]
    assert first.json()["domain"] == "raw" and "X-Evil" not in first.headers
    second = get(f"{proxy.url}/raw/evil")
    assert second.status_code == 502 and raw.count("/evil") == 2


def raw_exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are; read the answer to its end (Connection: close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while True:
            part = sock.recv(65536)
            if not part:
                break
            data += part
    raw_head, _, body = data.partition(b"\r\n\r\n")
    lines = raw_head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    if "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize("size_line", [b"0x5", b"+5"])
def test_a_malformed_chunk_size_in_a_request_body_is_a_400(proxy, upstream, size_line) -> None:
    request = (b"POST /up/submit HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n"
               b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + size_line + b"\r\nhello\r\n0\r\n\r\n")
    status, headers, body = raw_exchange(proxy.port, request)
    assert status == 400, (status, body[:200])
    assert headers.get("content-type", "").startswith("application/json")
    json.loads(body)
    assert upstream.count() == 0
    time.sleep(0.2)  # let the worker finish writing its log
    assert "Traceback" not in proxy.log()


def test_the_client_reads_one_x_cache_verdict_the_proxys(proxy, upstream) -> None:
    first = get(f"{proxy.url}/up/cached-upstream?h=X-Cache:HIT")
    second = get(f"{proxy.url}/up/cached-upstream?h=X-Cache:HIT")
    assert x_cache(first) == ["MISS"] and x_cache(second) == ["HIT"]
    assert first.headers.get("X-Upstream-Cache") == "HIT"
    assert upstream.count("/cached-upstream") == 1


def test_a_rewritten_location_keeps_the_access_key_where_the_client_put_it(gunicorn, redis_url, upstream) -> None:
    key = "k3y-for-the-redirect-test"
    proxy = gunicorn(config({"up": mapping(upstream.url)},
                            security={"require_secure_key": True, "secure_key": key}),
                     env={"REDIS_URL": redis_url})

    def redirect(url: str, headers: dict[str, str] | None = None) -> str:
        response = get(url, headers, allow_redirects=False)
        assert response.status_code == 302, (response.status_code, response.content[:200])
        return response.headers["Location"]

    in_path = redirect(f"{proxy.url}/{key}/up/redirect")
    assert urlsplit(in_path).path.startswith(f"/{key}/up/"), in_path
    in_query = redirect(f"{proxy.url}/up/redirect?key={key}")
    assert parse_qs(urlsplit(in_query).query).get("key") == [key], in_query
    in_header = redirect(f"{proxy.url}/up/redirect", {"X-API-Buddy-Key": key})
    assert key not in in_header and urlsplit(in_header).path == "/up/target", in_header

    for location in (in_path, in_query):
        followed = get(urljoin(proxy.url + "/", location))
        assert followed.status_code == 200, (location, followed.status_code)
        assert followed.json()["path"] == "/target"
    for seen in upstream.log:
        assert key not in seen.path and key not in repr(seen.raw_headers) and key.encode() not in seen.body
