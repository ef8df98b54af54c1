"""The operator's view, read from Redis so that it describes the whole proxy: the seed's MonitoringManager sections."""
from __future__ import annotations

import json
import os
import time
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis

from buddy.errors import StoreUnavailable
from buddy.redis_keys import RedisKeys
from buddy.settings import Settings
from buddy.store.guard import StoreGuard
from buddy.store.metrics import WORKER_SEEN_SECONDS
from buddy.store.response_cache import ResponseCache

STARTED = time.time()
ERROR_OUTCOMES = ("timeout", "unreachable")


def _rate(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


def _ints(raw: dict[bytes, bytes]) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in raw.items()}


def redacted_url(url: str) -> str:
    """A Redis URL fit to show: the password replaced, whether in the user part or a ?password= parameter."""
    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        parts = parts._replace(netloc=netloc)
    if parts.query:
        query = [(k, "***" if k.lower() == "password" else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
        parts = parts._replace(query=urlencode(query, safe="*"))
    return urlunsplit(parts)


class MonitoringManager:
    """get_cache_stats / get_upstream_stats / get_database_stats / get_proxy_health / get_throttling_stats."""

    def __init__(
        self, client: redis.Redis, guard: StoreGuard, keys: RedisKeys, settings: Settings, cache: ResponseCache,
        redis_url: str, version: str,
    ) -> None:
        self.client = client
        self.guard = guard
        self.keys = keys
        self.settings = settings
        self.cache = cache
        self.redis_url = redis_url
        self.version = version

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
        described = {name: self.cache.describe(name) for name in self.settings.domains}
        total = {field: sum(c.get(field, 0) for c in counters.values())
                 for field in ("hits", "misses", "coalesced", "sets", "bytes_saved", "ms_saved")}
        lookups = total["hits"] + total["misses"] + total["coalesced"]
        ttl: dict[str, int] = {}
        for entries in described.values():
            for bucket, n in entries.ttl_buckets.items():
                ttl[bucket] = ttl.get(bucket, 0) + n
        evicted = int(self._info("stats").get("evicted_keys", 0))
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
            "expired_entries": sum(e.expired for e in described.values()),
            "evicted_entries": evicted,
            "upstream_calls_avoided": total["hits"] + total["coalesced"],
            "bytes_saved": total["bytes_saved"],
            "seconds_saved": round(total["ms_saved"] / 1000, 3),
            "by_domain": {
                name: {
                    "hits": c.get("hits", 0), "misses": c.get("misses", 0), "coalesced": c.get("coalesced", 0),
                    "hit_rate": _rate(c.get("hits", 0), c.get("hits", 0) + c.get("misses", 0) + c.get("coalesced", 0)),
                    "upstream_calls_avoided": c.get("hits", 0) + c.get("coalesced", 0),
                    "bytes_saved": c.get("bytes_saved", 0), "seconds_saved": round(c.get("ms_saved", 0) / 1000, 3),
                }
                for name, c in counters.items()
            },
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
        """Redis INFO, or {} from a server that does not offer it (fakeredis in tests)."""
        try:
            return self.client.info(section) if section else self.client.info()
        except redis.ResponseError:
            return {}

    def get_database_stats(self) -> dict[str, Any]:
        try:
            keys = self.client.dbsize()
            info = self._info()
        except redis.RedisError as exc:
            return {"type": "redis", "health": "unavailable", "error": f"{type(exc).__name__}: {exc}",
                    "url": redacted_url(self.redis_url)}
        return {
            "type": "redis", "health": "ok", "url": redacted_url(self.redis_url),
            "version": info.get("redis_version"), "used_memory_bytes": info.get("used_memory"),
            "maxmemory_bytes": info.get("maxmemory"), "keys": keys, "prefix": self.keys.prefix,
        }

    def get_proxy_health(self) -> dict[str, Any]:
        health = self.health()
        try:
            workers = self.guard.run(lambda: self.client.zcount(self.keys.workers, time.time() - WORKER_SEEN_SECONDS, "+inf"))
            errors = [json.loads(e) for e in self.guard.run(lambda: self.client.lrange(self.keys.recent_errors, 0, 19))]
        except StoreUnavailable:
            workers, errors = 0, []
        return {
            "status": health["status"],
            "uptime_seconds": health["uptime_seconds"],
            "version": self.version,
            "active_workers": int(workers),
            "threads_per_worker": int(os.environ.get("BUDDY_THREADS", "64")),
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
                pipe.hmget(self.keys.rate_penalty(name), ["until", "level"])
            return pipe.execute(), now

        values, now = self.guard.run(read)
        out = {}
        for i, name in enumerate(names):
            second, minute, hour, (until, level) = values[i * 4 : i * 4 + 4]
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
            }
        return out

    def health(self) -> dict[str, Any]:
        try:
            self.client.ping()
            redis_state = "ok"
        except redis.RedisError as exc:
            redis_state = f"unavailable: {type(exc).__name__}"
        return {
            "status": "ok" if redis_state == "ok" else "degraded",
            "redis": redis_state,
            "uptime_seconds": round(time.time() - STARTED, 1),
            "version": self.version,
        }

    def get_all(self) -> dict[str, Any]:
        """Every section; a section that needs Redis while it is down says so instead of failing the rest."""
        out: dict[str, Any] = {}
        for name, read in (("cache", self.get_cache_stats), ("upstream", self.get_upstream_stats),
                           ("database", self.get_database_stats), ("proxy_health", self.get_proxy_health),
                           ("throttling", self.get_throttling_stats)):
            try:
                out[name] = read()
            except (StoreUnavailable, redis.RedisError) as exc:
                out[name] = {"error": f"Redis unavailable: {exc}"}
        return out
