"""The Redis client a `redis.url` names: one server, a Redis Cluster or a Sentinel-watched primary, with redis-py's
own clients (Redis, RedisCluster, Sentinel); and the few things that differ on a cluster (its primaries, SCAN).

A cluster client is made on first use (`LazyCluster`): redis-py's RedisCluster connects when it is made, and a
proxy must start, and serve without the cache, while its cluster is down.

Two timeouts. Ordinary commands (GET, EVALSHA, SET, a pipeline) and the guard's probe give up after a short
`command_timeout` (COMMAND_TIMEOUT_SECONDS): a Redis that hangs costs a worker that long before its circuit opens,
not `redis.socket_timeout`. Connecting (TCP, and the TLS handshake) keeps `redis.socket_timeout`: a hung server still
accepts connections, and a handshake over a long path must not be cut short. A blocking read waits on the server
on purpose, so it goes through `for_blocking_reads(client)`: the same Redis, with `redis.socket_timeout` for every
read (XREAD BLOCK in relay.py). The wake-up subscription needs no client of its own: each of its reads waits as long
as `get_message(timeout=...)` says, whatever the socket timeout.
"""
from __future__ import annotations

import threading
import time
import weakref
from typing import Any, Callable, Iterator

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.commands.core import Script
from redis.connection import Encoder
from redis.crc import key_slot
from redis.exceptions import ClusterDownError, RedisClusterException, SlotNotCoveredError
from redis.retry import Retry
from redis.sentinel import Sentinel

from buddy.store.redis_url import TLS_OPTIONS, RedisTarget, parse_redis_url

SLOTS = 16384
CLUSTER_RETRIES = 1  # after a node fails: refresh the topology, try once more (a failover done), then give up
REBUILD_SECONDS = 1.0  # a cluster that could not be reached is not tried again sooner than this
# Ordinary commands and the guard's probe give up after this many seconds (at most redis.socket_timeout), unless
# redis.command_timeout says otherwise. Commands take well under a millisecond on a local
# network; a fork for a snapshot of a large Redis can stall it for a tenth of a second.
COMMAND_TIMEOUT_SECONDS = 0.5
_BLOCKING: "weakref.WeakKeyDictionary[Any, list[Any]]" = weakref.WeakKeyDictionary()  # client -> [make, made]


def _tls_kwargs(target: RedisTarget) -> dict[str, Any]:
    if not target.tls:
        return {}
    kwargs: dict[str, Any] = {"ssl": True}
    for name in TLS_OPTIONS:
        if name in target.options:
            value = target.options[name]
            kwargs[name] = value.lower() == "true" if name == "ssl_check_hostname" else value
    return kwargs


def connect(url: str, timeout: float, command_timeout: float | None = None) -> Any:
    """The client for `url`: redis.Redis (one server, or Sentinel's current primary) or a LazyCluster. Its commands
    give up after `command_timeout` seconds (COMMAND_TIMEOUT_SECONDS if not given; at most `timeout`), connecting
    after `timeout`; `for_blocking_reads(client)` gives the same Redis with `timeout` for every read."""
    short = min(timeout, COMMAND_TIMEOUT_SECONDS if command_timeout is None else command_timeout)
    client = _client(url, short, timeout)
    _BLOCKING[client] = [lambda: _client(url, timeout, timeout), None]
    return client


def for_blocking_reads(client: Any) -> Any:
    """The client for a read that blocks on the server (XREAD BLOCK): `client`'s Redis with the long timeout,
    made on first use; `client` itself if connect() did not make it (a test's fakeredis)."""
    entry = _BLOCKING.get(client)
    if entry is None:
        return client
    if entry[1] is None:
        entry[1] = entry[0]()
    return entry[1]


def close_client(client: Any) -> None:
    """Close `client` and its client for blocking reads, if one was made."""
    entry = _BLOCKING.pop(client, None)
    if entry is not None and entry[1] is not None:
        entry[1].close()
    client.close()


def _client(url: str, socket_timeout: float, connect_timeout: float) -> Any:
    target = parse_redis_url(url)
    timeouts = {"socket_timeout": socket_timeout, "socket_connect_timeout": connect_timeout}
    if target.kind == "single":
        return redis.Redis.from_url(url, health_check_interval=30, **timeouts)
    auth = {"username": target.username, "password": target.password}
    if target.kind == "cluster":
        def build() -> RedisCluster:
            return RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
                require_full_coverage=False,  # start on a cluster with slots down; their calls fail as outages
                retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), CLUSTER_RETRIES),
                **auth, **_tls_kwargs(target), **timeouts,
            )

        return LazyCluster(build, ",".join(f"{h}:{p}" for h, p in target.nodes))
    sentinel_auth = {"username": target.options.get("sentinel_username"),
                     "password": target.options.get("sentinel_password")}
    sentinel = Sentinel(  # asking the sentinels who leads is an ordinary command too
        list(target.nodes), sentinel_kwargs={**timeouts, **sentinel_auth, **_tls_kwargs(target)},
        **auth, **_tls_kwargs(target), **timeouts,
    )
    return sentinel.master_for(target.service, db=target.db, health_check_interval=30, **timeouts)


