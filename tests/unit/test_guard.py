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
    deadline = time.monotonic() + 5  # a probe every 0.1 s: waited for, not slept on (a busy machine runs it late)
    while len(probes) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(probes) >= 2 and guard.open
    answering.set()
    deadline = time.monotonic() + 2
    while guard.open and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not guard.open and guard.run(lambda: "back") == "back"


class TwoNodes:
    """A cluster as the guard sees it (guard.NodeMap): keys tagged {a} live on node a:1, the others on b:2, until a
    failover moves {a}'s slot to c:3; `down` holds the nodes whose probe fails."""

    def __init__(self) -> None:
        self.owner_of_a = "a:1"
        self.down = {"a:1"}
        self.probed: list[str] = []

    def node_of(self, key: str) -> str:
        return self.owner_of_a if key.startswith("{a}") else "b:2"

    def probe(self, node: str) -> None:
        self.probed.append(node)
        if node in self.down and node in (self.owner_of_a, "b:2"):  # a node that serves no slot passes
            raise redis.ConnectionError(f"Error 111 connecting to {node}. Connection refused.")


def refused(node: str) -> None:
    raise redis.ConnectionError(f"Error 111 connecting to {node}. Connection refused.")


def test_on_a_cluster_a_failed_node_opens_its_own_circuit_and_the_others_keep_going() -> None:
    nodes = TwoNodes()
    guard = StoreGuard(retry_after=10, nodes=nodes)
    try:
        with pytest.raises(StoreUnavailable):
            guard.run(lambda: refused("a:1"), key="{a}:k1")
        tried: list[str] = []
        for _ in range(5):
            with pytest.raises(StoreUnavailable, match="node a:1"):
                guard.run(lambda: tried.append("a"), key="{a}:k2")  # refused without touching Redis
            assert guard.run(lambda: tried.append("b") or "b", key="{b}:k") == "b"  # another primary: served
            assert guard.run(lambda: "keyless") == "keyless"  # PUBLISH, say: no node is known to be down for it
        assert tried == ["b"] * 5
        assert guard.open and guard.open_for("{a}:x") and not guard.open_for("{b}:x") and not guard.open_for(None)
        assert guard.problems() == ["unavailable: node a:1: ConnectionError: Error 111 connecting to a:1. "
                                    "Connection refused."]
    finally:
        guard.stop()


def test_when_a_replica_takes_over_the_old_node_s_circuit_closes_and_its_keys_follow_the_slot() -> None:
    nodes = TwoNodes()
    guard = StoreGuard(retry_after=0.05, nodes=nodes)
    try:
        with pytest.raises(StoreUnavailable):
            guard.run(lambda: refused("a:1"), key="{a}:k")
        deadline = time.monotonic() + 2
        while len(nodes.probed) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert guard.open_for("{a}:k") and set(nodes.probed) == {"a:1"}  # one probe per open circuit
        nodes.owner_of_a = "c:3"  # the failover: the slot's new primary, as the probe's fresh view of the cluster says
        assert guard.run(lambda: "new primary", key="{a}:k") == "new primary"  # the key follows its slot at once
        while guard.open and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not guard.open  # a:1 serves no slot any more: its circuit is gone, though a:1 is still down
    finally:
        guard.stop()


def test_the_node_redis_py_names_in_the_error_is_the_one_that_failed() -> None:
    """A MOVED followed to a node that is down: the error names where the call went, not where the key mapped to."""
    guard = StoreGuard(retry_after=10, nodes=TwoNodes())
    error = redis.ConnectionError("Connection refused")
    error.connection = redis.cluster.ClusterNode("b", 2)  # as redis-py records it (see guard.node_named_by)
    try:
        with pytest.raises(StoreUnavailable):
            guard.run(lambda: (_ for _ in ()).throw(error), key="{a}:k")
        assert guard.open_for("{b}:k") and not guard.open_for("{a}:k")
        keyless = redis.TimeoutError("Timeout reading from b:2")
        keyless.connection = redis.cluster.ClusterNode("a", 1)
        with pytest.raises(StoreUnavailable):
            guard.run(lambda: (_ for _ in ()).throw(keyless))  # a call without a key that says where it went
        assert guard.open_for("{a}:k")
    finally:
        guard.stop()


def test_a_cluster_that_cannot_be_reached_at_all_opens_the_whole_cluster_circuit() -> None:
    guard = StoreGuard(retry_after=10, nodes=TwoNodes())
    try:
        with pytest.raises(StoreUnavailable):
            guard.run(lambda: refused("somewhere"))  # a call without a key that names no node: no circuit opens
        assert not guard.open
        unreachable = redis.ConnectionError("Redis Cluster at a:1,b:2 cannot be reached: refused")  # LazyCluster's
        with pytest.raises(StoreUnavailable):
            guard.run(lambda: (_ for _ in ()).throw(unreachable), key="{b}:k")
        for key in ("{a}:k", "{b}:k", None):
            with pytest.raises(StoreUnavailable, match="cannot be reached"):
                guard.run(lambda: "not tried", key=key)
        assert guard.problems() == ["unavailable: ConnectionError: Redis Cluster at a:1,b:2 cannot be reached: "
                                    "refused"]
    finally:
        guard.stop()
