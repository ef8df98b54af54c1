"""The operator's view, read from Redis so that it describes the whole proxy: the seed's MonitoringManager sections."""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable

import redis
from redis.exceptions import RedisClusterException

from buddy import redis_memory
from buddy.errors import StoreUnavailable
from buddy.redis_keys import RedisKeys
from buddy.settings import Settings
from buddy.store import topology
from buddy.store.connect import cluster_of, is_cluster
from buddy.store.guard import BUG_TTL_SECONDS, StoreGuard, is_outage
from buddy.store.metrics import MINUTE_FIELDS, RECENT_ERRORS, TIMELINE_MINUTES, WORKER_SEEN_SECONDS
from buddy.store.offline import OfflineSwitch
from buddy.store.redis_url import redacted
from buddy.store.response_cache import ResponseCache

log = logging.getLogger("buddy.monitoring")
STARTED = time.time()
ERROR_OUTCOMES = ("timeout", "unreachable")
PROBE_TTL_MS = 10_000  # the health check's probe key lives this long
REFUSAL_RECENT = 10.0  # seconds a command Redis refused in this process keeps health "degraded"


# Counters of stale answers, offline mode and each worker's memory (L1), as /admin/metrics names them.
FRESHNESS_COUNTERS = {
    "stale": "stale_answers",  # X-Cache: STALE, for any reason
    "stale_if_error": "stale_if_error",  # ... of which instead of an upstream failure
    "background_refreshes": "background_refreshes",  # stale-while-revalidate refreshes run
    "refresh_failures": "background_refresh_failures",  # ... that failed and left the expired entry in place
    "offline_refusals": "offline_refusals",  # misses answered 504 in offline mode
    "not_cached": "only_if_cached_misses",  # misses answered 504 for Cache-Control: only-if-cached
    "memory_hits": "memory_hits",  # lookups answered by a worker's in-memory copy (L1), not by Redis
}


# What each request adds to exactly one of (service._tally): their sum is the mapping's requests.
REQUEST_OUTCOMES = ("hits", "coalesced", "stale", "misses", "passthrough", "coalesce_timeouts", "offline_refusals",
                    "not_cached")
PUSHED_BACK = ("429", "503")  # upstream answers that pause a mapping (progressive throttling)


def _rate(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


def _ints(raw: dict[bytes, bytes]) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in raw.items()}


def redacted_url(url: str) -> str:
    """A Redis URL fit to show: the password replaced, whether in the user part or a ?password= parameter; a
    cluster's or Sentinel's list of hosts is kept as it is."""
    return redacted(url)