class LazyCluster:
    """A redis-py RedisCluster made on first use, and made again on a later use if the cluster could not be
    reached. Everything else is the RedisCluster's own (attribute access goes through to it); the few calls the
    app makes before any Redis work (register_script, ping as the outage probe, close) work without it.

    For the guard (a circuit per primary: guard.NodeMap), `node_of(key)` names the primary that serves a key, from the
    client's current view, and `probe(node)` finds out whether a node whose circuit is open serves again.
    `ping()` says whether the whole cluster serves: its state is ok (every slot served) and every primary answers.
    """

    def __init__(self, build: Callable[[], RedisCluster], seeds: str) -> None:
        self._build = build
        self.seeds = seeds
        self._client: RedisCluster | None = None
        self._error = ""
        self._failed_at = float("-inf")
        self._lock = threading.Lock()

    def connect(self) -> RedisCluster:
        """The RedisCluster; redis.ConnectionError (an outage, to the guard) while the cluster cannot be reached."""
        client = self._client
        if client is not None:
            return client
        with self._lock:
            if self._client is None:
                if time.monotonic() - self._failed_at < REBUILD_SECONDS:
                    raise redis.ConnectionError(self._error)
                try:
                    self._client = self._build()
                except (RedisClusterException, redis.RedisError, OSError) as exc:
                    self._failed_at = time.monotonic()
                    self._error = f"Redis Cluster at {self.seeds} cannot be reached: {exc}"
                    raise redis.ConnectionError(self._error) from exc
            return self._client

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.connect(), name)

    def register_script(self, script: str) -> Script:
        return Script(self, script)  # its calls go through __getattr__ (evalsha, script_load) to the cluster

    def get_encoder(self) -> Encoder:
        return self._client.get_encoder() if self._client is not None else Encoder("utf-8", "strict", False)

    def node_of(self, key: str) -> str:
        """host:port of the primary that serves `key`'s slot as this client last learned it (no round trip); '' while
        the cluster has not been reached, or the slot has no primary."""
        client = self._client
        if client is None:
            return ""
        nodes = client.nodes_manager.slots_cache.get(key_slot(key.encode()))
        return nodes[0].name if nodes else ""

    def probe(self, node: str) -> None:
        """The guard's probe of an open circuit: an outage error while `node` cannot serve. The cluster is asked
        first which node serves which slots (this client's view is updated): a node that serves no slot any more
        (a replica took over) passes, and its keys go to their new primary. A node serves if it answers and says the
        cluster's state is ok (with cluster-require-full-coverage yes, no node serves any key while a slot has no
        primary). `node` '' is the cluster as a whole: some node answers."""
        cluster = self.connect()
        refresh_topology(cluster)
        if not node:
            return
        owners = {nodes[0].name: nodes[0] for nodes in list(cluster.nodes_manager.slots_cache.values()) if nodes}
        if node not in owners:
            return
        state = cluster.cluster_info(target_nodes=owners[node]).get("cluster_state")
        if state != "ok":
            raise ClusterDownError(f"CLUSTERDOWN node {node} says the cluster is in state {state}")

    def ping(self, **kwargs: Any) -> bool:
        cluster = self.connect()
        if "target_nodes" not in kwargs:
            state = cluster.cluster_info().get("cluster_state")
            if state != "ok":
                raise ClusterDownError(f"CLUSTERDOWN the cluster says its state is {state}")
            kwargs["target_nodes"] = RedisCluster.PRIMARIES
        return bool(cluster.ping(**kwargs))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def cluster_of(client: Any) -> RedisCluster | None:
    """The RedisCluster behind `client` (made now if it is a LazyCluster not yet made), or None for one server."""
    if isinstance(client, LazyCluster):
        return client.connect()
    return client if isinstance(client, RedisCluster) else None


def is_cluster(client: Any) -> bool:
    return isinstance(client, (LazyCluster, RedisCluster))


def refresh_topology(cluster: RedisCluster) -> None:
    """Ask the cluster again which node serves which slots (after a failover, the promoted replica)."""
    cluster.nodes_manager.initialize(disconnect_startup_nodes_pools=False)


def primaries(client: Any, fresh: bool = True) -> list[tuple[str, Any]]:
    """(name, a client of that node alone) for every primary, from a fresh view of the cluster (or the client's
    current one), or [("", client)] for one server. SlotNotCoveredError if some slots have no primary."""
    cluster = cluster_of(client)
    if cluster is None:
        return [("", client)]
    if fresh:
        refresh_topology(cluster)
    covered = len(cluster.nodes_manager.slots_cache)
    if covered < SLOTS:
        raise SlotNotCoveredError(f"{SLOTS - covered} of {SLOTS} slots have no primary: the cluster is down")
    return [(node.name, cluster.get_redis_connection(node)) for node in cluster.get_primaries()]


def scan_batches(
    client: Any, run: Callable[[Callable[[], Any]], Any], match: str | None = None, count: int = 1000
) -> Iterator[list[bytes]]:
    """Every key (matching `match`), a SCAN batch at a time, from every primary of a cluster or from the one server;
    each round trip goes through `run` (a StoreGuard's)."""
    for _, node in run(lambda: primaries(client)):
        cursor = 0
        while True:
            cursor, batch = run(lambda: node.scan(cursor, match=match, count=count))
            if batch:
                yield batch
            if cursor == 0:
                break
