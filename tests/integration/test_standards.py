"""RFC 9111 through real gunicorn workers, a real redis-server and a raw upstream: what is reused, revalidated and
invalidated, judged by the upstream's own log and the bytes each client got.

One shared proxy, with four mappings on one raw upstream: `std` (standards mode: `ttl_from_upstream`), `ref` (the
default reference mode), `short` (reference mode, a one-second TTL) and `paused` (standards mode, for the test that
pauses it). An answer's body names the request that fetched it (`#<n>`), so a client can tell a stored answer from
a fetched one.
"""
from __future__ import annotations

import email.utils
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import pytest
import requests

from tests.support.processes import Gunicorn, RedisServer, SharedProxy
from tests.support.raw_upstream import RESET, RawRequest, RawUpstream, head

pytestmark = pytest.mark.xdist_group("standards-proxy")

MONTH = 30 * 86400


def date(offset: float = 0.0) -> str:
    return email.utils.formatdate(time.time() + offset, usegmt=True)


def answer(request: RawRequest, count: int, status: str = "200 OK", headers: list[tuple[str, str]] | None = None,
           interim: bytes = b"") -> list[Any]:
    body = f"#{count} {request.method} {request.target}".encode()
    fields = [("Content-Type", "text/plain"), ("Content-Length", str(len(body))), *(headers or [])]
    return [interim + head(status, fields), body]


def with_headers(*headers: tuple[str, str]) -> Any:
    """A route answering 200 with these headers (values that are callables are called per request)."""
    return lambda request, count: answer(request, count, headers=[
        (name, value() if callable(value) else value) for name, value in headers])


ETAGS: dict[str, str] = {}  # path -> the representation's current ETag (a test changes it to make it "modified")


def validated(*headers: tuple[str, str]) -> Any:
    """A route with an ETag (ETAGS[path], else "v1"): a request whose If-None-Match names it gets a 304."""

    def route(request: RawRequest, count: int) -> list[Any]:
        path = request.target.split("?", 1)[0]
        etag = f'"{ETAGS.get(path, "v1")}"'
        fields = [("ETag", etag), ("Date", date()), *headers]
        if request.headers.get("if-none-match") == etag:
            return [head("304 Not Modified", fields)]
        return answer(request, count, headers=fields)

    return route


def once_then(first: Any, then: list[Any]) -> Any:
    """`first` for the first request to the path, `then` (raw steps) for every later one."""
    seen: set[str] = set()

    def route(request: RawRequest, count: int) -> list[Any]:
        if request.target not in seen:
            seen.add(request.target)
            return first(request, count)
        return then

    return route