class MonitoringManager:
    """get_cache_stats / get_upstream_stats / get_database_stats / get_proxy_health / get_throttling_stats."""

    # Why the embedded Redis cannot run, for health (its data folder deleted and not made again, say); create_app
    # sets it to EmbeddedRedis.problem when the proxy uses one.
    embedded_problem: Callable[[], str | None] = staticmethod(lambda: None)

    def __init__(
        self, client: redis.Redis, guard: StoreGuard, keys: RedisKeys, settings: Settings, cache: ResponseCache,
        redis_url: str, version: str, offline: OfflineSwitch | None = None,
    ) -> None:
        self.client = client
        self.guard = guard
        self.keys = keys
        self.settings = settings
        self.cache = cache
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
            log.warning("%s (Redis at %s)", warning, redacted_url(self.redis_url))
        return found

    def counters(self) -> dict[str, dict[str, int]]:
        """Every configured domain's counters (hits, misses, upstream calls and times, ...)."""
        names = list(self.settings.domains)

        def read() -> list:
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.hgetall(self.keys.stats(name))
            return pipe.execute()

        return {name: _ints(raw) for name, raw in zip(names, self.guard.run(read))}


    def get_cache_stats(self) -> dict[str, Any]:
        counters = self.counters()
        census = self.cache.census()
        described = {name: census.describe(name) for name in self.settings.domains}
        total = {field: sum(c.get(field, 0) for c in counters.values())
                 for field in ("hits", "misses", "coalesced", "sets", "bytes_saved", "ms_saved", *FRESHNESS_COUNTERS)}
        lookups = total["hits"] + total["misses"] + total["coalesced"]
        ttl: dict[str, int] = {}
        for entries in described.values():
            for bucket, n in entries.ttl_buckets.items():
                ttl[bucket] = ttl.get(bucket, 0) + n
        redis_stats = self._info("stats")
        by_domain = {name: self._cache_of(name, c) for name, c in counters.items()}
        money: dict[str, float] = {}
        for entry in by_domain.values():
            if entry["money_saved"] is not None:
                currency = entry["cost_currency"] or ""
                money[currency] = round(money.get(currency, 0.0) + entry["money_saved"], 4)
        return {
            "total_entries": sum(e.entries for e in described.values()),
            "entries_per_domain": {name: e.entries for name, e in described.items()},
            "cache_size_bytes": sum(e.size_bytes for e in described.values()),
            "cache_size_per_domain": {name: e.size_bytes for name, e in described.items()},
            "hit_count": total["hits"],
            "miss_count": total["misses"],
            "coalesced_count": total["coalesced"],
            "hit_rate": _rate(total["hits"], lookups),
            "miss_rate": _rate(total["misses"], lookups),
            "sets": total["sets"],
            "compressed": total["sets"],  # every stored entry is zstd-compressed
            "ttl_distribution": ttl,
            "expired_entries": int(redis_stats.get("expired_keys", 0)),
            "evicted_entries": int(redis_stats.get("evicted_keys", 0)),
            "counted": {"exact": census.exact, "keys_read": census.keys_read, "keys_total": census.keys_total},
            "upstream_calls_avoided": total["hits"] + total["coalesced"],
            "bytes_saved": total["bytes_saved"],
            "seconds_saved": round(total["ms_saved"] / 1000, 3),
            **{FRESHNESS_COUNTERS[field]: total[field] for field in FRESHNESS_COUNTERS},
            "money_saved": money,  # by currency, from the mappings that set cost_per_call
            "by_domain": by_domain,
        }

    def _cache_of(self, name: str, c: dict[str, int]) -> dict[str, Any]:
        """One mapping's share of the cache section; money saved is calls avoided times its cost_per_call."""
        avoided = c.get("hits", 0) + c.get("coalesced", 0)
        cost, currency = self.settings.domains[name].cost_per_call, self.settings.domains[name].cost_currency
        return {
            "requests": sum(c.get(field, 0) for field in REQUEST_OUTCOMES),
            "hits": c.get("hits", 0), "misses": c.get("misses", 0), "coalesced": c.get("coalesced", 0),
            **{FRESHNESS_COUNTERS[field]: c.get(field, 0) for field in FRESHNESS_COUNTERS},
            "hit_rate": _rate(c.get("hits", 0), c.get("hits", 0) + c.get("misses", 0) + c.get("coalesced", 0)),
            "upstream_calls_avoided": avoided,
            "bytes_saved": c.get("bytes_saved", 0), "seconds_saved": round(c.get("ms_saved", 0) / 1000, 3),
            "cost_per_call": cost, "cost_currency": currency,
            "money_saved": None if cost is None else round(avoided * cost, 4),
        }

    def _upstream_of(self, counters: dict[str, int], per_hour: int) -> dict[str, Any]:
        total = counters.get("upstream_requests", 0)
        by_status = {k.split(":", 1)[1]: v for k, v in counters.items() if k.startswith("status:")}
        errors = {s: n for s, n in by_status.items() if s in ERROR_OUTCOMES or int(s) >= 500 or s == "429"}
        failed = sum(errors.values())
        return {
            "total_requests": total,
            "avg_response_time_ms": round(counters.get("upstream_ms", 0) / total, 1) if total else 0.0,
            "success_rate": _rate(total - failed, total),
            "error_rate": _rate(failed, total),
            "requests_per_hour": per_hour,
            "errors_by_status": {s: n for s, n in by_status.items() if s in ERROR_OUTCOMES or int(s) >= 400},
        }

    def _last_hour(self) -> dict[str, int]:
        names = list(self.settings.domains)

        def read() -> list:
            now = self.client.time()
            since = int(now[0]) * 1000 - 3_600_000
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.zcount(self.keys.rate_starts(name), since, "+inf")
            return pipe.execute()

        return dict(zip(names, map(int, self.guard.run(read))))

    def get_upstream_stats(self) -> dict[str, Any]:
        counters, hour = self.counters(), self._last_hour()
        overall: dict[str, int] = {}
        for c in counters.values():
            for k, v in c.items():
                overall[k] = overall.get(k, 0) + v
        return {
            "overall": self._upstream_of(overall, sum(hour.values())),
            "by_domain": {name: self._upstream_of(c, hour[name]) for name, c in counters.items()},
        }

    def _info(self, section: str | None = None) -> dict[str, Any]:
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

    def _cluster_database_stats(self, cluster: Any) -> dict[str, Any]:
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
            "type": "redis-cluster", "health": "ok" if healthy else "degraded", "url": redacted_url(self.redis_url),
            "cluster_state": state["state"], "version": total.get("redis_version"),
            "used_memory_bytes": total.get("used_memory"), "maxmemory_bytes": total.get("maxmemory"),
            "maxmemory_policy": total.get("maxmemory_policy"), "evicted_keys": total.get("evicted_keys"),
            "keys": sum(int((info.get("db0") or {}).get("keys", 0)) for info in primaries.values()
                        if isinstance(info, dict)),
            "primaries": state["primaries"], "down": state["down"], "nodes": state["nodes"],
            "prefix": self.keys.prefix,
            "warnings": state["warnings"] + topology.memory_warnings(infos),
        }

    def get_database_stats(self) -> dict[str, Any]:
        kind = "redis-cluster" if is_cluster(self.client) else "redis"
        try:
            cluster = cluster_of(self.client)
            if cluster is not None:
                return self._cluster_database_stats(cluster)
            keys = self.client.dbsize()
            info = self._info()
            primary = topology.sentinel_primary(self.client)
        except (redis.RedisError, RedisClusterException) as exc:
            return {"type": kind, "health": "unavailable", "error": f"{type(exc).__name__}: {exc}",
                    "url": redacted_url(self.redis_url)}
        return {
            "type": kind if primary is None else "redis-sentinel", "health": "ok", "url": redacted_url(self.redis_url),
            **({} if primary is None else {"primary": primary}),
            "version": info.get("redis_version"), "used_memory_bytes": info.get("used_memory"),
            "maxmemory_bytes": info.get("maxmemory"), "maxmemory_policy": info.get("maxmemory_policy"),
            "evicted_keys": info.get("evicted_keys"), "keys": keys, "prefix": self.keys.prefix,
            "warnings": redis_memory.warnings(info),
        }

    def get_proxy_health(self) -> dict[str, Any]:
        health = self.health()
        try:
            since = time.time() - WORKER_SEEN_SECONDS
            workers = self.guard.run(lambda: self.client.zcount(self.keys.workers, since, "+inf"))
            errors = [json.loads(e) for e in self.guard.run(lambda: self.client.lrange(self.keys.recent_errors, 0, 19))]
        except StoreUnavailable:
            workers, errors = 0, []
        return {
            "status": health["status"],
            "uptime_seconds": health["uptime_seconds"],
            "version": self.version,
            "active_workers": int(workers),
            "threads_per_worker": int(os.environ.get("BUDDY_THREADS", "64")),
            "offline": self.offline.on() if self.offline is not None else False,
            "recent_errors": errors,
        }

    def get_throttling_stats(self) -> dict[str, Any]:
        counters = self.counters()
        names = list(self.settings.domains)

        def read() -> tuple[list, float]:
            seconds, micros = self.client.time()
            now = int(seconds) * 1000 + int(micros) // 1000
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                for window in (1_000, 60_000, 3_600_000):
                    pipe.zcount(self.keys.rate_starts(name), now - window, "+inf")
                pipe.hmget(self.keys.rate_penalty(name), ["until", "level", "last"])
            pipe.lrange(self.keys.recent_errors, 0, RECENT_ERRORS - 1)
            return pipe.execute(), now

        values, now = self.guard.run(read)
        pushed_back = self._last_pushed_back(values.pop())
        out = {}
        for i, name in enumerate(names):
            second, minute, hour, (until, level, last) = values[i * 4 : i * 4 + 4]
            domain, c = self.settings.domains[name], counters[name]
            out[name] = {
                "limits": {"per_second": domain.max_requests_per_second,
                           "per_minute": domain.max_requests_per_minute, "per_hour": domain.max_requests_per_hour},
                "window_use": {"last_second": int(second), "last_minute": int(minute), "last_hour": int(hour)},
                "violations": c.get("throttle_refused", 0),
                "delayed_requests": c.get("throttle_delayed", 0),
                "total_delay_seconds": round(c.get("throttle_delay_ms", 0) / 1000, 3),
                "current_delay_seconds": round(max(0, int(until or 0) - now) / 1000, 3),
                "penalty_level": int(level or 0),
                # The latest upstream 429/503 (among the recent errors) and the pause it set, while the penalty
                # lasts: the upstream's Retry-After when it sent one, else the exponential backoff.
                "last_pushed_back": pushed_back.get(name),
                "penalty_since": round(int(last) / 1000, 3) if last else None,
                "penalty_pause_seconds": round(max(0, int(until or 0) - int(last)) / 1000, 3) if last else None,
            }
        return out

    @staticmethod
    def _last_pushed_back(events: list[bytes]) -> dict[str, dict[str, Any]]:
        """Each mapping's newest 429/503 among the recent errors (newest first): time, status, Retry-After."""
        found: dict[str, dict[str, Any]] = {}
        for raw in events:
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            if event.get("status") in PUSHED_BACK and event.get("domain") not in found:
                found[event["domain"]] = {"time": event.get("time"), "status": event["status"],
                                          "retry_after": event.get("retry_after")}
        return found

    def timeline(self) -> dict[str, Any]:
        """Hits, misses and upstream calls per minute over the last TIMELINE_MINUTES minutes (the current one
        last, still filling), per mapping and in all, from the per-minute counters every process flushes."""
        names = list(self.settings.domains)
        current = int(time.time() // 60)
        minutes = list(range(current - TIMELINE_MINUTES + 1, current + 1))

        def read() -> list:
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                for minute in minutes:
                    pipe.hmget(self.keys.minute_counts(name, minute), list(MINUTE_FIELDS))
            return pipe.execute()

        values = self.guard.run(read)
        by_domain: dict[str, dict[str, list[int]]] = {}
        for i, name in enumerate(names):
            rows = values[i * len(minutes) : (i + 1) * len(minutes)]
            by_domain[name] = {field: [int(row[j] or 0) for row in rows] for j, field in enumerate(MINUTE_FIELDS)}
        total = {field: [sum(series[field][k] for series in by_domain.values()) for k in range(len(minutes))]
                 for field in MINUTE_FIELDS}
        return {"minute_starts": [minute * 60 for minute in minutes], "total": total, "by_domain": by_domain}

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

    def get_all(self) -> dict[str, Any]:
        """Every section; a section that needs Redis while it is down says so instead of failing the rest."""
        out: dict[str, Any] = {}
        for name, read in (("cache", self.get_cache_stats), ("upstream", self.get_upstream_stats),
                           ("database", self.get_database_stats), ("proxy_health", self.get_proxy_health),
                           ("throttling", self.get_throttling_stats), ("timeline", self.timeline)):
            try:
                out[name] = read()
            except (StoreUnavailable, redis.RedisError, RedisClusterException) as exc:
                out[name] = {"error": f"Redis unavailable: {exc}"}
        return out
