"""Coalescing across real gunicorn workers and instances, counted from the upstream stub's own log.

Most tests share one proxy of four workers (`proxy`), on an emptied Redis with an emptied upstream log."""
from __future__ import annotations

import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

from buddy.coalesce import POLL_SECONDS
from buddy.store.fill_lock import LOCK_TTL_MS
from tests.support.processes import Gunicorn, RedisServer
from tests.support.upstream_stub import UpstreamStub


def config_for(upstream: UpstreamStub, **extra) -> dict:
    domain = {"upstream": upstream.url, "connect_timeout": 1, "read_timeout": 3}
    return {"domain_mappings": {"up": domain}, **extra}


SHARED = {"cache": {"max_cache_response_size": 65536}}  # bodies over 64 KB are relayed to followers, not stored


# Under pytest-xdist the module runs on one worker, so that its shared proxy starts once.
pytestmark = pytest.mark.xdist_group("coalescing-proxy")


@pytest.fixture(scope="module")
def shared(module_gunicorn, redis_server: RedisServer, stub: UpstreamStub) -> Gunicorn:
    return module_gunicorn(config_for(stub, **SHARED), env={"REDIS_URL": redis_server.url}, workers=4)


@pytest.fixture
def upstream(stub: UpstreamStub) -> UpstreamStub:
    """This module's stub, shared by its tests (and the upstream of the shared proxy), log emptied."""
    stub.clear()
    return stub


def fire(urls: list[str], method: str = "GET", body: bytes | None = None) -> list[requests.Response]:
    """All requests at once, each on its own connection."""
    def one(url: str) -> requests.Response:
        return requests.request(method, url, data=body, timeout=30, headers={"Connection": "close"})

    with ThreadPoolExecutor(max_workers=len(urls)) as pool:
        return list(pool.map(one, urls))


def test_forty_identical_gets_over_four_workers_make_one_upstream_call(proxy, upstream) -> None:
    responses = fire([f"{proxy.url}/up/c/en/dog?sleep=600"] * 40)
    assert upstream.count() == 1
    assert [r.status_code for r in responses] == [200] * 40
    assert len({r.content for r in responses}) == 1
    states = [r.headers["X-Cache"] for r in responses]
    assert states.count("MISS") == 1 and set(states) <= {"MISS", "COALESCED", "HIT"}


def test_a_fan_out_gets_every_answer_from_one_call_when_the_workers_have_few_threads(
    gunicorn, redis_url, upstream
) -> None:
    """Two workers of 4 threads let 3 requests each wait on a fill; the rest are parked (a socket, no thread) and
    answered all the same, from the one upstream call: a GET, an LLM-style POST, and a body relayed as it comes."""
    config = config_for(upstream, **SHARED)
    config["domain_mappings"]["up"]["read_timeout"] = 10  # the relayed answer below takes 3 s to start
    few = gunicorn(config, env={"REDIS_URL": redis_url}, workers=2, extra_args=("--threads", "4"))
    assert requests.get(f"{few.url}/up/warm", timeout=30).status_code == 200
    gets = fire([f"{few.url}/up/fan?sleep=500"] * 100)
    posts = fire([f"{few.url}/up/v1/chat?sleep=500"] * 40, "POST", b'{"prompt": "same"}')
    # Over 64 KB: relayed, never stored, so a request that comes once the relay has ended makes a call of its own
    # (docs/requests.md). A slower upstream keeps the fill open while a loaded machine is still sending all 30.
    relayed = fire([f"{few.url}/up/big/300000?sleep=3000"] * 30)
    for answers, path in ((gets, "/fan"), (posts, "/v1/chat"), (relayed, "/big/300000")):
        assert [r.status_code for r in answers] == [200] * len(answers), path
        assert len({r.content for r in answers}) == 1 and upstream.count(path) == 1, path
    assert len(relayed[0].content) == 300000
    states = [r.headers["X-Cache"] for r in gets]  # a request that reached a thread only once it was stored: HIT
    assert states.count("MISS") == 1 and set(states) <= {"MISS", "COALESCED", "HIT"} and "COALESCED" in states


def test_identical_posts_coalesce_and_different_bodies_do_not(proxy, upstream) -> None:
    same = fire([f"{proxy.url}/up/sparql?sleep=500"] * 20, "POST", b"SELECT ?x WHERE {}")
    assert upstream.count() == 1 and len({r.content for r in same}) == 1
    with ThreadPoolExecutor(max_workers=10) as pool:
        list(pool.map(lambda i: requests.post(f"{proxy.url}/up/sparql?sleep=300", data=f"q{i % 5}", timeout=30),
                      range(10)))
    assert sorted(seen.body for seen in upstream.log[1:]) == [b"q0", b"q1", b"q2", b"q3", b"q4"]


