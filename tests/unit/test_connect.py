"""Beyond one Redis, without one: the redis.url forms and what a typo says, the client each form makes, how the
guard takes a cluster's errors, and that every script's keys share one slot (so that it runs on a cluster)."""
from __future__ import annotations

import threading
import uuid
from typing import Any

import fakeredis
import pytest
import redis
from redis.commands.core import Script
from redis.crc import key_slot
from redis.exceptions import (
    ClusterCrossSlotError,
    ClusterDownError,
    ClusterError,
    CrossSlotTransactionError,
    MasterDownError,
    MovedError,
    NoPermissionError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.sentinel import SentinelConnectionPool

from buddy import create_app
from buddy.errors import ConfigError, StoreUnavailable
from buddy.monitoring import redacted_url
from buddy.settings import load_settings
from buddy.store import connect as store_connect
from buddy.store.connect import COMMAND_TIMEOUT_SECONDS, LazyCluster, connect, for_blocking_reads
from buddy.store.fill_lock import lead_script, load_script
from buddy.store.guard import StoreGuard
from buddy.store.redis_url import parse_redis_url, redacted
from buddy.store.relay import RelayWriter, follow_chunks, read_meta
from tests.support.ports import free_port
from tests.support.upstream_stub import UpstreamStub


def script_text(name: str) -> str:
    """What the app sends for a script: lead.lua runs after acquire_lock.lua's and throttle.lua's functions."""
    return lead_script() if name == "lead" else load_script(name)


LUA_SCRIPTS = ("lead", "acquire_lock", "extend_lock", "release_lock", "store_entry", "measure_entries", "prune_index",
               "throttle", "penalize", "reset_penalty")


def url_problem(url: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings({"redis": {"url": url}}, {})
    [problem] = caught.value.problems
    return problem


def test_cluster_urls_name_seed_nodes_credentials_and_tls() -> None:
    target = parse_redis_url("rediss+cluster://proxy:s%40cr%2Ft@10.0.0.1:7000,[fd00::2]:7001,cache-3?ssl_cert_reqs=none")
    assert target.kind == "cluster" and target.tls
    assert target.nodes == (("10.0.0.1", 7000), ("fd00::2", 7001), ("cache-3", 6379))
    assert (target.username, target.password) == ("proxy", "s@cr/t")
    assert target.options == {"ssl_cert_reqs": "none"}
    assert parse_redis_url("redis+cluster://10.0.0.1:7000/0").db == 0
    assert parse_redis_url("redis+cluster://:only-a-password@h:1").password == "only-a-password"


def test_sentinel_urls_name_sentinels_the_service_and_a_database() -> None:
    target = parse_redis_url("redis+sentinel://app:pw@s1:26379,s2,s3:26380/mymaster/2?sentinel_password=sp")
    assert target.kind == "sentinel" and not target.tls
    assert target.nodes == (("s1", 26379), ("s2", 26379), ("s3", 26380))
    assert (target.service, target.db) == ("mymaster", 2)
    assert (target.username, target.password, target.options) == ("app", "pw", {"sentinel_password": "sp"})


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://u:p@h:6380/1", "unix:///tmp/r.sock?db=2"])
def test_one_server_urls_are_still_redis_pys_own(url: str) -> None:
    assert parse_redis_url(url).kind == "single"
    assert load_settings({"redis": {"url": url}}, {}).redis.url == url


@pytest.mark.parametrize("url, problem", [
    ("redis+clutser://10.0.0.1:7000", "(did you mean redis+cluster://?)"),
    ("redis-sentinel://s1/mymaster", "(did you mean redis+sentinel://?)"),
    ("redis+cluster://", "redis+cluster:// needs at least one host:port, e.g. redis+cluster://10.0.0.1:6379,"),
    ("redis+cluster://10.0.0.1:7000,10.0.0.2:70x1", "'10.0.0.2:70x1': the port must be a number from 1 to 65535"),
    ("redis+cluster://10.0.0.1:7000,,10.0.0.3", "have an empty entry (two commas in a row, or one at an end)"),
    ("redis+cluster://10.0.0.1:99999", "'10.0.0.1:99999': the port must be a number from 1 to 65535, not 99999"),
    ("redis+cluster://10.0.0.1:7000/3", "a Redis Cluster has only database 0; remove '/3' from the URL"),
    ("redis+sentinel://s1:26379,s2:26379", "redis+sentinel:// needs the Sentinel service name as its path, e.g. "
                                           "redis+sentinel://10.0.0.1:26379"),
    ("redis+sentinel://s1/mymaster/x", "the path must be /service_name or /service_name/db (db a number)"),
    ("redis+cluster://h:7000?ssl_ca_certs=/ca.pem", "option 'ssl_ca_certs' is for TLS: start the URL with "
                                                    "rediss+cluster://"),
    ("rediss+cluster://h:7000?ssl_cert_reqs=maybe", "ssl_cert_reqs must be one of required, optional, none"),
    ("redis+cluster://h:7000?timeout=3", "unknown option 'timeout' in redis+cluster:// (known: ssl_ca_certs"),
    ("redis+cluster://h:7000?sentinel_password=x", "unknown option 'sentinel_password'"),
    ("redis://10.0.0.1:7000,10.0.0.2:7000", "names several hosts: use redis+cluster:// for a Redis Cluster"),
    ("redis://h:port/0", "is not a valid Redis URL"),
])
def test_a_bad_url_is_refused_saying_what_is_wrong(url: str, problem: str) -> None:
    found = url_problem(url)
    assert found.startswith("redis.url: ") and problem in found


@pytest.mark.parametrize("url", [
    "redis+cluster://user:pa/ss-w0rd@h:7000",  # a '/' in the password cut the host list short
    "redis+cluster://user:pa?ss-w0rd@h:7000",
    "redis+cluster://user:pass-w0rd@h:70x0",
    "rediss+sentinel://user:pass-w0rd@s1:26379",
])
def test_no_problem_message_quotes_the_password(url: str) -> None:
    assert "w0rd" not in url_problem(url)


def test_a_prefix_with_a_hash_tag_is_refused_on_a_cluster() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"redis": {"url": "redis+cluster://h:7000", "prefix": "team{a}:"}}, {})
    assert caught.value.problems == ["redis.prefix: must not contain '{' or '}' on a Redis Cluster: it would be "
                                     "every key's hash tag and put the whole cache in one slot, on one node"]
    assert load_settings({"redis": {"url": "redis://h:6379/0", "prefix": "team{a}:"}}, {})


