"""The operator's view, read from Redis so that it describes the whole proxy: the seed's MonitoringManager sections."""
from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from redis.exceptions import RedisClusterException

from buddy.errors import StoreUnavailable
from buddy.redis_health import RedisHealth
from buddy.redis_keys import RedisKeys
from buddy.settings import Settings
from buddy.store.guard import StoreGuard
from buddy.store.metrics import MINUTE_FIELDS, RECENT_ERRORS, TIMELINE_MINUTES, WORKER_SEEN_SECONDS
from buddy.store.offline import OfflineSwitch
from buddy.store.redis_url import redacted
from buddy.store.response_cache import ResponseCache

ERROR_OUTCOMES = ("timeout", "unreachable")


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
        self.redis = RedisHealth(client, guard, keys, redis_url, version, offline)


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
        redis_stats = self.redis.info("stats")
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

    def get_database_stats(self) -> dict[str, Any]:
        return self.redis.database()

    def health(self) -> dict[str, Any]:
        """ok, or degraded with the reason (buddy.redis_health)."""
        return self.redis.health()

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
