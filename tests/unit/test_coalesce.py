"""The lock and wake-up protocol on fakeredis: one leader, no lost wake-ups, dead leaders taken over."""
from __future__ import annotations

import threading
import time
from importlib import resources
from typing import Any

import fakeredis
import pytest

from buddy import coalesce
from buddy.coalesce import Coalescer, Fill
from buddy.errors import CoalesceTimeout
from buddy.messages import ProxyResult
from buddy.redis_keys import EntryId, RedisKeys
from buddy.store.fill_lock import load_script
from buddy.store.guard import StoreGuard
from buddy.store.wakeup import Waiter, WakeupHub

ENTRY = EntryId("up", "d" * 64)
KEYS = RedisKeys("t:")


@pytest.fixture
def client() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


@pytest.fixture
def make(client: fakeredis.FakeRedis):
    hubs: list[WakeupHub] = []

    def build() -> Coalescer:
        hub = WakeupHub(client, KEYS.fill_channel)
        hubs.append(hub)
        return Coalescer(client, StoreGuard(), KEYS, hub, relay_limit=1 << 20)

    yield build
    for hub in hubs:
        hub.stop()


def answer(body: bytes, status: int = 200) -> ProxyResult:
    return ProxyResult(status, "OK", [("Content-Type", "text/plain")], body)


def lead_with(coalescer: Coalescer, result: ProxyResult, calls: list[str], gate: threading.Event | None = None):
    def lead(fill: Fill) -> ProxyResult:
        calls.append(fill.token)
        if gate is not None:
            gate.wait(10)
        fill.share(result)
        return result

    return lead


def test_every_lua_script_ships_in_the_package_and_compiles(redis_server) -> None:
    shipped = {p.name[:-4] for p in resources.files("buddy.store").joinpath("lua").iterdir() if p.name.endswith(".lua")}
    used = {"acquire_lock", "extend_lock", "release_lock", "throttle", "penalize", "reset_penalty",
            "store_entry", "prune_index", "read_pieces"}
    assert used <= shipped
    client = redis_server.client()
    for name in sorted(shipped):
        text = load_script(name)
        assert "KEYS[1]" in text.split("\n", 1)[1], name  # the header says what KEYS and ARGV hold
        client.script_load(text)  # a syntax error would fail here, not on the first request