def test_two_instances_sharing_redis_make_one_upstream_call(proxy, gunicorn, redis_url, upstream) -> None:
    first = proxy
    second = gunicorn(config_for(upstream, **SHARED), env={"REDIS_URL": redis_url})
    urls = [f"{(first if i % 2 else second).url}/up/shared?sleep=600" for i in range(30)]
    responses = fire(urls)
    assert upstream.count() == 1
    assert len({r.content for r in responses}) == 1


def test_an_uncacheable_503_is_shared_with_followers_but_not_kept(proxy, upstream) -> None:
    responses = fire([f"{proxy.url}/up/status/503?sleep=500"] * 20)
    assert [r.status_code for r in responses] == [503] * 20
    assert len({r.content for r in responses}) == 1
    assert upstream.count() == 1
    after = requests.get(f"{proxy.url}/up/status/503?sleep=500", timeout=30)
    assert after.status_code == 503 and after.headers["X-Cache"] == "MISS"
    assert upstream.count() == 2


def test_an_oversize_body_is_relayed_to_followers(proxy, upstream) -> None:
    size = 600_000
    responses = fire([f"{proxy.url}/up/big/{size}?sleep=500"] * 12)
    assert upstream.count() == 1
    assert {len(r.content) for r in responses} == {size}
    assert len({r.content for r in responses}) == 1
    assert sorted(r.headers["X-Cache"] for r in responses).count("COALESCED") == 11


def test_a_killed_leader_does_not_wedge_its_waiters(gunicorn, redis_url, upstream) -> None:
    leader_side = gunicorn(config_for(upstream), env={"REDIS_URL": redis_url}, workers=1)
    waiter_side = gunicorn(config_for(upstream), env={"REDIS_URL": redis_url}, workers=2)
    url = "/up/slow-thing?sleep=1500"
    with ThreadPoolExecutor(max_workers=12) as pool:
        doomed = pool.submit(requests.get, f"{leader_side.url}{url}", timeout=30)
        while upstream.count() == 0:
            time.sleep(0.02)
        waiters = [pool.submit(requests.get, f"{waiter_side.url}{url}", timeout=30) for _ in range(10)]
        time.sleep(0.3)  # let them park behind the leader
        (worker,) = psutil.Process(leader_side.process.pid).children()
        killed_at = time.time()  # the stub's clock: its start times are the kernel's wall-clock stamps
        os.kill(worker.pid, signal.SIGKILL)
        responses = [w.result() for w in waiters]
    assert doomed.exception() is not None  # its worker died with the connection open
    assert [r.status_code for r in responses] == [200] * 10
    assert len({r.content for r in responses}) == 1
    assert upstream.count() == 2  # the dead leader's call and one successor's
    # Time is the feature here: the lock outlives its dead leader by its TTL (it was renewed while the leader
    # lived), and then a waiter takes over. Judged by when the successor's call reached the upstream: never while
    # the leader lived, and within a few times the TTL plus a waiter's poll (3 + 1 s), far sooner than the
    # 60 s coalesce timeout a wedged key would end in.
    successor = upstream.log[1].started - killed_at
    lock_ttl, poll = LOCK_TTL_MS / 1000, POLL_SECONDS
    assert 0 < successor < 3 * (lock_ttl + poll), successor


def test_an_oversize_body_with_nobody_waiting_is_not_copied_into_redis(proxy, redis_server, upstream) -> None:
    client = redis_server.client()
    before = client.info("memory")["used_memory"]  # an empty Redis, and the shared proxy's connections
    response = requests.get(f"{proxy.url}/up/big/2000000", timeout=30)
    assert len(response.content) == 2_000_000
    assert client.keys("buddy:relay:*") == [] and client.keys("buddy:lock:*") == []
    assert client.info("memory")["used_memory"] - before < 500_000


def test_followers_get_the_whole_body_when_the_leaders_client_hangs_up(proxy, upstream) -> None:
    size, url = 1_500_000, "/up/big/1500000?sleep=800"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as leader:
        leader.sendall(f"GET {url} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n".encode())  # as requests keys it
        while upstream.count() == 0:
            time.sleep(0.02)
        with ThreadPoolExecutor(max_workers=4) as pool:
            followers = [pool.submit(requests.get, proxy.url + url, timeout=30) for _ in range(4)]
            time.sleep(0.3)
            leader.recv(1000)  # the start of the body, then hang up
            leader.close()
            answers = [f.result() for f in followers]
    assert [len(a.content) for a in answers] == [size] * 4
    assert {a.headers["X-Cache"] for a in answers} == {"COALESCED"}
    assert upstream.count() == 1


def test_a_head_leader_still_relays_the_body_to_get_followers(proxy, upstream) -> None:
    url = "/up/big/300000?sleep=600"
    with ThreadPoolExecutor(max_workers=4) as pool:
        head = pool.submit(requests.head, proxy.url + url, timeout=30)
        while upstream.count() == 0:
            time.sleep(0.02)
        gets = [pool.submit(requests.get, proxy.url + url, timeout=30) for _ in range(3)]
        assert head.result().headers["Content-Length"] == "300000"
        assert [len(g.result().content) for g in gets] == [300000] * 3
    assert upstream.count() == 1
