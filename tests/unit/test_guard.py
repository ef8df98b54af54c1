"""The Redis boundary: an outage opens a circuit (fail fast, one probe at a time); an error reply is not an outage."""
from __future__ import annotations

import threading
import time

import fakeredis
import pytest
import redis

from buddy.errors import StoreUnavailable
from buddy.store.guard import StoreGuard


def test_a_hung_redis_costs_one_probe_per_interval_not_every_call() -> None:
    guard = StoreGuard(retry_after=0.3)
    calls: list[float] = []
    at_once, most = [0], [0]
    counting = threading.Lock()

    def hung() -> None:
        calls.append(time.monotonic())
        with counting:
            at_once[0] += 1
            most[0] = max(most[0], at_once[0])
        time.sleep(0.2)  # the socket timeout of a Redis that does not answer
        with counting:
            at_once[0] -= 1
        raise redis.TimeoutError("Timeout reading from socket")

    with pytest.raises(StoreUnavailable):
        guard.run(hung)
    assert guard.open
    failures = []

    def caller() -> None:
        for _ in range(20):
            try:
                guard.run(hung)
            except StoreUnavailable:
                failures.append(1)
            time.sleep(0.05)

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    probes = len(calls) - 1
    assert len(failures) == 160  # every call failed, almost all of them without touching Redis
    assert most == [1] and 1 <= probes <= 160 // 4  # never two probes at once, and few: one per interval


def test_the_first_probe_that_succeeds_closes_the_circuit() -> None:
    guard = StoreGuard(retry_after=0.1)
    with pytest.raises(StoreUnavailable):
        guard.run(lambda: (_ for _ in ()).throw(redis.ConnectionError("refused")))
    with pytest.raises(StoreUnavailable):
        guard.run(lambda: "not tried")  # inside the interval: no call at all
    time.sleep(0.15)
    assert guard.run(lambda: "back") == "back"
    assert not guard.open and guard.problems() == []


def test_an_error_reply_is_a_bug_to_report_not_an_outage(caplog) -> None:
    client = fakeredis.FakeRedis()
    client.set("k", "a string")
    guard = StoreGuard()
    for _ in range(3):
        with pytest.raises(StoreUnavailable):
            guard.run(lambda: client.zadd("k", {"m": 1}), "k")
    assert not guard.open  # Redis is fine: the next call goes through
    assert guard.run(lambda: client.get("k")) == b"a string"
    bugs = [r.message for r in caplog.records if "this is a bug" in r.message]
    assert len(bugs) == 1 and "WRONGTYPE" in bugs[0] and "keys: k" in bugs[0]
    assert any("WRONGTYPE" in p for p in guard.problems())


@pytest.mark.parametrize("error", [
    redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),  # as redis-py 8 says it
    redis.ResponseError("Error running script (call to f_x): @user_script:9: -OOM command not allowed when used "
                        "memory > 'maxmemory'."),  # the same refusal met inside a Lua script
])
def test_out_of_memory_is_a_refusal_that_health_can_name(error: redis.RedisError, caplog) -> None:
    guard = StoreGuard()
    with pytest.raises(StoreUnavailable):
        guard.run(lambda: (_ for _ in ()).throw(error))
    assert not guard.open
    (problem,) = guard.problems()
    assert problem.startswith("writes refused: ") and "maxmemory" in problem
    assert not any("this is a bug" in r.message for r in caplog.records)


def test_with_a_probe_no_request_waits_on_a_hung_redis_and_the_probe_closes_the_circuit() -> None:
    answering = threading.Event()
    probes: list[float] = []

    def ping() -> bool:
        probes.append(time.monotonic())
        if not answering.is_set():
            raise redis.TimeoutError("Timeout reading from socket")
        return True

    guard = StoreGuard(retry_after=0.1, probe=ping)
    with pytest.raises(StoreUnavailable):
        guard.run(lambda: (_ for _ in ()).throw(redis.TimeoutError("hung")))
    tried = []
    for _ in range(50):
        with pytest.raises(StoreUnavailable):
            guard.run(lambda: tried.append(1))
    assert tried == []  # requests never reach a Redis that hangs; the prober does
    time.sleep(0.35)
    assert len(probes) >= 2 and guard.open
    answering.set()
    deadline = time.monotonic() + 2
    while guard.open and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not guard.open and guard.run(lambda: "back") == "back"