def test_followers_get_the_leaders_result_and_only_one_leads(make, monkeypatch) -> None:
    monkeypatch.setattr(coalesce, "POLL_SECONDS", 3600.0)  # only a wake-up can end the wait
    coalescers = [make() for _ in range(2)]  # two "processes", each with its own subscriber
    gate, calls, results = threading.Event(), [], []

    def request(i: int) -> None:
        c = coalescers[i % 2]
        results.append(c.run(ENTRY, 10_000, 5.0, 10.0, lead_with(c, answer(b"shared", 503), calls, gate)))

    threads = [threading.Thread(target=request, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while sum(c.hub.waiting() for c in coalescers) < 9 and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.set()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)  # each was woken (a poll would take an hour)
    assert len(calls) == 1
    assert sorted(r.cache for r in results) == ["COALESCED"] * 9 + ["MISS"]
    assert {(r.status, r.body) for r in results} == {(503, b"shared")}


def test_no_lost_wake_up_when_the_result_lands_between_miss_and_subscribe(make, monkeypatch, client) -> None:
    monkeypatch.setattr(coalesce, "POLL_SECONDS", 30.0)
    leader, follower = make(), make()
    token = "leader-token"
    assert leader.lock.acquire(ENTRY, token, 10_000) == (True, token)
    original = follower.hub.register

    def register_after_the_result_landed(entry: EntryId):
        Fill(leader, ENTRY, token).share(answer(b"raced"))  # published before anyone listens
        return original(entry)

    monkeypatch.setattr(follower.hub, "register", register_after_the_result_landed)
    waits: list[float] = []
    monkeypatch.setattr(Waiter, "wait", lambda self, timeout: waits.append(timeout) or False)
    result = follower.run(ENTRY, 10_000, 5.0, 10.0, lambda t: pytest.fail("the follower must not lead"))
    assert (result.body, result.cache) == (b"raced", "COALESCED")
    assert waits == []  # found by the look after registering, without waiting for a wake-up that came before


def test_a_dead_leaders_lock_expires_and_one_waiter_takes_over(make, client) -> None:
    dead = make()
    assert dead.lock.acquire(ENTRY, "dead-leader", 800)[0]  # never released: its worker was killed
    calls: list[str] = []
    results: list[ProxyResult] = []
    followers = [make() for _ in range(3)]

    def request(c: Coalescer) -> None:
        results.append(c.run(ENTRY, 10_000, 5.0, 10.0, lead_with(c, answer(b"fresh"), calls)))

    threads = [threading.Thread(target=request, args=(c,)) for c in followers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(calls) == 1 and calls[0] != "dead-leader"  # one waiter took over once the dead lock expired
    assert [r.body for r in results] == [b"fresh"] * 3


def test_a_leader_that_fails_lets_go_so_a_waiter_leads(make) -> None:
    first, second = make(), make()
    gate = threading.Event()
    calls: list[str] = []

    def failing(fill: Fill) -> ProxyResult:
        calls.append(fill.token)
        gate.wait(5)
        fill.abandon()  # what the service's finally does on an unexpected error
        raise RuntimeError("bug in the leader")

    def crash() -> None:
        with pytest.raises(RuntimeError):
            first.run(ENTRY, 10_000, 5.0, 10.0, failing)

    leader = threading.Thread(target=crash)
    leader.start()
    while not calls:
        time.sleep(0.01)
    results: list[ProxyResult] = []
    follower = threading.Thread(
        target=lambda: results.append(second.run(ENTRY, 10_000, 5.0, 10.0, lead_with(second, answer(b"ok"), calls)))
    )
    follower.start()
    time.sleep(0.2)
    gate.set()
    leader.join(5)
    follower.join(5)
    assert len(calls) == 2 and results[0].body == b"ok" and results[0].cache == "MISS"


def test_waiting_past_the_coalesce_timeout_raises(make, monkeypatch) -> None:
    holder, waiter = make(), make()
    holder.lock.acquire(ENTRY, "slow-leader", 10_000)
    waits: list[float] = []
    original = Waiter.wait
    monkeypatch.setattr(Waiter, "wait", lambda self, timeout: waits.append(timeout) or original(self, timeout))
    with pytest.raises(CoalesceTimeout, match="identical request to 'up'"):
        waiter.run(ENTRY, 10_000, 5.0, 0.5, lambda t: pytest.fail("must not lead"))
    assert waits and max(waits) <= 0.5  # no wait it asked for reaches past the timeout


def test_only_the_owner_can_extend_or_release(make, client) -> None:
    c = make()
    assert c.lock.acquire(ENTRY, "owner", 5_000) == (True, "owner")
    assert c.lock.acquire(ENTRY, "other", 5_000) == (False, "owner")
    assert not c.lock.extend(ENTRY, "other", 60_000)
    c.lock.release(ENTRY, "other")
    assert client.get(KEYS.lock(ENTRY)) == b"owner"
    assert c.lock.extend(ENTRY, "owner", 60_000) and client.pttl(KEYS.lock(ENTRY)) > 50_000
    c.lock.release(ENTRY, "owner")
    assert client.get(KEYS.lock(ENTRY)) is None


def test_a_slow_leader_keeps_its_lock_past_the_ttl(make) -> None:
    leader, follower = make(), make()
    calls: list[str] = []
    gate = threading.Event()

    def slow(fill: Fill) -> ProxyResult:
        calls.append(fill.token)
        gate.wait(10)  # far longer than the 400 ms lock TTL: only the keeper holds the lock meanwhile
        fill.share(answer(b"slow but sure"))
        return answer(b"slow but sure")

    first = threading.Thread(target=lambda: leader.run(ENTRY, 400, 5.0, 10.0, slow))
    first.start()
    while not calls:
        time.sleep(0.01)
    results: list[ProxyResult] = []
    second = threading.Thread(target=lambda: results.append(
        follower.run(ENTRY, 400, 5.0, 10.0, lambda f: calls.append(f.token) or answer(b"second fetch"))))
    second.start()
    time.sleep(1.5)
    gate.set()
    first.join(5)
    second.join(5)
    assert len(calls) == 1
    assert results[0].body == b"slow but sure" and results[0].cache == "COALESCED"
    assert leader.keeper.held() == 0


def test_a_leader_stuck_past_its_budget_lets_its_lock_expire(make, client) -> None:
    leader = make()
    assert leader.lock.acquire(ENTRY, "stuck", 300)[0]
    leader.keeper.hold(ENTRY, "stuck", 300, budget=0.9)
    time.sleep(0.6)
    assert client.get(KEYS.lock(ENTRY)) == b"stuck"  # renewed past its 300 ms TTL while within budget
    deadline = time.monotonic() + 3
    while client.get(KEYS.lock(ENTRY)) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.get(KEYS.lock(ENTRY)) is None and leader.keeper.held() == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_the_lock_keeper_comes_back_if_its_thread_dies(make, client, monkeypatch) -> None:
    leader = make()
    original = leader.keeper._extend_due
    calls = {"n": 0}

    def dies_once() -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise SystemExit  # what no `except Exception` catches: the thread is gone
        original()

    monkeypatch.setattr(leader.keeper, "_extend_due", dies_once)
    assert leader.lock.acquire(ENTRY, "first", 300)[0]
    leader.keeper.hold(ENTRY, "first", 300)
    time.sleep(0.2)
    assert not leader.keeper.thread.running
    other = EntryId("up", "e" * 64)
    assert leader.lock.acquire(other, "second", 300)[0]
    leader.keeper.hold(other, "second", 300)  # a new hold starts a new keeper thread
    time.sleep(0.6)
    assert client.get(KEYS.lock(other)) == b"second"


class Upstream:
    """What a BodyStream closes when it is done: a stand-in for requests' Response."""

    closed = False

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("ending", ["stored", "shared", "private", "abandoned", "relayed", "relayed-and-kept"])
def test_every_ending_of_a_fill_lets_go_of_its_lock_once_and_tells_the_followers(make, client, ending: str) -> None:
    from buddy.store.response_cache import ResponseCache
    from buddy.upstream import BodyStream

    leader, follower = make(), make()
    fill = leader.try_lead(ENTRY, 10_000, 10.0)
    assert fill is not None and leader.keeper.held() == 1 and client.get(KEYS.lock(ENTRY)) == fill.token.encode()
    got: list[Any] = []

    def follow() -> None:
        try:
            got.append(follower.run(ENTRY, 10_000, 5.0, 10.0, lambda f: f.share(None) or answer(b"led by follower")))
        except coalesce.NotShared as exc:
            got.append(exc)

    waiting = threading.Thread(target=follow)
    waiting.start()
    deadline = time.monotonic() + 10
    while follower.hub.waiting() < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    relayed: list[bytes] = []
    if ending == "stored":
        fill.storing()
        ResponseCache(client, StoreGuard(), KEYS).put(ENTRY, answer(b"kept"), 60, release=fill.lock)
        fill.stored()
    elif ending == "shared":
        fill.share(answer(b"not kept", 503))
    elif ending == "private":
        fill.private()
    elif ending == "abandoned":
        fill.abandon()
    else:
        stream = BodyStream(b"", iter([b"a", b"b"]), Upstream(), "up")  # type: ignore[arg-type]
        kept: list[bytes] = []
        keep = (lambda body: kept.append(body) or False) if ending == "relayed-and-kept" else None
        body = fill.relay(ProxyResult(200, "OK", [], stream=stream), keep=keep)  # a follower waits: relayed
        fill.abandon()  # the leader's own `finally`: the relay owns the ending now
        assert client.get(KEYS.lock(ENTRY)) is not None and fill.open is False
        relayed = list(body)
        assert kept == ([b"ab"] if keep else [])
    waiting.join(10)
    assert client.get(KEYS.lock(ENTRY)) is None and leader.keeper.held() == 0
    fill.abandon()  # ending twice does nothing
    assert fill.ending is not None
    [result] = got
    if ending == "private":
        assert isinstance(result, coalesce.NotShared)  # told to ask for itself
    elif ending.startswith("relayed"):
        assert relayed == [b"a", b"b"] and b"".join(result.stream) == b"ab" and result.cache == "COALESCED"
    else:
        expected = {"stored": b"kept", "shared": b"not kept", "abandoned": b"led by follower"}[ending]
        assert result.body == expected


def test_a_follower_that_parks_leaves_without_waiting_and_when_run_again_gets_its_leaders_answer(make) -> None:
    """buddy.parking: a follower that may not wait here says whom it follows; run again, it follows the same
    leader (never a second lead), and a parked follower counts as waiting, so the leader relays to it."""
    from buddy.parking import Parked

    leader, follower = make(), make()
    gate, calls = threading.Event(), []
    led: list[ProxyResult] = []
    leading = threading.Thread(target=lambda: led.append(
        leader.run(ENTRY, 10_000, 5.0, 10.0, lead_with(leader, answer(b"not kept", 503), calls, gate))))
    leading.start()
    deadline = time.monotonic() + 10
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    never = lead_with(follower, answer(b"a second call"), calls)
    with pytest.raises(coalesce.WaitingFull) as parked:
        follower.run(ENTRY, 10_000, 5.0, 10.0, never, parks=True)  # at once: the answer is not there yet
    assert parked.value.holder == calls[0]
    assert int(follower.client.get(KEYS.followers(ENTRY, calls[0]))) >= 1  # counted: the leader relays to it
    woken = threading.Event()
    park = Parked(ENTRY, parked.value.holder, parked.value.started, b"", follower.hub)
    park.watch(woken.set)
    gate.set()
    leading.join(10)
    assert woken.wait(5)  # the fill's end wakes the parked request
    park.unwatch()
    again = follower.run(ENTRY, 10_000, 5.0, 10.0, never, parks=True,
                         following=(parked.value.holder, parked.value.started))
    assert (again.status, again.body, again.cache) == (503, b"not kept", "COALESCED")  # the shared copy
    assert len(calls) == 1 and follower.hub.waiting() == 0