def routes() -> dict[str, Any]:
    return {
        "/expires-past": with_headers(("Expires", lambda: date(-MONTH)), ("Date", date)),
        "/expires-zero": with_headers(("Expires", "0"), ("Date", date)),
        "/expires-aged": with_headers(("Expires", lambda: date(100)), ("Date", date), ("Age", "200")),
        "/no-cache": validated(("Cache-Control", "max-age=10000, no-cache")),
        "/age-list": with_headers(("Cache-Control", "max-age=3600"), ("Age", "7200, 0")),
        "/age-added": with_headers(("Cache-Control", "max-age=3600"), ("Age", "30"), ("Date", date)),
        "/quoted": with_headers(("Cache-Control", "max-age='3600'")),
        "/created": lambda request, count: answer(request, count, "201 Created", [("Last-Modified", date(-86400))]),
        "/plain": with_headers(),
        "/gone-stale/no-cache": once_then(with_headers(("Cache-Control", "max-age=1, no-cache")), [RESET]),
        "/gone-stale/s-maxage": once_then(with_headers(("Cache-Control", "max-age=1, s-maxage=1")), [RESET]),
        "/gone-stale/connection": once_then(with_headers(("Cache-Control", "max-age=1, must-revalidate"),
                                                         ("Connection", "Cache-Control")), [RESET]),
        "/hints": lambda request, count: answer(request, count, headers=[("Cache-Control", "max-age=60")], interim=(
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 102 Processing\r\n\r\n")),
        "/items/": validated(("Cache-Control", "max-age=3600")),
        "/conditional/": validated(("Cache-Control", "max-age=3600"), ("Last-Modified", date(-86400))),
        "/expired/": validated(("Cache-Control", "max-age=100"), ("Age", "100")),
        "/swr": validated(("Cache-Control", "max-age=100, stale-while-revalidate=60"), ("Age", "100")),
        "/sie-short": once_then(validated(("Cache-Control", "max-age=100, stale-if-error=0"), ("Age", "100")),
                                [head("503 Service Unavailable", [("Content-Length", "0")])]),
        "/pause-me": lambda request, count: [head("503 Service Unavailable", [("Retry-After", "60"),
                                                                             ("Content-Length", "0")])],
    }


@pytest.fixture(scope="module")
def raw_upstream() -> Iterator[RawUpstream]:
    upstream = RawUpstream(routes())
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def shared(module_gunicorn, redis_server: RedisServer, raw_upstream: RawUpstream) -> Gunicorn:
    base = {"upstream": raw_upstream.url, "read_timeout": 5, "connect_timeout": 2}
    config = {
        "domain_mappings": {
            "std": {**base, "ttl_seconds": 3600, "ttl_from_upstream": True},
            "ref": {**base, "ttl_seconds": 3600},
            "short": {**base, "ttl_seconds": 1},
            "paused": {**base, "ttl_seconds": 3600, "ttl_from_upstream": True},
        },
        "throttling": {"progressive_max_delay": 120, "default_requests_per_hour": 100_000},
    }
    return module_gunicorn(config, env={"REDIS_URL": redis_server.url}, workers=2)


@pytest.fixture
def upstream(raw_upstream: RawUpstream) -> RawUpstream:
    raw_upstream.clear()
    ETAGS.clear()
    return raw_upstream


@pytest.fixture
def proxy(shared: Gunicorn, redis_url: str, upstream: RawUpstream) -> SharedProxy:
    return SharedProxy(shared)


def get(proxy: SharedProxy, path: str, **headers: str) -> requests.Response:
    """A GET on a new connection (so that requests spread over the workers)."""
    return requests.get(proxy.url + path, headers={"Connection": "close", **headers}, timeout=15)


def twice(proxy: SharedProxy, path: str) -> list[str]:
    return [get(proxy, path).headers["X-Cache"] for _ in range(2)]


# -- wrong answers removed (standards mode) ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/expires-past", "/expires-zero", "/expires-aged", "/age-list", "/quoted",
                                  "/plain"])
def test_an_answer_without_usable_freshness_is_never_reused(proxy: SharedProxy, upstream: RawUpstream,
                                                            path: str) -> None:
    """Expires in the past, invalid, or passed by Age; a list-valued Age past max-age; a quoted max-age; no
    freshness and no validator at all (items 1, 3, 4, 5)."""
    assert twice(proxy, f"/std{path}") == ["MISS", "MISS"] and upstream.count(path) == 2
    assert twice(proxy, f"/ref{path}") == ["MISS", "HIT"]  # reference mode keeps it for the mapping's TTL


def test_a_201_with_only_last_modified_is_not_stored(proxy: SharedProxy, upstream: RawUpstream) -> None:
    posts = [requests.post(proxy.url + "/std/created", data=b"{}", timeout=15) for _ in range(2)]
    assert [p.headers["X-Cache"] for p in posts] == ["MISS", "MISS"] and posts[1].content.startswith(b"#2")