def test_the_environment_variable_is_named_when_it_is_wrong() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {"REDIS_URL": "redis+cluster://a:1,b:x"})
    assert caught.value.problems == ["REDIS_URL: 'b:x': the port must be a number from 1 to 65535, not 'x'"]


@pytest.mark.parametrize("url, shown", [
    ("redis+cluster://proxy:secret@10.0.0.1:7000,10.0.0.2:7000", "redis+cluster://proxy:***@10.0.0.1:7000,10.0.0.2:7000"),
    ("rediss+sentinel://:secret@s1,s2/mymaster?sentinel_password=also&ssl_cert_reqs=none",
     "rediss+sentinel://:***@s1,s2/mymaster?sentinel_password=***&ssl_cert_reqs=none"),
    ("redis://u:secret@Cache.example:6379/0", "redis://u:***@Cache.example:6379/0"),
    ("unix:///run/redis.sock?db=1&password=secret", "unix:///run/redis.sock?db=1&password=***"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
])
def test_urls_are_shown_without_passwords(url: str, shown: str) -> None:
    assert redacted(url) == redacted_url(url) == shown


def test_a_cluster_client_is_made_on_first_use_and_an_unreachable_cluster_is_an_outage(monkeypatch) -> None:
    port = free_port()  # nothing listens there
    client = connect(f"redis+cluster://127.0.0.1:{port}", timeout=0.5)
    assert isinstance(client, LazyCluster)  # made without touching the network
    script = client.register_script("return 1")
    assert isinstance(script, Script) and len(script.sha) == 40
    monkeypatch.setattr("buddy.store.connect.REBUILD_SECONDS", 3600.0)  # "not again soon" is an hour here
    tries: list[int] = []
    build = client._build
    monkeypatch.setattr(client, "_build", lambda: tries.append(1) or build())
    with pytest.raises(redis.ConnectionError, match=f"Redis Cluster at 127.0.0.1:{port} cannot be reached"):
        client.ping()
    with pytest.raises(redis.ConnectionError):
        client.get("k")  # within REBUILD_SECONDS: refused at once, without trying again
    assert tries == [1]
    client.close()


def test_a_sentinel_url_gives_the_primary_of_its_service() -> None:
    client = connect("redis+sentinel://u:pw@127.0.0.1:26379,127.0.0.1:26380/mymaster/3", timeout=0.5)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "mymaster"
    assert pool.connection_kwargs["db"] == 3 and pool.connection_kwargs["password"] == "pw"
    assert [s.connection_pool.connection_kwargs["port"] for s in pool.sentinel_manager.sentinels] == [26379, 26380]


def test_commands_give_up_after_the_short_timeout_and_blocking_reads_wait_the_long_one(monkeypatch) -> None:
    """Ordinary commands and the guard's probe: the command timeout; connecting and blocking reads (XREAD BLOCK):
    redis.socket_timeout. No network is touched: the clients are only made."""
    client = connect("redis://127.0.0.1:6379/0", timeout=10)
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (COMMAND_TIMEOUT_SECONDS, 10)
    reader = for_blocking_reads(client)
    assert reader is not client and reader is for_blocking_reads(client)  # made once, on first use
    assert reader.connection_pool.connection_kwargs["socket_timeout"] == 10
    assert connect("redis://h:6379/0", timeout=0.1).connection_pool.connection_kwargs["socket_timeout"] == 0.1

    primary = connect("redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/mymaster", timeout=10, command_timeout=0.2)
    assert primary.connection_pool.connection_kwargs["socket_timeout"] == 0.2
    sentinels = primary.connection_pool.sentinel_manager.sentinels
    assert {s.connection_pool.connection_kwargs["socket_timeout"] for s in sentinels} == {0.2}
    pool = for_blocking_reads(primary).connection_pool
    assert pool.connection_kwargs["socket_timeout"] == 10 and pool.service_name == "mymaster"

    made: list[dict] = []
    monkeypatch.setattr(store_connect, "RedisCluster", lambda **kwargs: made.append(kwargs) or object())
    cluster = connect("redis+cluster://127.0.0.1:7000", timeout=10, command_timeout=0.2)
    cluster.connect()
    for_blocking_reads(cluster).connect()
    assert [(k["socket_timeout"], k["socket_connect_timeout"]) for k in made] == [(0.2, 10), (10, 10)]

    fake = fakeredis.FakeRedis()
    assert for_blocking_reads(fake) is fake  # a client connect() did not make is its own
    for made_client in (client, primary):
        store_connect.close_client(made_client)


def test_a_relay_follower_waits_on_its_blocking_read_longer_than_the_command_timeout(redis_server) -> None:
    """XREAD BLOCK waits on the server for the leader's next chunk (up to relay.BLOCK_MS): with the command timeout
    as its socket timeout every such wait would be an outage; it reads through for_blocking_reads instead."""
    client = connect(redis_server.url, timeout=5, command_timeout=0.1)
    guard, key = StoreGuard(), f"buddy:relay:{{up}}:{uuid.uuid4().hex}"
    writer = RelayWriter(client, guard, key, limit=1 << 20)
    try:
        writer.start(200, "OK", [])
        after, status, _, _ = read_meta(client, guard, key) or (b"", 0, "", [])
        chunks = follow_chunks(client, guard, key, after, idle_timeout=5)
        later = threading.Timer(0.4, lambda: (writer.chunk(b"late"), writer.finish(True)))  # 4 command timeouts
        later.start()
        assert (status, list(chunks)) == (200, [b"late"])
        later.join()
        assert not guard.open
    finally:
        store_connect.close_client(client)


OUTAGE, MIGRATION, BUG = "outage", "migration", "bug"


@pytest.mark.parametrize("error, kind", [
    # A cluster that cannot serve: the circuit opens (BYPASS until a probe gets through).
    (ClusterDownError("CLUSTERDOWN The cluster is down"), OUTAGE),
    (MasterDownError("MASTERDOWN Link with MASTER is down"), OUTAGE),
    (SlotNotCoveredError('Slot "42" is not covered by the cluster.'), OUTAGE),
    (RedisClusterException("Redis Cluster cannot be connected. Please provide at least one reachable node: x"), OUTAGE),
    # Slots in migration: that one call fails, the circuit stays closed.
    (TryAgainError("TRYAGAIN"), MIGRATION),
    (MovedError("3999 127.0.0.1:6381"), MIGRATION),
    (ClusterError("TTL exhausted."), MIGRATION),
    # Keys in several slots, or a missing permission: a bug of ours or of the setup, not an outage.
    (CrossSlotTransactionError("All keys involved in a cluster transaction must map to the same slot"), BUG),
    (ClusterCrossSlotError("CROSSSLOT Keys in request don't hash to the same slot"), BUG),
    (RedisClusterException("EVALSHA - all keys must map to the same key slot"), BUG),
    (NoPermissionError("NOPERM this user has no permissions to run the 'info' command"), BUG),
])
def test_each_cluster_error_is_an_outage_a_passing_migration_or_a_bug(error: Exception, kind: str) -> None:
    guard = StoreGuard(retry_after=10)

    def fail() -> None:
        raise error

    with pytest.raises(StoreUnavailable):
        guard.run(fail)
    assert guard.open == (kind == OUTAGE)
    assert (guard.bug_at is not None) == (kind == BUG)
    if kind == BUG:
        assert type(error).__name__ in guard.last_bug
    if kind == MIGRATION:
        assert guard.run(lambda: "next") == "next"


def test_health_calls_a_cluster_going_down_unavailable_not_refusing_writes(app, monkeypatch) -> None:
    buddy = app.extensions["buddy"]

    def down(*args: Any, **kwargs: Any) -> None:
        raise ClusterDownError("CLUSTERDOWN The cluster is down")

    monkeypatch.setattr(buddy.redis, "set", down)
    report = buddy.monitoring.health()
    assert report["status"] == "degraded" and report["redis"] == "unavailable: ClusterDownError"


def test_a_proxy_starts_and_serves_while_its_cluster_is_unreachable(upstream: UpstreamStub) -> None:
    config = {"domain_mappings": {"up": {"upstream": upstream.url}}, "logging": {"enable_console": False},
              "security": {"require_secure_key": False}}
    app = create_app(config, environ={"REDIS_URL": f"redis+cluster://127.0.0.1:{free_port()}"})
    try:
        client = app.test_client()
        answers = [client.get("/up/thing") for _ in range(2)]
        assert [(a.status_code, a.headers["X-Cache"]) for a in answers] == [(200, "BYPASS")] * 2
        health = client.get("/admin/health")
        assert health.status_code == 503 and health.json["redis"] == "unavailable: ConnectionError"
        assert health.json["cluster"]["state"].startswith("unknown: ConnectionError")
        assert client.get("/admin/metrics").status_code == 200
        assert upstream.count() == 2
    finally:
        app.extensions["buddy"].shutdown()


def test_every_script_call_keeps_its_keys_in_one_slot(monkeypatch, upstream: UpstreamStub) -> None:
    """On a cluster a script runs on the node of its keys' slot: all of one call's keys must hash alike. Record every
    script call of a workload that runs each script (on fakeredis) and check each call's keys."""
    names = {Script(fakeredis.FakeRedis(), script_text(name)).sha: name for name in LUA_SCRIPTS}
    calls: list[tuple[str, list[str]]] = []
    original = Script.__call__

    def recording(self: Script, keys: Any = None, args: Any = None, client: Any = None) -> Any:
        calls.append((names.get(self.sha, "?"), [k.decode() if isinstance(k, bytes) else k for k in keys or []]))
        return original(self, keys=keys, args=args, client=client)

    monkeypatch.setattr(Script, "__call__", recording)
    server = fakeredis.FakeServer()
    config = {"domain_mappings": {"up": {"upstream": upstream.url, "max_requests_per_second": 50},
                                  "two": {"upstream": upstream.url}},
              "logging": {"enable_console": False}}
    app = create_app(config, redis_client=fakeredis.FakeRedis(server=server), environ={})
    buddy = app.extensions["buddy"]
    try:
        client = app.test_client()
        for path in ("/up/a", "/up/a", "/two/b", "/up/negotiate", "/up/status/429", "/up/status/200"):
            client.get(path, headers={"Accept": "application/json"})
        client.get("/admin/metrics")
        client.delete("/admin/cache/two")
        from buddy.redis_keys import EntryId
        entry = EntryId("up", "d" * 64)
        lock = buddy.service.coalescer.lock
        won, token = lock.acquire(entry, "t1", 3000)
        assert won and lock.extend(entry, token, 3000)
        lock.acquire(entry, "t2", 3000, vanished="gone")
        lock.release(entry, token)
        buddy.service.limiter.acquire(buddy.settings.domains["up"])  # a miss throttles with lead.lua, a pass alone
    finally:
        buddy.shutdown()
    assert {name for name, _ in calls} == set(LUA_SCRIPTS)
    for name, keys in calls:
        assert len({key_slot(key.encode()) for key in keys}) <= 1, f"{name} touches several slots: {keys}"

