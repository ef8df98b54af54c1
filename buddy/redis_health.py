"""The proxy's Redis as the operator sees it: /admin/health's verdict and the `database` section of /admin/metrics.

Health probes with a write, because a full Redis still answers reads and PING while it refuses to store anything;
it also reports what this process's guard (and any worker's, through the `bug` key) saw Redis refuse of late, and
for a cluster which nodes are down. Memory settings that will hurt later are warnings, logged once at start-up.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import redis
from redis.exceptions import RedisClusterException

from buddy import redis_memory
from buddy.errors import StoreUnavailable
from buddy.redis_keys import RedisKeys
from buddy.store import topology
from buddy.store.connect import cluster_of, is_cluster
from buddy.store.guard import BUG_TTL_SECONDS, StoreGuard, is_outage
from buddy.store.offline import OfflineSwitch
from buddy.store.redis_url import redacted

log = logging.getLogger("buddy.monitoring")
STARTED = time.time()
PROBE_TTL_MS = 10_000  # the health check's probe key lives this long
REFUSAL_RECENT = 10.0  # seconds a command Redis refused in this process keeps health "degraded"


class RedisHealth:
    """health(), database(), info(): what the proxy's Redis (one server, Sentinel's primary or a cluster) is like."""

    # Why the embedded Redis cannot run, for health (its data folder deleted and not made again, say); create_app
    # sets it to EmbeddedRedis.problem when the proxy uses one.
    embedded_problem: Callable[[], str | None] = staticmethod(lambda: None)

    def __init__(
        self, client: redis.Redis, guard: StoreGuard, keys: RedisKeys, redis_url: str, version: str,
        offline: OfflineSwitch | None = None,
    ) -> None:
        self.client = client
        self.guard = guard
        self.keys = keys
        self.redis_url = redis_url
        self.version = version
        self.offline = offline
        self.warn_about_memory_settings()

    def warn_about_memory_settings(self) -> list[str]:
        """Log, once at start-up, what is wrong with the Redis's maxmemory settings (health repeats it); on a
        cluster, of every node's."""
        try:
            found = self._memory_warnings() if is_cluster(self.client) else redis_memory.warnings(
                self.client.info("memory")) + self._cluster_node_warnings()
        except (redis.RedisError, RedisClusterException):
            return []  # unreachable, or no INFO (fakeredis): health says so when it matters
        for warning in found:
            log.warning("%s (Redis at %s)", warning, redacted(self.redis_url))
        return found

    def info(self, section: str | None = None) -> dict[str, Any]:
        """Redis INFO, or {} from a server that does not offer it (fakeredis in tests); on a cluster, counts and
        memory summed over the primaries (topology.summed_info)."""
        try:
            cluster = cluster_of(self.client)
            if cluster is not None:
                return topology.summed_info(topology.node_infos(cluster, section, primaries_only=True))
            return self.client.info(section) if section else self.client.info()
        except redis.ResponseError:
            return {}

    def _cluster_node_warnings(self) -> list[str]:
        """A one-server URL that names a node of a Redis Cluster: the keys of other nodes' slots answer MOVED."""
        try:
            enabled = str(self.client.info("cluster").get("cluster_enabled", "0"))
        except (redis.RedisError, RedisClusterException):
            return []
        if enabled != "1":
            return []
        return ["this Redis is a node of a Redis Cluster, reached as one server: keys of the other nodes' slots are "
                "served without the cache; start the URL with redis+cluster:// (or rediss+cluster://)"]

    def _memory_warnings(self) -> list[str]:
        """What is wrong with the memory settings of each node of the cluster, named (replicas too: one may lead)."""
        cluster = cluster_of(self.client)
        return topology.memory_warnings(topology.node_infos(cluster, "memory")) if cluster is not None else []

    def _cluster_database(self, cluster: Any) -> dict[str, Any]:
        """get_database_stats of a Redis Cluster: keys and memory summed over the primaries, each node listed with
        its role, state, slots, keys and memory, which nodes are down, and the cluster's state."""
        state = topology.cluster_state(cluster)
        infos = topology.node_infos(cluster)
        primaries = {name: info for name, info in infos.items()
                     if any(n["address"] == name and n["role"] == "primary" and n["slots"] for n in state["nodes"])}
        total = topology.summed_info(primaries)
        for node in state["nodes"]:
            info = infos.get(node["address"])
            if isinstance(info, dict):
                node.update(keys=int((info.get("db0") or {}).get("keys", 0)), used_memory_bytes=info.get("used_memory"),
                            maxmemory_bytes=info.get("maxmemory"), maxmemory_policy=info.get("maxmemory_policy"))
            elif info is not None:
                node["error"] = info
        healthy = state["state"] == "ok" and not state["down"]
        return {
            "type": "redis-cluster", "health": "ok" if healthy else "degraded", "url": redacted(self.redis_url),
            "cluster_state": state["state"], "version": total.get("redis_version"),
            "used_memory_bytes": total.get("used_memory"), "maxmemory_bytes": total.get("maxmemory"),
            "maxmemory_policy": total.get("maxmemory_policy"), "evicted_keys": total.get("evicted_keys"),
            "keys": sum(int((info.get("db0") or {}).get("keys", 0)) for info in primaries.values()
                        if isinstance(info, dict)),
            "primaries": state["primaries"], "down": state["down"], "nodes": state["nodes"],
            "prefix": self.keys.prefix,
            "warnings": state["warnings"] + topology.memory_warnings(infos),
        }

    def database(self) -> dict[str, Any]:
        kind = "redis-cluster" if is_cluster(self.client) else "redis"
        try:
            cluster = cluster_of(self.client)
            if cluster is not None:
                return self._cluster_database(cluster)
            keys = self.client.dbsize()
            info = self.info()
            primary = topology.sentinel_primary(self.client)
        except (redis.RedisError, RedisClusterException) as exc:
            return {"type": kind, "health": "unavailable", "error": f"{type(exc).__name__}: {exc}",
                    "url": redacted(self.redis_url)}
        return {
            "type": kind if primary is None else "redis-sentinel", "health": "ok", "url": redacted(self.redis_url),
            **({} if primary is None else {"primary": primary}),
            "version": info.get("redis_version"), "used_memory_bytes": info.get("used_memory"),
            "maxmemory_bytes": info.get("maxmemory"), "maxmemory_policy": info.get("maxmemory_policy"),
            "evicted_keys": info.get("evicted_keys"), "keys": keys, "prefix": self.keys.prefix,
            "warnings": redis_memory.warnings(info),
        }

    def health(self) -> dict[str, Any]:
        """ok, or degraded with the reason: Redis unreachable, full and refusing writes, or refusing commands lately.

        The probe is a write, because a full Redis still answers reads and PING while it refuses to store
        anything; `warnings` name memory settings that will hurt later (no maxmemory, a policy that cannot evict).
        """
        state, reasons, info = "ok", [], {}
        try:
            self.guard.run(lambda: self.client.set(self.keys.health_probe, b"1", px=PROBE_TTL_MS))
        except StoreUnavailable as exc:
            cause = exc.__cause__
            if not isinstance(cause, redis.ResponseError) or is_outage(cause):  # an outage, or the circuit still open
                kind = type(cause).__name__ if cause else self.guard.last_error.split(":", 1)[0] or "StoreUnavailable"
                state = f"unavailable: {kind}"
                reasons.append(f"Redis is unavailable ({kind}): requests are served without the cache "
                               "(X-Cache: BYPASS)")
            else:
                state = f"refusing writes: {type(cause).__name__}: {cause}"
                info = self._memory_info()
                reasons.append(redis_memory.full_reason(info) if redis_memory.out_of_memory(cause) else
                               f"Redis refuses writes: {type(cause).__name__}: {cause}")
        else:
            info = self._memory_info()
            reasons += self._recent_refusals(info)
        problem = self.embedded_problem()
        if problem:
            reasons.append(problem)
        report: dict[str, Any] = {
            "status": "degraded" if reasons else "ok",
            "redis": state,
            "uptime_seconds": round(time.time() - STARTED, 1),
            "version": self.version,
            "offline": self.offline.on() if self.offline is not None else False,
        }
        warnings = redis_memory.warnings(info)
        if not is_cluster(self.client) and not state.startswith("unavailable"):
            warnings += self._cluster_node_warnings()
        if is_cluster(self.client):
            cluster_report, cluster_reason, warnings = self._cluster_health()
            report["cluster"] = cluster_report
            if cluster_reason:
                reasons.append(cluster_reason)
                report["status"] = "degraded"
        if reasons:
            report["reason"] = "; ".join(reasons)
        report["warnings"] = warnings
        return report

    def _cluster_health(self) -> tuple[dict[str, Any], str | None, list[str]]:
        """(the cluster's state and nodes down, why it cannot serve every slot or None, warnings). A node down
        whose slots a replica took over is a warning, not a degradation: every request is served normally."""
        try:
            state = topology.cluster_state(cluster_of(self.client))
            warnings = state["warnings"] + self._memory_warnings()
        except (redis.RedisError, RedisClusterException) as exc:
            return {"state": f"unknown: {type(exc).__name__}: {exc}", "down": []}, None, []
        short = {key: state[key] for key in ("state", "slots_ok", "slots_pfail", "slots_fail", "primaries",
                                             "known_nodes", "down")}
        return short, topology.state_problem(state), warnings

    def _recent_refusals(self, info: dict[str, Any]) -> list[str]:
        """Trouble the probe can miss: a noeviction Redis at its limit refuses some writes and not others (memory
        goes up and down with client buffers), and this process's guard remembers error replies of late."""
        reasons, full = [], redis_memory.full_without_eviction(info)
        now = time.monotonic()
        for when, text in ((self.guard.refused_at, self.guard.last_refusal), (self.guard.bug_at, self.guard.last_bug)):
            if when is None or now - when >= REFUSAL_RECENT:
                continue
            if redis_memory.out_of_memory(text):
                full = True
                reasons.append(f"a write was refused for lack of memory {now - when:.0f} s ago")
            else:
                reasons.append(f"Redis refused a command {now - when:.0f} s ago: {text}")
        try:  # what another worker's guard saw: every worker's health says the same
            key = self.keys.last_bug
            shared, ttl = self.guard.run(lambda: (self.client.get(key), self.client.ttl(key)))
        except StoreUnavailable:
            shared, ttl = None, -1
        if shared and BUG_TTL_SECONDS - ttl < REFUSAL_RECENT and not any("refused a command" in r for r in reasons):
            text = shared.decode(errors="replace") if isinstance(shared, bytes) else str(shared)
            reasons.append(f"Redis refused a command {max(0, BUG_TTL_SECONDS - ttl)} s ago: {text}")
        if full:
            reasons.insert(0, redis_memory.full_reason(info))
        return reasons

    def _memory_info(self) -> dict[str, Any]:
        """INFO memory, or {} when Redis does not answer it (fakeredis, a Redis that went away meanwhile); on a
        cluster, that of the fullest primary (one full node refuses the writes of its slots)."""
        try:
            cluster = cluster_of(self.client)
            if cluster is None:
                return self.client.info("memory")
            infos = [i for i in topology.node_infos(cluster, "memory", primaries_only=True).values()
                     if isinstance(i, dict)]
            return max(infos, key=lambda i: int(i.get("used_memory", 0)) / max(1, int(i.get("maxmemory", 0) or 0)),
                       default={})
        except (redis.RedisError, RedisClusterException):
            return {}