def test_no_cache_is_stored_but_revalidated_before_every_use(proxy: SharedProxy, upstream: RawUpstream) -> None:
    first, second = get(proxy, "/std/no-cache"), get(proxy, "/std/no-cache")
    assert first.headers["X-Cache"] == "MISS" and second.headers["X-Cache"] == "REVALIDATED"
    assert second.content == first.content  # the stored body: the upstream sent none
    asked = upstream.log[-1]
    assert asked.headers.get("if-none-match") == '"v1"' and upstream.count("/no-cache") == 2


@pytest.mark.parametrize("kind", ["no-cache", "s-maxage", "connection"])
def test_what_forbids_stale_answers_is_honoured_when_the_upstream_fails(proxy: SharedProxy, upstream: RawUpstream,
                                                                       kind: str) -> None:
    """max-age=1 with no-cache, with s-maxage, or with must-revalidate named in the upstream's Connection header
    (item 2): once expired, a dropped connection is a 502, never the stale copy."""
    assert get(proxy, f"/std/gone-stale/{kind}").status_code == 200
    time.sleep(1.1)
    failed = get(proxy, f"/std/gone-stale/{kind}")
    assert failed.status_code == 502 and failed.headers["X-Cache"] != "STALE"


def test_age_is_added_to_and_the_stored_date_is_sent(proxy: SharedProxy, upstream: RawUpstream) -> None:
    first = get(proxy, "/std/age-added")
    time.sleep(1.05)
    hit = get(proxy, "/std/age-added")
    assert hit.headers["X-Cache"] == "HIT" and int(hit.headers["Age"]) >= 31  # the upstream's 30, and a second here
    dates = [value for name, value in hit.raw.headers.items() if name.lower() == "date"]
    assert dates == [first.headers["Date"]]  # its own Date, once: not a new one beside it


def test_interim_answers_are_skipped(proxy: SharedProxy, upstream: RawUpstream) -> None:
    fetched = get(proxy, "/std/hints")
    assert fetched.status_code == 200 and fetched.content.startswith(b"#1") and "Link" not in fetched.headers
    assert get(proxy, "/std/hints").headers["X-Cache"] == "HIT"  # the final answer was stored, not the 103's


# -- invalidation, in every mode ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mapping", ["std", "ref"])
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_an_unsafe_request_invalidates_its_url_on_every_worker(proxy: SharedProxy, upstream: RawUpstream,
                                                              mapping: str, method: str) -> None:
    path = f"/{mapping}/items/{method.lower()}"
    old = get(proxy, path).content
    assert [get(proxy, path).headers["X-Cache"] for _ in range(8)] == ["HIT"] * 8  # in every worker's memory too
    changed = requests.request(method, proxy.url + path, data=b"x", timeout=15)
    assert changed.status_code == 200 and changed.headers["X-Cache"] == "MISS"
    after = [get(proxy, path) for _ in range(8)]
    assert after[0].headers["X-Cache"] == "MISS" and all(a.content != old for a in after)
    assert {a.content for a in after} == {after[0].content}  # one new fetch, then its hits, on every worker
    assert [seen.method for seen in upstream.log].count("GET") == 2


# -- revalidation and the client's own conditionals ----------------------------------------------------------------


def test_an_expired_entry_is_revalidated_and_a_304_moves_no_body(proxy: SharedProxy, upstream: RawUpstream) -> None:
    first = get(proxy, "/short/items/a")
    time.sleep(1.1)  # the mapping's one-second TTL: reference mode revalidates too
    again = get(proxy, "/short/items/a")
    assert again.headers["X-Cache"] == "REVALIDATED" and again.content == first.content
    assert upstream.log[-1].headers.get("if-none-match") == '"v1"'
    assert get(proxy, "/short/items/a").headers["X-Cache"] == "HIT"  # fresh again, for another second
    ETAGS["/items/a"] = "v2"
    time.sleep(1.1)
    changed = get(proxy, "/short/items/a")  # a 200 to the conditional: the new answer, not the stale one
    assert changed.headers["X-Cache"] == "MISS" and changed.content.startswith(b"#3")
    assert upstream.count("/items/a") == 3


def test_a_clients_conditional_is_answered_from_the_cache(proxy: SharedProxy, upstream: RawUpstream) -> None:
    stored = get(proxy, "/ref/conditional/a")
    matching = get(proxy, "/ref/conditional/a", **{"If-None-Match": 'W/"v1"'})
    assert (matching.status_code, matching.headers["X-Cache"], matching.content) == (304, "HIT", b"")
    other = get(proxy, "/ref/conditional/a", **{"If-None-Match": '"v0"'})
    assert (other.status_code, other.content) == (200, stored.content)
    since = get(proxy, "/ref/conditional/a", **{"If-Modified-Since": date()})
    assert since.status_code == 304
    fresh_miss = get(proxy, "/ref/conditional/b", **{"If-None-Match": '"v1"'})  # fetched whole, then answered 304
    assert (fresh_miss.status_code, fresh_miss.headers["X-Cache"]) == (304, "MISS")
    assert all("if-none-match" not in seen.headers for seen in upstream.log) and upstream.count("/conditional/") == 2


def test_an_upstreams_stale_while_revalidate_is_honoured(proxy: SharedProxy, upstream: RawUpstream) -> None:
    assert get(proxy, "/std/swr").headers["X-Cache"] == "MISS"  # max-age=100, Age: 100: stale on arrival
    stale = get(proxy, "/std/swr")
    assert stale.headers["X-Cache"] == "STALE" and stale.content.startswith(b"#1")
    deadline = time.monotonic() + 10
    while upstream.count("/swr") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.log[-1].headers.get("if-none-match") == '"v1"'  # one refresh, in the background, conditional


def test_an_upstreams_stale_if_error_limits_stale_answers(proxy: SharedProxy, upstream: RawUpstream) -> None:
    assert get(proxy, "/std/sie-short").status_code == 200  # stale on arrival; stale-if-error=0: no stand-in
    assert get(proxy, "/std/sie-short").status_code == 503
    assert get(proxy, "/std/expired/a").status_code == 200  # the same, with the mapping's 7 days of stand-in...
    upstream.routes["/expired/"] = lambda request, count: [head("503 Service Unavailable", [("Content-Length", "0")])]
    try:
        assert get(proxy, "/std/expired/a").headers["X-Cache"] == "STALE"  # ... the stored answer stands in
    finally:
        upstream.routes.update(routes())


def test_while_a_mapping_is_paused_a_stale_entry_answers_at_once(proxy: SharedProxy, upstream: RawUpstream) -> None:
    """Item 11: after an upstream 503 with Retry-After: 60, an expired entry is answered STALE at once: no wait for
    the pause, no slot, no upstream call."""
    assert get(proxy, "/paused/expired/b").status_code == 200  # stored, already stale (Age past max-age)
    assert get(proxy, "/paused/pause-me").status_code == 503  # the mapping pauses for 60 s
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: get(proxy, "/paused/expired/b"), range(4)))
    assert {a.headers["X-Cache"] for a in answers} == {"STALE"} and upstream.count("/expired/b") == 1


def test_an_unsafe_request_through_one_proxy_invalidates_every_proxy_on_the_redis(
        proxy: SharedProxy, upstream: RawUpstream, module_gunicorn, redis_server: RedisServer) -> None:
    other = module_gunicorn({"domain_mappings": {"ref": {"upstream": upstream.url, "ttl_seconds": 3600}}},
                            env={"REDIS_URL": redis_server.url}, workers=1)
    path = "/ref/items/elsewhere"
    old = get(proxy, path).content
    assert [get(proxy, path).headers["X-Cache"] for _ in range(4)] == ["HIT"] * 4  # in this proxy's memory too
    assert requests.delete(other.url + path, timeout=15).status_code == 200  # through the other proxy
    after = get(proxy, path)
    assert after.headers["X-Cache"] == "MISS" and after.content != old
